"""A plain PyTorch training step with coresets, for users who do not use Trainer.

    selector = CoresetSelector(SelectorConfig(ratio=0.5), source_counts)
    for batch in loader:                       # a source batch, with batch["source"]
        out = coreset_step(model, optimizer, selector, batch, micro_batches=2)
        scheduler.step()

The loss is the token-level mean over the coreset's label tokens (weighted by
the selection weights when ``weights="cluster"``), as the Trainer computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
    ``micro_batches`` pieces (gradient accumulation), and take one optimizer step."""
    selection = selector.select(model, batch)
    chosen = batching.take({k: v for k, v in batch.items() if k != "source"}, selection.indices)
    weights = selection.weights
    total = (batching.label_tokens(chosen).float() * weights).sum().clamp(min=1)
    model.train()
    loss_value = 0.0
    for part in torch.arange(len(weights)).tensor_split(min(micro_batches, len(weights))):
        piece = batching.take(chosen, part)
        logits = model(
            input_ids=piece["input_ids"], attention_mask=piece.get("attention_mask")
        ).logits
        loss = batching.weighted_token_loss(
            logits, piece["labels"], weights[part], total.to(logits.device)
        )
        loss.backward()
        loss_value += float(loss.detach())
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], max_grad_norm
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_value, selection=selection)
