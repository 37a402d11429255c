"""The coreset selector: source batch -> features -> budgets -> medoids.

One call of :meth:`CoresetSelector.select` makes one step of CoLM
(see METHOD.md): keep every example of the small sources, split the remaining
budget across the big sources in proportion to their share of the batch,
compute Adam-normalised, sparsified gradient features of the last block's
value projection for the big-source examples, and pick each big source's
medoids by greedy facility location.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed, sharding
from .facility import facility_location
from .features import (
    MOMENTS,
    AdamNormalizer,
    GradientFeatures,
    Moments,
    draw_directions,
    find_value_block,
    lift,
    optimizer_moments,
)
from .features.table import DenseFeatures, StreamedFeatures
from .matching import gradient_match
from .models import eval_mode
from .sources import allocate_budget, find_small_sources

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


@dataclass
class SelectorConfig:
    """Configuration of :class:`CoresetSelector` (defaults follow the paper).

    Attributes:
        ratio: coreset size = round(ratio x source batch size), in (0, 1].
        size: fixed coreset size; overrides ``ratio`` when set.
        method: ``"colm"`` (the method: facility-location medoids of the big
            sources), ``"random"`` (uniform random subset of the same size: the
            baseline), ``"match"`` (as colm, but the big sources' examples are
            chosen to match the source's mean feature, GradMatch-style, see
            :mod:`colm.matching`; with ``weights="cluster"`` the weights are fitted)
            or ``"random_big"`` (small sources kept and the same per-source
            budgets as colm, big-source examples drawn at random: no features).
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
    method: str = "colm"
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


@dataclass
class Selection:
    """The result of one selection step.

    Attributes:
        indices: LongTensor of positions in the source batch, ascending.
        weights: float tensor, one per selected example (all 1 for uniform
            weights; cluster sizes for medoids with ``weights="cluster"``).
            Train with ``(weights * per_example_loss).sum() / weights.sum()``.
        stats: per-source counts (``in_batch``, ``kept``, ``selected``) and
            timings (``time_features``, ``time_selection`` in seconds).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)

    def shard(self, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``indices`` and ``weights`` that data-parallel rank ``rank`` of ``world``
        trains on: an equal, contiguous share of the coreset."""
        n = self.indices.numel()
        if n % world:
            raise ValueError(
                f"a coreset of {n} examples cannot be split equally over {world} processes; "
                "choose the coreset size (selector ratio or size) as a multiple of the "
                "number of processes"
            )
        start, end = distributed.share_bounds(n, world)[rank]
        return self.indices[start:end], self.weights[start:end]

    def flat_stats(self, prefix: str = "colm/") -> dict[str, float]:
        """Stats as a flat dict of numbers, for trainer logging."""
        out: dict[str, float] = {}
        for key, value in self.stats.items():
            if key == "sources":
                for src, counts in value.items():
                    for k, v in counts.items():
                        out[f"{prefix}{src}/{k}"] = v
            elif isinstance(value, (int, float)):
                out[f"{prefix}{key}"] = value
        return out


class SelectionOutOfMemoryError(RuntimeError):
    """Selection ran out of memory; the message names the setting to lower."""


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text


def _batch_sources(batch: Mapping[str, Any]) -> list[str]:
    if "source" not in batch:
        raise KeyError(
            "the batch has no 'source' entry; CoresetSelector.select needs one source name "
            "per example (batch['source'] = [...]); keep the source column through your collator"
        )
    src = batch["source"]
    if isinstance(src, torch.Tensor):
        raise TypeError("batch['source'] must be a list of source names (str), not a tensor")
    return [str(s) for s in src]


