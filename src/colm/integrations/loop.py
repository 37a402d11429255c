"""A plain PyTorch training step with coresets, for users who do not use Trainer.

    selector = CoresetSelector(SelectorConfig(ratio=0.5), source_counts)
    for batch in loader:                       # a source batch, with batch["source"]
        out = coreset_step(model, optimizer, selector, batch, micro_batches=2)
        scheduler.step()

The loss is the token-level mean over the coreset's label tokens (weighted by
the selection weights when ``weights="cluster"``), as the Trainer computes it.

Under data parallelism (``torchrun``, model wrapped in
``DistributedDataParallel``) every rank passes the same *global* source batch:
each computes features for its share, all agree on one coreset (see
:mod:`colm.distributed`), and each rank trains on an equal share of it, so the
step equals the one-process step on the same global batch. The same holds for a
model sharded by FSDP2 (``fully_shard`` on each decoder layer and on the model):
selection gathers only the last block, final norm and head (:mod:`colm.sharding`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed
from ..selector import CoresetSelector, Selection
from . import batching


@dataclass
class StepResult:
    loss: float
    selection: Selection


def coreset_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    selector: CoresetSelector,
    batch: dict[str, Any],
    micro_batches: int = 1,
    max_grad_norm: float | None = None,
) -> StepResult:
    """Select the coreset of ``batch``, run forward/backward on it in
    ``micro_batches`` pieces (gradient accumulation), and take one optimizer step.

    ``model`` may be wrapped in ``DistributedDataParallel`` or sharded by FSDP2; the
    returned loss is then the loss of the whole coreset, summed over the ranks."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    selection = selector.select(inner, batch, optimizer=optimizer)
    info = distributed.process_info(selector.process_group)
    plain = {k: v for k, v in batch.items() if k != "source"}
    # the loss is normalised by the whole coreset's (weighted) label tokens on every rank
    total = (
        (batching.label_tokens(batching.take(plain, selection.indices)).float() * selection.weights)
        .sum()
        .clamp(min=1)
    )
    indices, weights = selection.shard(info.rank, info.world)
    chosen = batching.take(plain, indices)
    model.train()
    loss_value = torch.zeros(())
    parts = torch.arange(len(weights)).tensor_split(min(micro_batches, max(1, len(weights))))
    for i, part in enumerate(parts):
        piece = batching.take(chosen, part)
        last = i == len(parts) - 1
        sync = contextlib.nullcontext() if last or info.world == 1 else _no_sync(model)
        with sync:
            logits = model(
                input_ids=piece["input_ids"], attention_mask=piece.get("attention_mask")
            ).logits
            loss = batching.weighted_token_loss(
                logits, piece["labels"], weights[part], total.to(logits.device)
            )
            # DDP averages gradients over ranks; the loss is a share of a sum
            (loss * info.world).backward()
        loss_value += loss.detach().float().cpu()
    if info.active:
        loss_value = distributed.all_reduce_sum(loss_value, info)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], max_grad_norm
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=float(loss_value), selection=selection)


def _no_sync(model):
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()
