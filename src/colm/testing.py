"""Tiny models for tests and for the benchmarks' ``--quick`` modes: built from a config
with a fixed seed, nothing downloaded. Their numbers mean nothing; they check mechanics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def tiny_llama(tokenizer: Any, seed: int = 0, max_positions: int = 1024):
    """A 2-layer Llama (hidden 32, GQA, tied embeddings) whose vocabulary and special
    tokens match ``tokenizer``; random weights from ``torch.manual_seed(seed)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def tiny_model_dir(path: str | os.PathLike, tokenizer_from: str | None = None) -> Path:
    """:func:`tiny_llama` with SmolLM2's tokenizer (or ``tokenizer_from``), saved in
    ``path`` as a model directory ``colm train`` can load (reused when it exists)."""
    from transformers import AutoTokenizer

    from .models import default_model_dir

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer_config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_from or str(default_model_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    path.mkdir(parents=True, exist_ok=True)
    tiny_llama(tok, max_positions=2048).save_pretrained(path)
    tok.save_pretrained(path)
    return path
