"""Zeroth-order (SPSA, central difference) per-example gradient estimates.

For directions z_1..z_q ~ N(0, I) over the block, shared by all examples of a
step and drawn fresh every step by the caller's ``torch.Generator``:

    c_ij = (L_i(theta + eps z_j) - L_i(theta - eps z_j)) / (2 eps)
    g_i  = (1/q) sum_j c_ij z_j

Only the last block + head are replayed per direction. The parameter is
perturbed functionally (a new tensor), never by in-place add/subtract, so no
drift accumulates in low precision; for a half-precision model the perturbed
block and the replay are fp32 (:mod:`colm.features.replay`), since eps z is
below bf16's resolution of the weights.
"""

from __future__ import annotations

import torch

from .replay import Captured, LastBlockReplay


def draw_directions(num: int, numel: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` Gaussian directions over the block, [num, numel] float32 on CPU.

    Drawn on the CPU from ``generator`` so that the same seed gives the same
    directions on any device (and the global RNG is never touched)."""
    return torch.randn(num, numel, generator=generator, dtype=torch.float32)


@torch.no_grad()
def zo_coefficients(
    replay: LastBlockReplay,
    captured: Captured,
    labels: torch.Tensor,
    directions: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Directional derivatives c [B, q] of each example's loss along each direction."""
    name = replay.block.param_name
    coefs = []
    for z in directions:
        delta = (eps * z.float()).to(replay.block.parameter.device)
        plus = replay.losses(captured, labels, {name: replay.perturbed(delta)})
        minus = replay.losses(captured, labels, {name: replay.perturbed(-delta)})
        coefs.append((plus - minus) / (2 * eps))
    return torch.stack(coefs, dim=1)


def lift(coefficients: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Features g [B, D] = mean over directions of coefficient * z.

    Summed one direction at a time (not a matrix product), so that a row's features
    are the same bitwise however many rows are lifted together (streamed selection
    lifts a chunk at a time)."""
    d = directions.to(coefficients.device)
    c = coefficients.float()
    out = c[:, :1] * d[0]
    for j in range(1, d.shape[0]):
        out += c[:, j : j + 1] * d[j]
    return out / d.shape[0]
