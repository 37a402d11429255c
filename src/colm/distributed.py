"""Coreset selection across data-parallel processes (``torchrun`` / ``accelerate launch``).

Under data parallelism every rank holds the same *global* source batch (the
data loader is not sharded for selection: token ids are cheap to load twice)
but computes gradient features for only its share of the examples that need
them. The feature rows are gathered with one tensor collective
(``all_gather_single``, formerly ``all_gather_into_tensor``), every rank runs the same deterministic selection
on the same bytes, and rank 0's choice is broadcast so that the ranks agree by
construction. Each rank then trains on an equal, contiguous share of the
coreset. What crosses the wire per step is:

- ``zo`` features: ``q`` floats per example (the directions are drawn from the
  selector's generator, identical on all ranks, and the coefficients are lifted
  locally);
- ``exact`` features: the value-block gradient per example (``D`` floats);
- a 4-number fingerprint of the batch per rank and the coreset's indices and
  weights (``2 x coreset`` numbers).

Nothing here is pickled, and every rank enters every collective in the same
order whatever the batch holds, so no batch can make a rank wait forever.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT = "default"


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: its ``rank`` among ``world`` processes of ``group``."""

    group: Any = None
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1


def process_info(group: Any = DEFAULT) -> ProcessInfo:
    """The data-parallel setting: the default process group when torch.distributed
    is initialised (``group="default"``), a given group, or none (``group=None``)."""
    import torch.distributed as dist

    if group is None or not (dist.is_available() and dist.is_initialized()):
        return ProcessInfo()
    g = None if group == DEFAULT else group
    return ProcessInfo(group=g, rank=dist.get_rank(g), world=dist.get_world_size(g))


def share_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shares of ``n`` items over ``world`` ranks, sizes differing by at most one."""
    base, extra = divmod(n, world)
    bounds, start = [], 0
    for r in range(world):
        size = base + (r < extra)
        bounds.append((start, start + size))
        start += size
    return bounds


def _comm_device(info: ProcessInfo, device: torch.device) -> torch.device:
    import torch.distributed as dist

    return torch.device("cpu") if dist.get_backend(info.group) == "gloo" else device


def _all_gather(out: torch.Tensor, tensor: torch.Tensor, info: ProcessInfo) -> None:
    import torch.distributed as dist

    # all_gather_single replaces all_gather_into_tensor in recent torch
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor, group=info.group)


def gather_rows(
    local: torch.Tensor, counts: Sequence[int], info: ProcessInfo
) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's ``local`` rows (rank ``r`` holds ``counts[r]`` rows) on
    every rank. Returns the rows and the number of bytes this rank received."""
    width = local.shape[1]
    rows = max(1, max(counts))  # every rank sends the same shape, empty shares included
    device = _comm_device(info, local.device)
    buf = torch.zeros(rows, width, dtype=local.dtype, device=device)
    buf[: local.shape[0]] = local.to(device)
    out = torch.empty(info.world * rows, width, dtype=local.dtype, device=device)
    _all_gather(out, buf, info)
    parts = [out[r * rows : r * rows + counts[r]] for r in range(info.world)]
    received = (info.world - 1) * rows * width * out.element_size()
    return torch.cat(parts).to(local.device), received


def batch_fingerprint(input_ids: torch.Tensor, sources: Sequence[str]) -> torch.Tensor:
    """Four integers that differ, with overwhelming probability, between batches."""
    ids = input_ids.detach().to("cpu", torch.int64)
    pos = torch.arange(1, ids.shape[1] + 1, dtype=torch.int64)
    mixed = int(((ids * pos) % 1_000_003).sum()) % (2**31 - 1)
    names = zlib.crc32("\x1f".join(sources).encode("utf-8", "surrogatepass"))
    return torch.tensor([ids.shape[0], ids.shape[1], mixed, names], dtype=torch.int64)


def check_same_batch(input_ids: torch.Tensor, sources: Sequence[str], info: ProcessInfo) -> int:
    """Raise on every rank if the ranks were given different source batches.
    Returns the bytes received."""
    mine = batch_fingerprint(input_ids, sources)
    out = torch.empty(info.world * mine.numel(), dtype=torch.int64)
    _all_gather(out, mine, info)
    prints = out.view(info.world, -1)
    if not bool((prints == prints[0]).all()):
        differ = [r for r in range(info.world) if not bool((prints[r] == prints[0]).all())]
        raise ValueError(
            f"ranks {differ} were given a different source batch than rank 0; under data "
            "parallelism every rank must pass the same global source batch to the selector "
            "(do not shard the data loader: each rank computes features for its share itself)"
        )
    return (info.world - 1) * mine.numel() * mine.element_size()


def broadcast_selection(
    indices: torch.Tensor, weights: torch.Tensor, info: ProcessInfo
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rank 0's indices and weights on every rank (their sizes agree on all ranks)."""
    import torch.distributed as dist

    packed = torch.stack([indices.to(torch.float64), weights.to(torch.float64)])
    packed = packed.to(_comm_device(info, indices.device))
    src = dist.get_global_rank(info.group, 0) if info.group is not None else 0
    dist.broadcast(packed, src=src, group=info.group)
    packed = packed.cpu()
    received = 0 if info.rank == 0 else packed.numel() * packed.element_size()
    return packed[0].round().to(torch.long), packed[1].to(torch.float32), received


def all_reduce_sum(value: torch.Tensor, info: ProcessInfo) -> torch.Tensor:
    """The sum of ``value`` over the ranks (a small tensor, e.g. a loss)."""
    import torch.distributed as dist

    device = value.device
    out = value.detach().to(_comm_device(info, device)).clone()
    dist.all_reduce(out, group=info.group)
    return out.to(device)


def end_process_group() -> None:
    """After a run that finished on every process: wait for all of them, then destroy the
    default process group. Left to interpreter exit, gloo's teardown can abort a rank
    ("terminate called without an active exception") and fail the launcher."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
