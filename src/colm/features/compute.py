"""Per-example gradient features of the last block's value projection.

:class:`GradientFeatures` ties the pieces together for one model: it locates
the block, then, chunk by chunk, captures the last block's inputs with one
no-grad pass of the trunk and computes either zeroth-order estimates (``zo``)
or exact gradients (``exact``) by replaying last block + head only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .exact import exact_gradients
from .locate import ValueBlock, find_value_block
from .replay import IGNORE_INDEX, LastBlockReplay, check_replay
from .zeroth_order import lift, zo_coefficients

FEATURE_KINDS = ("zo", "exact")


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _trim(input_ids, attention_mask, labels):
    """Drop trailing columns that are padding in every row of the chunk: in a
    causal LM later positions never affect earlier ones, so losses are unchanged."""
    used = labels != IGNORE_INDEX
    if attention_mask is not None:
        used = used | attention_mask.bool()
    cols = used.any(0).nonzero()
    end = int(cols.max()) + 1 if cols.numel() else 1
    am = attention_mask[:, :end] if attention_mask is not None else None
    return input_ids[:, :end], am, labels[:, :end]


class GradientFeatures:
    """Computes gradient features of ``model``'s last value block.

    Args:
        model: a causal LM (plain, PEFT, or wrapped by DDP/accelerate).
        chunk_size: examples per trunk pass and replay; bounds selection memory.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 16):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.block: ValueBlock = find_value_block(model)
        self.replay = LastBlockReplay(model, self.block)
        self.chunk_size = chunk_size

    @property
    def numel(self) -> int:
        return self.block.numel

    def check(self, input_ids, attention_mask, labels) -> float:
        """Verify that the replay reproduces the full model's losses (see check_replay)."""
        n = min(4, input_ids.shape[0])
        return check_replay(self.replay, *_trim(input_ids[:n], _row(attention_mask, n), labels[:n]))

    def compute(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        kind: str = "zo",
        directions: torch.Tensor | None = None,
        eps: float = 1e-3,
        lifted: bool = True,
    ) -> torch.Tensor:
        """Features [n, D] (float32, on the model's device), one row per example.

        ``directions`` [q, D] are required for ``zo``; with ``lifted=False`` zo
        returns the coefficients [n, q] instead (features = coefficients @ directions
        / q, see :func:`lift`). Rows with a non-finite loss come out non-finite; the
        caller decides what to do with them.
        """
        device = self.block.parameter.device
        parts, where = [], []
        for rows, part in self.chunks(
            input_ids, attention_mask, labels, kind, directions, eps, lifted
        ):
            parts.append(part)
            where.append(rows)
        if parts:
            out = torch.empty_like(torch.cat(parts))
            out[torch.cat(where).to(out.device)] = torch.cat(parts)
            return out
        width = self.numel if kind == "exact" or lifted else directions.shape[0]
        return torch.zeros(0, width, device=device)

    def chunks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        kind: str = "zo",
        directions: torch.Tensor | None = None,
        eps: float = 1e-3,
        lifted: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The features of :meth:`compute` one chunk at a time: (row indices [c], features
        [c, width]), chunks of rows of similar length, so that at most ``chunk_size``
        rows of features exist at once (what streamed selection relies on). The same
        inputs give the same chunks, bitwise, every time."""
        if kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
        if kind == "zo" and (directions is None or directions.shape[1] != self.numel):
            raise ValueError(f"zo features need directions of shape [q, {self.numel}]")
        device = self.block.parameter.device
        # chunks of rows of similar length, so that little of each chunk is padding
        order = _by_length(attention_mask, labels)
        with self.replay.upcast():  # fp32 copies of a half-precision block, for all chunks
            for sl in _chunks(input_ids.shape[0], self.chunk_size):
                rows = order[sl]
                ids, am, lab = _trim(
                    input_ids[rows].to(device),
                    attention_mask[rows].to(device) if attention_mask is not None else None,
                    labels[rows].to(device),
                )
                captured = self.replay.capture(ids, am)
                if kind == "zo":
                    coef = zo_coefficients(self.replay, captured, lab, directions, eps)
                    part = lift(coef, directions) if lifted else coef
                else:
                    part = exact_gradients(self.replay, captured, lab)[0]
                del captured
                yield rows, part


def _by_length(attention_mask, labels) -> torch.Tensor:
    """Row order by the last used column (stable), for length-grouped chunks."""
    used = labels != IGNORE_INDEX
    if attention_mask is not None:
        used = used | attention_mask.bool()
    cols = torch.arange(1, used.shape[1] + 1, device=used.device)
    last = (used * cols).amax(1) if used.shape[1] else torch.zeros(used.shape[0])
    return torch.sort(last.cpu(), stable=True).indices


def _row(t, n):
    return None if t is None else t[:n]
