"""What the coreset selector does, as one dataclass: :class:`SelectorConfig`, and the
named configurations (:data:`PRESETS`) it can start from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .features.normalize import MOMENTS

METHODS = ("colm", "random", "match", "random_big")
FEATURES = ("zo", "exact")
METRICS = ("l1", "l2", "cosine")
WEIGHTS = ("uniform", "cluster")


# Named configurations; every field not named takes the SelectorConfig default.
PRESETS: dict[str, dict[str, Any]] = {
    # CoLM exactly as the paper configures it (METHOD.md): zeroth-order features with one
    # fresh direction per step, the selector's own Adam moments from zero, top-2560
    # coordinates per source, L1 facility location per source, uniform weights
    "paper": {
        "method": "colm",
        "small_sources": "below_mean",
        "feature": "zo",
        "num_directions": 1,
        "eps": 1e-3,
        "adam": True,
        "moments": "fresh",
        "topk_dims": 2560,
        "metric": "l1",
        "weights": "uniform",
        "per_source": True,
    },
}


# What method="random_big" ignores: settings of the gradient features and of facility
# location, with the values the defaults give them (the paper's).
_FEATURE_SETTINGS: dict[str, Any] = {
    "feature": "zo",
    "num_directions": 1,
    "eps": 1e-3,
    "adam": True,
    "moments": "fresh",
    "topk_dims": 2560,
    "metric": "l1",
    "weights": "uniform",
    "per_source": True,
}


@dataclass
class SelectorConfig:
    """Configuration of :class:`CoresetSelector`.

    The default selection is ``method="random_big"``: every example of the small
    sources, the paper's per-source budgets for the big ones, and random picks within
    a big source, with no gradient features. On the measurements in
    ``benchmarks/RESULTS.md`` no feature-based selection (the paper's included) gave a
    lower held-out loss than it, at equal steps or at equal wall time, and it skips the
    feature pass. The paper's selection is ``SelectorConfig.preset("paper")``
    (``method="colm"`` with the feature settings below at their defaults).

    Attributes:
        ratio: coreset size = round(ratio x source batch size), in (0, 1].
        size: fixed coreset size; overrides ``ratio`` when set.
        method: ``"random_big"`` (the default: small sources kept, the paper's
            per-source budgets, big-source examples drawn at random: no features),
            ``"colm"`` (the paper's: facility-location medoids of the big sources'
            gradient features), ``"match"`` (as colm, but the big sources' examples are
            chosen to match the source's mean feature, GradMatch-style, see
            :mod:`colm.matching`; with ``weights="cluster"`` the weights are fitted)
            or ``"random"`` (uniform random subset of the same size: the baseline).
            The settings from ``feature`` to ``per_source`` below apply to ``"colm"``
            and ``"match"``; setting one of them away from its default with
            ``"random_big"`` is an error, as it would do nothing.
        small_sources: which sources are kept whole: ``"below_mean"`` (count
            below the mean source size), a number c (count < total / c), or an
            explicit list of names (``[]`` keeps none).
        feature: ``"zo"`` (zeroth-order estimate, the paper's) or ``"exact"``
            (exact gradient through the last block).
        num_directions: random directions per step for ``zo``.
        eps: finite-difference step for ``zo``.
        adam: normalise features with Adam moments (see :mod:`colm.features.normalize`).
        moments: where those moments come from: ``"fresh"`` (the paper's: the
            selector's own, from zero; the first step maps every feature to its
            sign), ``"warm"`` (the selector's own, started from the first batch's
            statistics) or ``"optimizer"`` (the training optimizer's Adam state of
            the block, the preconditioner training applies; pass the optimizer to
            :meth:`CoresetSelector.select`, which the Trainer integration and
            ``coreset_step`` do).
        topk_dims: h, the coordinates kept per source (largest |mean|).
        metric: distance for facility location: ``"l1"``, ``"l2"``, ``"cosine"``.
        weights: ``"uniform"`` or ``"cluster"`` (medoid weight = cluster size).
        per_source: pick medoids per big source (paper) or jointly (ablation).
        seed: seeds the selector's own ``torch.Generator``.
        chunk_size: examples per replay chunk (default: the coreset size, so
            selection never holds more activations than the training step).
        max_feature_mb: the most MiB of features (rows x block size x 4 bytes)
            selection holds at once; past it the features are streamed a chunk at a
            time (the same selection, a replay pass more: see
            :mod:`colm.features.table`). LoRA blocks stay far below it; full
            fine-tuning of a wide model (the value projection's whole weight, 4M
            numbers per example in an 8B Llama) streams. ``None``: never stream.
        check_replay: on the first step, verify that the replayed last block
            reproduces the full model's per-example losses.
    """

    ratio: float = 0.5
    size: int | None = None
    method: str = "random_big"
    small_sources: str | float | Sequence[str] = "below_mean"
    feature: str = "zo"
    num_directions: int = 1
    eps: float = 1e-3
    adam: bool = True
    moments: str = "fresh"
    topk_dims: int = 2560
    metric: str = "l1"
    weights: str = "uniform"
    per_source: bool = True
    seed: int = 0
    chunk_size: int | None = None
    max_feature_mb: float | None = 256.0
    check_replay: bool = True
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self):
        def bad(key, value, valid):
            raise ValueError(f"SelectorConfig.{key}={value!r} is invalid; expected {valid}")

        if isinstance(self.ratio, bool) or not (0 < float(self.ratio) <= 1):
            bad("ratio", self.ratio, "a number in (0, 1]")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            bad("size", self.size, "a positive integer or None")
        for key, valid in (
            ("method", METHODS),
            ("feature", FEATURES),
            ("metric", METRICS),
            ("weights", WEIGHTS),
            ("moments", MOMENTS),
        ):
            if getattr(self, key) not in valid:
                bad(key, getattr(self, key), f"one of {valid}")
        if not isinstance(self.num_directions, int) or self.num_directions < 1:
            bad("num_directions", self.num_directions, "an integer >= 1")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            bad("eps", self.eps, "a number > 0")
        if not isinstance(self.topk_dims, int) or self.topk_dims < 1:
            bad("topk_dims", self.topk_dims, "an integer >= 1")
        if self.chunk_size is not None and (
            not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            bad("chunk_size", self.chunk_size, "a positive integer or None")
        mb = self.max_feature_mb
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb < 0):
            bad("max_feature_mb", mb, "a number of MiB >= 0 (0: always stream) or None")
        b1, b2 = self.adam_betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            bad("adam_betas", self.adam_betas, "two numbers in [0, 1)")
        sm = self.small_sources
        if isinstance(sm, str) and sm != "below_mean":
            bad("small_sources", sm, "'below_mean', a number c > 0, or a list of source names")
        if self.method == "random_big":
            moved = [k for k, v in _FEATURE_SETTINGS.items() if getattr(self, k) != v]
            if moved:
                shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in moved)
                raise ValueError(
                    f"SelectorConfig.{moved[0]}={getattr(self, moved[0])!r} is invalid with "
                    f"method='random_big' (the default), which computes no features: {shown} "
                    "would do nothing. Set method='colm' (facility location on gradient "
                    "features, the paper's) or 'match' to use them"
                )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SelectorConfig:
        """A named configuration, with ``overrides`` on top: ``SelectorConfig.preset("paper")``
        is CoLM as the paper configures it (see :data:`PRESETS`)."""
        if name not in PRESETS:
            raise ValueError(
                f"SelectorConfig.preset={name!r} is invalid; expected one of {tuple(PRESETS)}"
            )
        return cls(**{**PRESETS[name], **overrides})

    def coreset_size(self, batch_size: int) -> int:
        """Coreset size for a source batch of ``batch_size`` examples."""
        if self.size is not None:
            if self.size > batch_size:
                raise ValueError(
                    f"SelectorConfig.size={self.size} is larger than the source batch "
                    f"({batch_size} examples); lower size or raise the source batch size"
                )
            return self.size
        return max(1, min(batch_size, math.floor(self.ratio * batch_size + 0.5)))
