"""Exact per-example gradients of the value block, one backward through the
last block and head only.

Examples in a batch do not interact, so one backward of the summed per-example
losses gives every example its own gradient at the projection's output. The
per-example weight gradient is then the outer product of that output gradient
with the projection's input, summed over the example's tokens (the standard
per-sample-gradient identity for linear layers).
"""

from __future__ import annotations

import torch

from .replay import Captured, LastBlockReplay


def exact_gradients(
    replay: LastBlockReplay, captured: Captured, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example block gradients [B, D], per-example losses [B])."""
    block = replay.block
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        seen["x"], seen["y"] = inputs[0], output

    leaf = replay.parameter().detach().requires_grad_(True)  # fp32 for a half-precision model
    handle = block.module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            losses = replay.losses(captured, labels, {block.param_name: leaf})
            (gy,) = torch.autograd.grad(losses.sum(), seen["y"])
    finally:
        handle.remove()
    n = labels.shape[0]
    x = seen["x"].detach().float().reshape(n, -1, seen["x"].shape[-1])
    gy = gy.float().reshape(n, -1, gy.shape[-1])
    index = block.index.to(gy.device)
    if block.dim == 0:  # weight [out, in]: rows are outputs
        g = torch.einsum("bto,bti->boi", gy.index_select(2, index), x)
    else:  # Conv1D weight [in, out]: columns are outputs
        g = torch.einsum("bti,bto->bio", x, gy.index_select(2, index))
    return g.reshape(n, -1), losses.detach()