class CoresetSelector:
    """Picks a coreset of each source batch (CoLM).

    Args:
        config: a :class:`SelectorConfig`.
        source_counts: number of examples of each source in the whole training
            set (decides which sources are small).
        process_group: under data parallelism (``torch.distributed`` initialised),
            the group whose ranks share the work: every rank passes the same global
            source batch, computes features for its share, and all get the same
            selection (see :mod:`colm.distributed`). ``None``: select on this
            process alone.

    >>> selector = CoresetSelector(SelectorConfig(ratio=0.5), {"gsm": 9000, "gcd": 120})
    >>> sel = selector.select(model, batch)        # doctest: +SKIP
    >>> coreset = {k: v[sel.indices] for k, v in batch.items() if k != "source"}  # doctest: +SKIP
    """

    def __init__(
        self,
        config: SelectorConfig,
        source_counts: Mapping[str, int],
        process_group: Any = distributed.DEFAULT,
    ):
        self.config = config
        self.process_group = process_group
        self.source_counts = dict(source_counts)
        rule = config.small_sources
        self.small_sources = find_small_sources(
            self.source_counts, rule if isinstance(rule, (str, int, float)) else list(rule)
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.normalizer = AdamNormalizer(
            *config.adam_betas, eps=config.adam_eps, warm=config.moments == "warm"
        )
        self.step = 0
        self._features: GradientFeatures | None = None
        self._checked: set[int] = set()
        self._warned_nonfinite = False

    # -- public --------------------------------------------------------------
    def select(
        self, model: nn.Module, batch: Mapping[str, Any], optimizer: Any = None
    ) -> Selection:
        """Choose the coreset of ``batch`` (keys ``input_ids``, ``attention_mask``,
        ``labels``, ``source``). The model is put in eval mode during selection
        and restored afterwards; its parameters are never modified. ``optimizer``
        (the one training ``model``) is read, never changed, with
        ``moments="optimizer"``."""
        sources = _batch_sources(batch)
        n = len(sources)
        if n == 0:
            raise ValueError("cannot select from an empty batch")
        unknown = sorted(set(sources) - set(self.source_counts))
        if unknown:
            raise ValueError(
                f"batch has sources {unknown} that are not in source_counts "
                f"({sorted(self.source_counts)}); pass the counts of every source in the data"
            )
        b = self.config.coreset_size(n)
        info = distributed.process_info(self.process_group)
        if info.active and b % info.world:
            raise ValueError(
                f"the coreset of {b} examples (of a source batch of {n}) cannot be split "
                f"equally over {info.world} processes; choose the selector's ratio or size so "
                f"that the coreset is a multiple of {info.world}"
            )
        stats: dict[str, Any] = {
            "step": self.step,
            "source_batch": n,
            "coreset": b,
            "small_overflow": 0,
            "nonfinite": 0,
            "processes": info.world,
            "comm_bytes": 0,
            "time_features": 0.0,
            "time_selection": 0.0,
        }
        t0 = time.perf_counter()
        if info.active:
            stats["comm_bytes"] += distributed.check_same_batch(batch["input_ids"], sources, info)
        if self.config.method == "random":
            picked = torch.randperm(n, generator=self.generator)[:b]
            weight_of = {int(i): 1.0 for i in picked}
        else:
            weight_of = self._select_colm(model, batch, sources, b, stats, info, optimizer)

        indices = torch.tensor(sorted(weight_of), dtype=torch.long)
        weights = torch.tensor([weight_of[int(i)] for i in indices], dtype=torch.float32)
        if info.active:
            # every rank computed the same choice from the same bytes; rank 0's makes it certain
            indices, weights, received = distributed.broadcast_selection(indices, weights, info)
            stats["comm_bytes"] += received
        total = time.perf_counter() - t0
        stats["time_selection"] = total - stats["time_features"]
        per_source: dict[str, dict[str, int]] = {}
        for s in sorted(set(sources)):
            per_source[s] = {"in_batch": 0, "kept": 0, "selected": 0}
        for s in sources:
            per_source[s]["in_batch"] += 1
        for i in indices.tolist():
            per_source[sources[i]]["selected"] += 1
            if sources[i] in self.small_sources:
                per_source[sources[i]]["kept"] += 1
        stats["sources"] = per_source
        self.step += 1
        return Selection(indices=indices, weights=weights, stats=stats)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: step, generator, moments."""
        return {
            "step": self.step,
            "generator": self.generator.get_state(),
            "adam": self.normalizer.state_dict(),
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.normalizer.load_state_dict(state["adam"])

    # -- the method ----------------------------------------------------------
    def _features_for(self, model: nn.Module, b: int) -> GradientFeatures:
        chunk = self.config.chunk_size or b
        if self._features is None or self._features.model is not model:
            self._features = GradientFeatures(model, chunk_size=chunk)
        self._features.chunk_size = chunk
        return self._features

    def _select_colm(self, model, batch, sources, b, stats, info, optimizer) -> dict[int, float]:
        cfg = self.config
        if (
            cfg.method != "random_big"
            and cfg.adam
            and cfg.moments == "optimizer"
            and optimizer is None
        ):
            raise ValueError(
                "SelectorConfig.moments='optimizer' normalises the features with the training "
                "optimizer's Adam state: pass it, select(model, batch, optimizer=optimizer) "
                "(CoLMTrainer and coreset_step do), or use moments='warm'"
            )
        small_idx = [i for i, s in enumerate(sources) if s in self.small_sources]
        if len(small_idx) > b:
            # the paper is silent: keep a uniformly random b of them, and say so
            stats["small_overflow"] = len(small_idx) - b
            pick = torch.randperm(len(small_idx), generator=self.generator)[:b]
            small_idx = sorted(small_idx[int(j)] for j in pick)
        weight_of = {i: 1.0 for i in small_idx}

        groups: dict[str, list[int]] = {}
        for i, s in enumerate(sources):
            if s not in self.small_sources:
                groups.setdefault(s, []).append(i)
        budget = allocate_budget({s: len(ix) for s, ix in groups.items()}, b - len(small_idx))

        # sources whose budget covers all their examples need no features
        need = {s: ix for s, ix in groups.items() if 0 < budget[s] < len(ix)}
        for s, ix in groups.items():
            if budget[s] == len(ix):
                weight_of.update({i: 1.0 for i in ix})
        if not need:
            return weight_of
        if cfg.method == "random_big":
            # the features-free ablation: the budgets of colm, random picks within a source
            for s, ix in need.items():
                pick = torch.randperm(len(ix), generator=self.generator)[: budget[s]]
                weight_of.update({ix[int(j)]: 1.0 for j in pick})
            return weight_of
        if not cfg.per_source:
            need = {"*": sorted(i for ix in need.values() for i in ix)}
            budget = {"*": sum(budget[s] for s in groups if 0 < budget[s] < len(groups[s]))}

        rows = [i for ix in need.values() for i in ix]
        pos = {i: r for r, i in enumerate(rows)}
        t0 = time.perf_counter()
        with eval_mode(model), self._out_of_memory_hint(model, b):
            table = self._feature_table(model, batch, rows, b, info, stats)
            moments = self._moments(model, table, optimizer) if cfg.adam else None
            groups = [[pos[i] for i in ix] for ix in need.values()]
            per_group = table.source_features(groups, moments, cfg.topk_dims)
            stats["time_features"] = time.perf_counter() - t0
            finite = table.finite
            if not bool(finite.all()):
                stats["nonfinite"] = int((~finite).sum())
                if not self._warned_nonfinite:
                    warnings.warn(
                        "some examples have a non-finite loss in selection; they are excluded "
                        "(counted in stats['nonfinite'])",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    self._warned_nonfinite = True

            chosen_rows: list[int] = []
            for s, (r, fs) in zip(need, per_group):
                k = min(budget[s], r.numel())
                if k == 0:
                    continue
                if cfg.method == "match":
                    fit = "fit" if cfg.weights == "cluster" else "uniform"
                    fl = gradient_match(fs, k, weights=fit)
                else:
                    fl = facility_location(fs, k, metric=cfg.metric)
                for j, w in zip(fl.indices.tolist(), fl.weights.tolist()):
                    row = int(r[j])
                    chosen_rows.append(row)
                    weight_of[rows[row]] = float(w) if cfg.weights == "cluster" else 1.0
            if cfg.adam and cfg.moments != "optimizer" and chosen_rows:
                self.normalizer.update_means(*table.means(chosen_rows), used=moments)
        stats["streamed"] = table.streamed
        stats["feature_passes"] = table.passes
        return weight_of

    def _moments(self, model, table, optimizer) -> Moments:
        """The Adam moments to normalise this step's features with (see ``moments``)."""
        cfg = self.config
        if cfg.moments != "optimizer":
            return self.normalizer.moments_for(
                table.numel, lambda: table.batch_moments(*cfg.adam_betas, cfg.adam_eps)
            )
        block = self._features.block if self._features is not None else find_value_block(model)
        moments = optimizer_moments(optimizer, block)
        if moments is None:  # before the optimizer's first step: the batch's statistics
            moments = table.batch_moments(*cfg.adam_betas, cfg.adam_eps)
        return moments

    def _streams(self, rows: int, numel: int) -> bool:
        """Whether ``rows`` rows of ``numel`` features exceed ``max_feature_mb``."""
        budget = self.config.max_feature_mb
        return budget is not None and rows * numel * 4 > budget * 2**20

    def _feature_table(self, model, batch, rows: list[int], b: int, info, stats):
        """The features of ``rows`` of the batch: held whole ([len(rows), D]) or, past
        ``max_feature_mb``, streamed (:mod:`colm.features.table`). Under data
        parallelism each rank computes a contiguous share: zo coefficients are gathered
        and lifted on every rank; exact rows are gathered (held whole) or their sums
        reduced (streamed)."""
        cfg = self.config
        feats = self._features_for(model, b)
        directions = None
        if cfg.feature == "zo":
            # drawn on every rank from identical generator states: identical directions
            directions = draw_directions(cfg.num_directions, feats.numel, self.generator)
        streamed = self._streams(len(rows), feats.numel)
        mine, start = rows, 0
        if info.active:
            bounds = distributed.share_bounds(len(rows), info.world)
            start, end = bounds[info.rank]
            mine = rows[start:end]
        real = len(mine)
        if info.active and feats.replay.sharded:  # FSDP2: the same trunk passes on every rank
            mine = sharding.even_share(mine, rows, info.world, streamed and cfg.feature == "exact")
        idx = torch.tensor(mine, dtype=torch.long)
        ids = batch["input_ids"][idx]
        am = batch.get("attention_mask")
        am = am[idx] if am is not None else None
        labels = batch.get("labels")
        labels = labels[idx] if labels is not None else ids.masked_fill(am == 0, -100)
        if cfg.check_replay and id(model) not in self._checked and len(mine):
            feats.check(ids, am, labels)
            self._checked.add(id(model))

        if cfg.feature == "exact" and streamed:

            def exact_chunks(positions: Sequence[int] | None = None) -> Iterator:
                keep = torch.arange(len(mine))
                if positions is not None:
                    wanted = torch.tensor([p - start for p in positions], dtype=torch.long)
                    keep = wanted[(wanted >= 0) & (wanted < len(mine))]
                a = am[keep] if am is not None else None
                for r, g in feats.chunks(ids[keep], a, labels[keep], "exact"):
                    yield keep[r.cpu()] + start, g

            def reduce(t: torch.Tensor) -> torch.Tensor:
                if not info.active:
                    return t
                stats["comm_bytes"] += (info.world - 1) * t.numel() * t.element_size()
                return distributed.all_reduce_sum(t, info)

            return StreamedFeatures(exact_chunks, len(rows), feats.numel, reduce)

        local = feats.compute(
            ids, am, labels, cfg.feature, directions, cfg.eps, lifted=not (info.active or streamed)
        )[:real]
        if info.active:
            counts = [e - s for s, e in bounds]
            local, received = distributed.gather_rows(local, counts, info)
            stats["comm_bytes"] += received
        if cfg.feature == "zo" and streamed:
            coef, d = local, directions.to(local.device)

            def zo_chunks(positions: Sequence[int] | None = None) -> Iterator:
                order = torch.arange(len(rows)) if positions is None else torch.tensor(positions)
                for part in order.split(feats.chunk_size):
                    yield part, lift(coef[part.to(coef.device)], d)

            return StreamedFeatures(zo_chunks, len(rows), feats.numel)
        if cfg.feature == "zo" and info.active:
            local = lift(local, directions.to(local.device))
        return DenseFeatures(local)

    @contextmanager
    def _out_of_memory_hint(self, model, b: int) -> Iterator[None]:
        """Turn running out of memory in selection into an error that says what to lower."""
        cfg = self.config
        try:
            yield
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            chunk = self._features_for(model, b).chunk_size
            raise SelectionOutOfMemoryError(
                f"out of memory computing {cfg.feature!r} features in chunks of {chunk}: lower "
                f"the selector's chunk_size (now {chunk}; selector.chunk_size in a run config)"
                + ("" if cfg.feature == "zo" else ", or use feature='zo', which needs no backward")
                + "; selection memory grows with chunk_size x sequence length, and with the "
                "features held, rows x block size, which max_feature_mb (now "
                f"{cfg.max_feature_mb}) bounds by streaming them"
            ) from e
