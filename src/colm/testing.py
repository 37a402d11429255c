"""Tiny models for tests and for the benchmarks' ``--quick`` modes: built from a config
with a fixed seed, nothing downloaded. Their numbers mean nothing; they check mechanics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

# a Llama of tiny depth with Llama-3-8B's width: its value projection is 1024 x 4096,
# the block full fine-tuning computes features of (4M numbers per example)
WIDE = {
    "hidden_size": 4096,
    "intermediate_size": 4096,
    "num_hidden_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def tiny_llama(tokenizer: Any, seed: int = 0, max_positions: int = 1024, **config: Any):
    """A 2-layer Llama (hidden 32, GQA, tied embeddings) whose vocabulary and special
    tokens match ``tokenizer``; random weights from ``torch.manual_seed(seed)``.
    ``config`` overrides ``LlamaConfig`` fields (e.g. ``**WIDE``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **config,
    }
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    return LlamaForCausalLM(cfg)


def tiny_model_dir(
    path: str | os.PathLike, tokenizer_from: str | None = None, **config: Any
) -> Path:
    """:func:`tiny_llama` with SmolLM2's tokenizer (or ``tokenizer_from``), saved in
    ``path`` as a model directory ``colm train`` can load (reused when it exists);
    ``config`` as for :func:`tiny_llama`."""
    from transformers import AutoTokenizer

    from .models import default_model_dir

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer_config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_from or str(default_model_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    path.mkdir(parents=True, exist_ok=True)
    tiny_llama(tok, max_positions=2048, **config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
