"""Merging micro-batches into one source batch and re-packing a coreset.

Shared by the Trainer integration and the plain PyTorch loop. Batches are
dicts of [B, T] tensors (``input_ids``, ``attention_mask``, ``labels``, ...)
plus a ``source`` list; right padding is assumed for merging (what
``CoLMCollator`` and TRL's collator produce).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
# value used to pad each key when widening a micro-batch
_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}

# keys that mean examples were merged into one sequence (packing / padding-free)
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_lengths", "seq_idx", "max_length_q")


def check_not_packed(batch: Mapping[str, Any]) -> None:
    """Refuse batches in which several examples share one row."""
    found = [k for k in PACKED_KEYS if k in batch]
    if found:
        raise ValueError(
            f"the batch holds packed / padding-free sequences (keys {found}); coreset selection "
            "needs one example per row. Turn packing and padding_free off (e.g. "
            "SFTConfig(packing=False, padding_free=False))."
        )


def _rows(batch: Mapping[str, Any]) -> int:
    return len(batch["input_ids"])


def merge(batches: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Concatenate micro-batches row-wise, right-padding 2-D tensors to a common width."""
    if not batches:
        raise ValueError("no micro-batches to merge")
    for b in batches:
        check_not_packed(b)
    out: dict[str, Any] = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        first = values[0]
        if isinstance(first, torch.Tensor):
            if first.dim() >= 2:
                width = max(v.shape[1] for v in values)
                pad = _PAD_VALUES.get(key, pad_token_id)
                values = [
                    torch.nn.functional.pad(v, (0, width - v.shape[1]), value=pad)
                    if v.shape[1] < width
                    else v
                    for v in values
                ]
            out[key] = torch.cat(values)
        elif isinstance(first, (list, tuple)):
            out[key] = [x for v in values for x in v]
        else:
            raise TypeError(f"cannot merge batch entry {key!r} of type {type(first).__name__}")
    return out


def take(batch: Mapping[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Rows ``index`` of a batch, with trailing columns that are padding in every row removed."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[index.to(value.device)]
        else:
            out[key] = [value[int(i)] for i in index]
    return trim(out)


def trim(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop trailing columns that no row uses (saves compute on re-packed micro-batches)."""
    used = None
    if "attention_mask" in batch:
        used = batch["attention_mask"].bool()
    if "labels" in batch:
        lab = batch["labels"] != IGNORE_INDEX
        used = lab if used is None else used | lab
    if used is None or used.numel() == 0:
        return batch
    cols = used.any(0).nonzero()
    end = int(cols.max()) + 1 if cols.numel() else 1
    width = used.shape[1]
    if end < width:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == width:
                batch[key] = value[:, :end]
    return batch


def split(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split a batch into ``parts`` micro-batches of near-equal size (in order)."""
    n = _rows(batch)
    chunks = torch.arange(n).tensor_split(min(parts, n)) if n else []
    return [take(batch, c) for c in chunks]


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, total: torch.Tensor | float
) -> torch.Tensor:
    """sum_i weight_i x (sum of example i's next-token losses), divided by ``total``
    (the step's weighted label-token count): the Trainer's token-level mean,
    generalised to per-example weights."""
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        labels[:, 1:],
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).sum(1)
    return (ce * weights.to(ce.device, ce.dtype)).sum() / total


def label_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """Number of next-token label positions per row (labels shifted as in causal LM)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
