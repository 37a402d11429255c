"""Gradient matching (GradMatch-style): pick ``k`` rows whose mean matches a target.

An alternative to facility location for the big sources: instead of medoids
that *cover* the source's features, choose ``k`` examples whose (weighted)
mean feature is as close as possible to the target, by default the mean of
all ``n`` rows (the source's full-batch gradient):

    minimise  || sum_{i in S} w_i f_i / sum_{i in S} w_i  -  target ||_2 .

Two weightings:

* ``"uniform"`` (``w_i = 1``): greedy forward selection. Each step adds the row
  that minimises the error of the mean of the chosen rows, evaluating every
  candidate in one vectorised op ``[n, d]`` per step.
* ``"fit"``: orthogonal matching pursuit (OMP) with non-negative weights. The
  first pick is the row closest to the target; each further pick is the row
  with the largest correlation ``<f_j - target, target - current fit>`` (the
  steepest descent direction of the error; it is the column-entry rule of
  Lawson-Hanson NNLS, stopped at ``k`` columns), after which the weights of all
  chosen rows are refitted. The refit solves, exactly, the non-negative
  least-squares problem *with* the weights summing to one (the minimum-norm
  point of the convex hull of the chosen ``f_i - target``), through the
  equivalent plain NNLS ``min_{u >= 0} ||B u||^2 + c^2 (1'u - 1)^2`` with
  ``w = u / 1'u``. Training takes a weighted *mean* of the losses, so a free-
  scale NNLS fit rescaled afterwards would match a different vector than the
  one it fitted; the sum constraint avoids that.

Weights are returned scaled so that ``sum(weights) == n``: each chosen example
stands for ``weights[i]`` of the ``n`` examples, as facility location's
cluster sizes do. With ``"fit"`` a weight can be 0 (the target is already
matched as well as the chosen rows allow; the caller may drop such rows).

Ties go to the lowest row index. Both variants return the picks in pick order
(not sorted); a prefix of the picks for ``k`` is the picks for a smaller ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from colm.facility import _check_features

__all__ = ["MATCH_WEIGHTS", "MatchResult", "gradient_match", "match_error"]

MatchWeights = Literal["uniform", "fit"]
MATCH_WEIGHTS: tuple[str, ...] = ("uniform", "fit")


@dataclass(frozen=True)
class MatchResult:
    """Outcome of :func:`gradient_match`.

    Attributes:
        indices: ``[k]`` long tensor of row indices, in pick order, on the
            input's device.
        weights: ``[k]`` float32 tensor, summing to ``n`` (all ``n / k`` for
            ``"uniform"``); example ``indices[i]`` stands for ``weights[i]``
            examples. Non-negative.
        error: ``|| sum_i weights[i] f[indices[i]] / n - target ||_2``, a float.
    """

    indices: Tensor
    weights: Tensor
    error: float


# --------------------------------------------------------------------------- checks


def _check_inputs(features: object, k: object, weights: object, target: object) -> None:
    features = _check_features(features, "matching")
    if weights not in MATCH_WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {list(MATCH_WEIGHTS)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r} ({type(k).__name__})")
    n = features.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1 (number of rows to choose), got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of rows ({n}); choose k <= {n}")
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
        if target.shape != (features.shape[1],):
            raise ValueError(
                f"target must have shape [{features.shape[1]}] (one entry per feature "
                f"column), got {tuple(target.shape)}"
            )
        if not bool(torch.isfinite(target).all()):
            raise ValueError("target contains NaN or inf")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision sums over thousands of coordinates lose most digits
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------- public


def match_error(
    features: Tensor, indices: Tensor, weights: Tensor | None = None, target: Tensor | None = None
) -> float:
    """``|| sum_i w_i f[indices[i]] / sum_i w_i - target ||_2`` (uniform ``w`` by default;
    ``target`` defaults to the mean of all rows), in float64."""
    x = features.double()
    t = x.mean(0) if target is None else target.to(x.device, torch.float64)
    rows = x[indices.to(x.device)]
    w = (
        torch.ones(rows.shape[0], dtype=torch.float64, device=x.device)
        if weights is None
        else weights.to(x.device, torch.float64)
    )
    mean = (w[:, None] * rows).sum(0) / w.sum()
    return float(torch.linalg.vector_norm(mean - t))


def gradient_match(
    features: Tensor,
    k: int,
    weights: MatchWeights = "uniform",
    target: Tensor | None = None,
) -> MatchResult:
    """Choose ``k`` of the ``n`` rows of ``features`` whose (weighted) mean matches ``target``.

    Args:
        features: ``[n, d]`` floating-point tensor; every entry must be finite.
        k: number of rows to choose, ``1 <= k <= n``.
        weights: ``"uniform"`` (greedy forward selection of the plain mean) or
            ``"fit"`` (orthogonal matching pursuit with non-negative weights
            that sum to ``n``); see the module docstring.
        target: ``[d]`` vector to match; default: the mean of all ``n`` rows.

    Returns:
        A :class:`MatchResult` (indices in pick order; ties to the lowest index).

    Raises:
        TypeError: non-tensor inputs or a non-int ``k``.
        ValueError: bad shape or dtype, ``k < 1`` or ``k > n``, an unknown
            ``weights``, or NaN/inf entries (the offending rows are named).
    """
    _check_inputs(features, k, weights, target)
    x = features.to(_compute_dtype(features.dtype))
    t = x.mean(0) if target is None else target.to(x.device, x.dtype)
    n = x.shape[0]
    if weights == "uniform":
        picks, total = _greedy_uniform(x, t, k)
        err = float(torch.linalg.vector_norm(total / k - t))
        w = torch.full((k,), n / k, dtype=torch.float32, device=x.device)
        idx = torch.tensor(picks, dtype=torch.long, device=x.device)
        return MatchResult(indices=idx, weights=w, error=err)
    picks, w64 = _omp_fit(x, t, k)
    idx = torch.tensor(picks, dtype=torch.long, device=x.device)
    w = (w64 * n).to(device=x.device, dtype=torch.float32)
    rows = x[idx].double()
    err = float(torch.linalg.vector_norm((w64.to(x.device)[:, None] * rows).sum(0) - t.double()))
    return MatchResult(indices=idx, weights=w, error=err)


# --------------------------------------------------------------------------- uniform


def _greedy_uniform(x: Tensor, t: Tensor, k: int) -> tuple[list[int], Tensor]:
    """Greedy forward selection; returns (picks, sum of the picked rows)."""
    n = x.shape[0]
    total = torch.zeros_like(t)
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    buf = torch.empty_like(x)
    err = x.new_empty(n)
    picks: list[int] = []
    for step in range(k):
        # error^2 of the mean if row j is added, for every j at once
        torch.add(x, total, out=buf)
        buf.div_(step + 1).sub_(t).square_()
        torch.sum(buf, dim=1, out=err)
        err.masked_fill_(chosen, float("inf"))
        j = int(torch.argmin(err))  # first minimum: ties to the lowest index
        picks.append(j)
        chosen[j] = True
        total += x[j]
    return picks, total


# --------------------------------------------------------------------------- fit


def _omp_fit(x: Tensor, t: Tensor, k: int) -> tuple[list[int], Tensor]:
    """OMP with simplex-constrained NNLS refits; returns (picks, weights summing to 1).

    Works on the ``[n, n]`` Gram matrix in float64 on the CPU (``n`` is the
    number of rows of one source, about a hundred), so every NNLS solve is a
    handful of tiny linear systems.
    """
    b = (x.double() - t.double()).cpu()  # rows b_j = f_j - target
    n = b.shape[0]
    gram = b @ b.T
    # scale of the sum-to-one row: the mean squared row norm keeps the
    # augmented system balanced; any c > 0 gives the same weights
    c2 = float(gram.diagonal().mean()) if n else 0.0
    if not c2 > 0:
        c2 = 1.0
    aug = gram + c2  # [B; c 1']' [B; c 1'] = B B' + c^2 1 1'
    sq = gram.diagonal()
    first = int(torch.argmin(sq))  # the single row closest to the target
    picks = [first]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[first] = True
    u = _nnls_gram(aug[picks][:, picks], torch.full((1,), c2, dtype=torch.float64))
    for _ in range(k - 1):
        # correlation <f_j - t, t - fit> (up to a positive factor) for every row
        corr = -(gram[:, picks] @ u)
        corr.masked_fill_(chosen, float("-inf"))
        j = int(torch.argmax(corr))  # first maximum: ties to the lowest index
        picks.append(j)
        chosen[j] = True
        sel = torch.tensor(picks)
        # warm start: the previous optimum, with the new row at weight 0
        u0 = torch.cat([u, u.new_zeros(1)])
        u = _nnls_gram(aug[sel][:, sel], torch.full((len(picks),), c2, dtype=torch.float64), u0)
    s = u.sum()
    w = u / s if s > 0 else torch.full_like(u, 1.0 / len(u))
    return picks, w


def _nnls_gram(g: Tensor, h: Tensor, u0: Tensor | None = None) -> Tensor:
    """Lawson-Hanson NNLS on the normal equations: ``min_{u >= 0} u'Gu - 2h'u``.

    ``g`` is ``[s, s]`` symmetric positive semi-definite (float64), ``h`` ``[s]``.
    Rank-deficient ``g`` (duplicate rows) is handled by least-squares solves.
    ``u0`` (optional, ``>= 0``) warm-starts the active set: the least-squares
    optimum on its support, as OMP's previous fit is.
    """
    s = h.shape[0]
    eps = torch.finfo(torch.float64).eps
    tol = 10 * eps * max(1.0, float(g.abs().max())) * s
    if u0 is None:
        u = torch.zeros(s, dtype=torch.float64)
    else:
        u = u0.clamp(min=0).to(torch.float64)
    passive = u > 0
    grad = h - g @ u
    for _ in range(3 * s + 10):
        free = ~passive
        if not bool(free.any()) or float(grad[free].max()) <= tol:
            break
        j = int(torch.argmax(torch.where(free, grad, torch.full_like(grad, -torch.inf))))
        passive[j] = True
        for _ in range(3 * s + 10):
            z = torch.zeros(s, dtype=torch.float64)
            p = passive.nonzero().flatten()
            z[p] = _solve(g[p][:, p], h[p])
            if bool((z[p] > 0).all()):
                u = z
                break
            # step back towards u until the first passive entry hits zero
            neg = passive & (z <= 0)
            alpha = float((u[neg] / (u[neg] - z[neg])).min())
            u = u + alpha * (z - u)
            passive &= u > 16 * eps * max(float(u.max()), torch.finfo(torch.float64).tiny)
            u = torch.where(passive, u, torch.zeros_like(u))
            if not bool(passive.any()):
                break
        grad = h - g @ u
    return u


def _solve(g: Tensor, h: Tensor) -> Tensor:
    try:
        out = torch.linalg.solve(g, h)
        if bool(torch.isfinite(out).all()):
            residual = float(torch.linalg.vector_norm(g @ out - h))
            if residual <= 1e-9 * max(1.0, float(torch.linalg.vector_norm(h))):
                return out
    except RuntimeError:  # singular: duplicate or collinear rows
        pass
    return torch.linalg.lstsq(g, h[:, None], driver="gelsd").solution[:, 0]
