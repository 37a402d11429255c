"""The block finder on tiny models of four architectures, with and without LoRA."""

import pytest
import torch

from colm.features import BlockNotFoundError, find_layers, find_value_block
from tests.conftest import CORE_ARCHS, make_batch, make_tiny

# (architecture, expected projection attribute, value rows/cols of the fused weight)
EXPECTED = {
    "llama": ("v_proj", None),
    "gpt2": ("c_attn", (64, 96)),  # Conv1D columns [2E, 3E)
    "phi3": ("qkv_proj", (48, 64)),  # q 32 | k 16 | v 16
    "neox": ("query_key_value", None),  # per-head interleaved
}


@pytest.mark.parametrize("lora", [False, True])
def test_finds_value_projection_of_last_block(arch, lora):
    model = make_tiny(arch, lora=lora)
    block = find_value_block(model)
    _, layers = find_layers(model)
    assert block.layer is layers[-1]
    assert block.layer_name.endswith(f".{len(layers) - 1}")
    proj = EXPECTED[arch][0]
    assert f".{proj}" in block.module_name
    assert block.kind == ("lora_B" if lora else "weight")
    # the named parameter is exactly the tensor functional_call will replace
    assert dict(block.layer.named_parameters())[block.param_name] is block.parameter
    # the block is a third of a fused projection, all of a separate one
    hidden = 32
    if arch == "llama":
        assert block.shape == ((16, 4) if lora else (16, hidden))
    else:
        assert block.numel * (3 if arch in ("gpt2", "neox") else 4) == block.parameter.numel()
    span = EXPECTED[arch][1]
    if span is not None and not lora:
        assert block.index.tolist() == list(range(*span))
    if span is not None and lora and arch == "phi3":
        assert block.index.tolist() == list(range(*span))


@pytest.mark.parametrize("lora", [False, True])
def test_block_rows_are_the_values_not_queries_or_keys(arch, lora):
    """Perturbing the block changes the last block's output but not its attention
    pattern (softmax(QK^T)), which it would if the rows were Q or K."""
    model = make_tiny(arch, lora=lora)
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "eager"
    block = find_value_block(model)
    batch = make_batch(n=2)
    probs = {}

    def grab(name):
        def hook(_m, _i, out):
            probs[name] = out[1] if isinstance(out, tuple) and len(out) > 1 else None

        return hook

    attn = [
        m
        for n, m in block.layer.named_modules()
        if n and n.count(".") == 0 and "attn" in n.lower() or n == "attention"
    ][0]
    h = attn.register_forward_hook(grab("a"))
    try:
        with torch.no_grad():
            out0 = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_attentions=True,
            ).logits
            p0 = probs["a"]
            delta = torch.randn(block.shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                saved = block.parameter.detach().clone()
                block.parameter.copy_(block.perturbed(delta))
            out1 = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_attentions=True,
            ).logits
            p1 = probs["a"]
            block.parameter.copy_(saved)
    finally:
        h.remove()
    assert p0 is not None, "attention probabilities were not returned"
    assert torch.allclose(p0, p1, atol=1e-6)
    assert not torch.allclose(out0, out1, atol=1e-4)


def test_perturbed_is_out_of_place():
    model = make_tiny("phi3", lora=True)
    block = find_value_block(model)
    before = block.parameter.detach().clone()
    new = block.perturbed(torch.ones(block.shape))
    assert torch.equal(block.parameter, before)
    assert torch.allclose(block.view(new) - block.view(before), torch.ones(block.shape), atol=1e-6)
    # rows outside the block are untouched
    outside = torch.ones(block.parameter.shape[0], dtype=torch.bool)
    outside[block.index] = False
    assert torch.equal(new[outside], before[outside])


@pytest.mark.parametrize("arch_name", CORE_ARCHS)
def test_lora_without_value_projection_is_a_clear_error(arch_name):
    targets = {"llama": ["q_proj"], "gpt2": ["c_proj"], "phi3": ["o_proj"], "neox": ["dense"]}
    model = make_tiny(arch_name, lora=True, targets=targets[arch_name])
    proj = EXPECTED[arch_name][0]
    with pytest.raises(BlockNotFoundError, match=rf"Add '{proj}' to LoraConfig\(target_modules"):
        find_value_block(model)


def test_lora_on_other_layers_only_is_an_error():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
        )
    )
    model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["v_proj"], layers_to_transform=[0])
    )
    with pytest.raises(BlockNotFoundError, match="layers_to_transform includes the last layer"):
        find_value_block(model)


def test_not_a_transformer_is_an_error():
    with pytest.raises(BlockNotFoundError, match="ModuleList"):
        find_value_block(torch.nn.Linear(3, 3))
