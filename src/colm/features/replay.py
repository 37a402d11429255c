"""Capture the last block's inputs once, then replay only the last block + head.

Selection needs per-example losses for several variations of one parameter
block of the last transformer block. Running the whole network for each would
cost a forward pass per variation; instead we run the trunk once without
gradients, stop at the input of the last block (hidden states plus whatever the
block is called with: attention mask, rotary embeddings, position ids), and
recompute only last block -> final norm -> LM head for each variation, with the
varied parameter passed functionally (``torch.func.functional_call``).

Per-example loss is the mean cross-entropy over that example's label tokens
(labels != -100, shifted as in causal LM training), never over the padded
width, and logits are only computed at those positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .locate import ValueBlock, _unwrap

IGNORE_INDEX = -100


class _StopForward(Exception):
    """Raised by the capture hook to end the trunk pass at the last block."""


@dataclass
class Captured:
    """Inputs of the last block for one chunk of examples."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class ReplayMismatchError(RuntimeError):
    """The replayed last block does not reproduce the full model's loss."""


def _final_norm(block: ValueBlock) -> nn.Module | None:
    """The module applied between the last block and the LM head: the first child
    registered after the block list that has parameters (final RMSNorm/LayerNorm)."""
    names = list(block.layers_parent._modules)
    after = names[names.index(block.layers_attr) + 1 :]
    for name in after:
        mod = block.layers_parent._modules[name]
        if mod is not None and any(True for _ in mod.parameters(recurse=True)):
            return mod
    return None


class LastBlockReplay:
    """Replays last block + final norm + LM head of a causal LM.

    >>> replay = LastBlockReplay(model, find_value_block(model))      # doctest: +SKIP
    >>> cap = replay.capture(input_ids, attention_mask)                 # doctest: +SKIP
    >>> losses = replay.losses(cap, labels)                             # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, block: ValueBlock):
        self.model = model
        self.block = block
        inner = _unwrap(model)
        get_head = getattr(inner, "get_output_embeddings", None)
        self.head = get_head() if get_head is not None else None
        if self.head is None:
            raise ReplayMismatchError(
                f"{type(inner).__name__} has no output embeddings (LM head); colm needs a causal LM"
            )
        self.norm = _final_norm(block)
        cfg = getattr(inner, "config", None)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
        self.logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite divides

    # -- trunk ---------------------------------------------------------------
    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Captured:
        """Run the model up to the last block (no grad) and return its inputs."""
        store: dict[str, Any] = {}

        def hook(_module, args, kwargs):
            store["args"], store["kwargs"] = args, dict(kwargs)
            raise _StopForward

        handle = self.block.layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "args" not in store:
            raise ReplayMismatchError(
                f"the forward pass never reached the last block {self.block.layer_name}"
            )
        kwargs = store["kwargs"]
        # a cache object must not be shared between replays
        for key in ("past_key_values", "cache", "layer_past"):
            if key in kwargs:
                kwargs[key] = None
        args = tuple(None if type(a).__name__.endswith("Cache") else a for a in store["args"])
        return Captured(args=args, kwargs=kwargs)

    # -- replay --------------------------------------------------------------
    def hidden(self, captured: Captured, overrides: dict[str, torch.Tensor] | None = None):
        """Output hidden states of the last block, with ``overrides`` (parameter
        name relative to the block -> tensor) substituted functionally. DoRA's
        weight norm stays at the real parameters' value, as in training's
        gradient (see :meth:`ValueBlock.frozen_dora_norm`)."""
        with self.block.frozen_dora_norm():
            out = functional_call(
                self.block.layer, overrides or {}, captured.args, captured.kwargs, strict=False
            )
        return out[0] if isinstance(out, (tuple, list)) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ the model's logit scaling), in float32."""
        if self.norm is not None:
            hidden = self.norm(hidden)
        logits = self.head(hidden).float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def losses(
        self,
        captured: Captured,
        labels: torch.Tensor,
        overrides: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-example mean label-token loss [B] after the last block."""
        return per_example_loss(self.hidden(captured, overrides), labels, self.logits)


def per_example_loss(hidden: torch.Tensor, labels: torch.Tensor, logits_fn) -> torch.Tensor:
    """Mean cross-entropy over each example's label tokens.

    ``hidden`` [B, T, H] are the states that predict the next token; logits are
    computed only at positions whose next-token label is not -100. Examples
    without label tokens get loss 0.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    logits = logits_fn(hidden[:, :-1][mask])
    ce = F.cross_entropy(logits, target[mask], reduction="none")
    total = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    count = mask.sum(1).clamp(min=1).to(ce.dtype)
    return total / count


def full_model_losses(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels
) -> torch.Tensor:
    """Per-example loss from the full model's logits: the reference for the replay."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return per_example_loss_from_logits(logits, labels)


def per_example_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    count = (target != IGNORE_INDEX).sum(1).clamp(min=1)
    return ce.sum(1) / count


@torch.no_grad()
def check_replay(
    replay: LastBlockReplay,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> float:
    """Compare replayed per-example losses with the full model's; raise on mismatch.

    Returns the largest absolute difference. Guards against architectures whose
    last block or head does something the replay does not reproduce.
    """
    ref = full_model_losses(replay.model, input_ids, attention_mask, labels)
    got = replay.losses(replay.capture(input_ids, attention_mask), labels)
    diff = (ref - got).abs()
    if not torch.all(diff <= atol + rtol * ref.abs()):
        raise ReplayMismatchError(
            f"replaying {replay.block.layer_name} + head gives per-example losses "
            f"{got.tolist()} but the full model gives {ref.tolist()}; this architecture "
            "computes something after its last block that colm does not reproduce. "
            "Please report it; SelectorConfig(check_replay=False) skips this check."
        )
    return float(diff.max())
