"""Adam-moment normalisation of gradient features, and sparsification.

Training uses Adam, whose update is m_hat / (sqrt(v_hat) + eps), not the
gradient, so features are mapped the same way: for example i,
m_i = b1 m + (1 - b1) g_i, v_i = b2 v + (1 - b2) g_i^2 and
f_i = m_hat_i / (sqrt(v_hat_i) + eps) (:func:`adam_features`). Where the moments
m, v come from (``SelectorConfig.moments``):

* ``"fresh"`` (the paper's): the selector's own moments, starting from zero and
  bias-corrected with the selector's step count. At the first step m = v = 0, so
  f_i = g_i / (|g_i| + eps): every feature becomes its sign.
* ``"warm"``: the selector's own moments, started from the first batch's own
  statistics (m = mean g_i, v = mean g_i^2 over the examples) instead of zero, so
  nothing needs bias correction and the first step already sees a real
  per-coordinate scale.
* ``"optimizer"``: the training optimizer's Adam state of the block itself
  (``exp_avg``, ``exp_avg_sq``, its step and betas): the preconditioner Adam
  really applies, bias-corrected as Adam will at its next step. Before the
  optimizer's first step it has no state, and the batch's statistics stand in,
  as for ``"warm"``.

After selection the selector's own moments become the mean of m_i, v_i over the
selected examples, which (being linear in g_i and g_i^2) is
b1 m + (1 - b1) mean(g_sel) and b2 v + (1 - b2) mean(g_sel^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MOMENTS = ("fresh", "warm", "optimizer")


@dataclass
class Moments:
    """Adam moments of the value block: ``m``, ``v`` [D], the betas and eps, and the
    step to bias-correct with (``None``: the moments need no bias correction)."""

    m: torch.Tensor
    v: torch.Tensor
    beta1: float
    beta2: float
    eps: float
    step: int | None


def adam_features(g: torch.Tensor, moments: Moments) -> torch.Tensor:
    """f [n, D]: each row of ``g`` as Adam would turn it into an update, given ``moments``."""
    b1, b2 = moments.beta1, moments.beta2
    m = moments.m.to(g.device, torch.float32)
    v = moments.v.to(g.device, torch.float32)
    g = g.float()
    m_i = b1 * m + (1 - b1) * g
    v_i = b2 * v + (1 - b2) * g * g
    if moments.step is not None:
        m_i = m_i / (1 - b1**moments.step)
        v_i = v_i / (1 - b2**moments.step)
    return m_i / (v_i.sqrt() + moments.eps)


def batch_moments(g: torch.Tensor, beta1: float, beta2: float, eps: float) -> Moments:
    """Moments taken from the batch itself: m = mean g_i, v = mean g_i^2 (no bias)."""
    g = g.float()
    return Moments(g.mean(0), (g * g).mean(0), beta1, beta2, eps, None)


class AdamNormalizer:
    """The selector's own Adam moments of the features (selector state, checkpointed).

    ``warm=True`` starts them from the first batch's statistics instead of zero."""

    def __init__(
        self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, warm: bool = False
    ):
        self.beta1, self.beta2, self.eps, self.warm = beta1, beta2, eps, warm
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.step = 0
        self._used: Moments | None = None  # what the last normalize() used

    def _check(self, numel: int) -> None:
        if self.m is not None and self.m.numel() != numel:
            raise ValueError(
                f"selector moments have {self.m.numel()} entries but the features have {numel}; "
                "the model's value block changed since this selector state was saved"
            )

    def moments(self, g: torch.Tensor, rows: torch.Tensor | None = None) -> Moments:
        """The moments to normalise ``g`` [n, D] with at this step (a warm start takes
        the statistics of ``rows`` of ``g``, default all)."""
        return self.moments_for(
            g.shape[1],
            lambda: batch_moments(g if rows is None else g[rows], self.beta1, self.beta2, self.eps),
        )

    def moments_for(self, numel: int, batch: Callable[[], Moments]) -> Moments:
        """The moments for features of ``numel`` coordinates at this step; ``batch()``
        gives the batch's own statistics, called only when a warm start needs them."""
        self._check(numel)
        if self.m is None:
            if self.warm:
                return batch()
            zero = torch.zeros(numel, dtype=torch.float32)
            return Moments(zero, zero, self.beta1, self.beta2, self.eps, 1)
        step = None if self.warm else self.step + 1
        return Moments(self.m, self.v, self.beta1, self.beta2, self.eps, step)

    def normalize(self, g: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Features f [n, D] = m_hat_i / (sqrt(v_hat_i) + eps) at the next step (``rows``:
        the rows whose statistics a warm start takes)."""
        self._used = self.moments(g, rows)
        return adam_features(g, self._used)

    def update(self, g_selected: torch.Tensor) -> None:
        """Set the moments to the mean of m_i, v_i over the selected examples."""
        if g_selected.shape[0] == 0:
            return
        g = g_selected.float()
        # the moments the features were normalised with (warm start: the whole batch's)
        used = self._used or self.moments(g)
        self._used = None
        self.update_means(g.mean(0), (g * g).mean(0), used)

    def update_means(self, mean: torch.Tensor, mean_sq: torch.Tensor, used: Moments) -> None:
        """:meth:`update` from the selected examples' mean g and mean g^2 [D] and the
        moments ``used`` to normalise their features (:meth:`moments_for`)."""
        m, v = used.m.to(mean.device, torch.float32), used.v.to(mean.device, torch.float32)
        self.m = (self.beta1 * m + (1 - self.beta1) * mean.float()).cpu()
        self.v = (self.beta2 * v + (1 - self.beta2) * mean_sq.float()).cpu()
        self.step += 1

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "step": self.step, "warm": self.warm}

    def load_state_dict(self, state: dict) -> None:
        if "warm" in state and bool(state["warm"]) != self.warm:
            raise ValueError(
                f"the saved selector moments were {'warm' if state['warm'] else 'fresh'}-started "
                f"but this selector's are {'warm' if self.warm else 'fresh'}-started; resume with "
                "the SelectorConfig.moments the state was saved with"
            )
        self.m, self.v, self.step = state["m"], state["v"], int(state["step"])


def optimizer_moments(optimizer, block) -> Moments | None:
    """The training optimizer's Adam moments of the value block (``None`` before the
    optimizer's first step). ``block`` is a :class:`~colm.features.ValueBlock`."""
    inner = optimizer
    while hasattr(inner, "optimizer") and inner.optimizer is not inner:  # accelerate, ...
        inner = inner.optimizer
    name = type(inner).__name__
    if "DeepSpeed" in name or "Zero" in name or not hasattr(inner, "state"):
        raise ValueError(
            f"SelectorConfig.moments='optimizer' reads the optimizer's Adam state of the value "
            f"block, which {name} does not keep per parameter (DeepSpeed ZeRO partitions it); "
            "use moments='warm'"
        )
    param = block.parameter
    group = next((g for g in inner.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise ValueError(
            f"SelectorConfig.moments='optimizer': the optimizer does not train the value block "
            f"({block.module_name}); pass the optimizer that trains the model, or use "
            "moments='warm'"
        )
    state = inner.state.get(param) or {}
    if "exp_avg_sq" not in state:
        if state:
            raise ValueError(
                f"SelectorConfig.moments='optimizer' needs an Adam-family optimizer (state "
                f"exp_avg / exp_avg_sq); {name} keeps {sorted(state)}; use moments='warm'"
            )
        return None  # no step taken yet
    b1, b2 = group["betas"]
    step = int(float(state["step"])) + 1  # Adam's bias correction at its next step
    m = block.view(state["exp_avg"].detach()).reshape(-1)
    v = block.view(state["exp_avg_sq"].detach()).reshape(-1)
    return Moments(m.float(), v.float(), float(b1), float(b2), float(group["eps"]), step)


def top_dims(features: torch.Tensor, h: int) -> torch.Tensor:
    """Indices (ascending) of the ``h`` coordinates with the largest |mean| over rows.

    The means are ranked by their sums in float64, in which a sum of float32 rows of
    similar magnitude is exact whatever the order of the additions: the ranking,
    ties included, does not depend on how the rows were summed (streamed selection
    sums them a chunk at a time, :mod:`colm.features.table`)."""
    return top_of(features.sum(0, dtype=torch.float64), h)


def top_of(sums: torch.Tensor, h: int) -> torch.Tensor:
    """Indices (ascending) of the ``h`` largest |sums| (see :func:`top_dims`)."""
    h = min(h, sums.shape[-1])
    return torch.topk(sums.abs(), h, sorted=False).indices.sort().values
