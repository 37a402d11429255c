"""The coreset selector: source batch -> features -> budgets -> medoids.

One call of :meth:`CoresetSelector.select` makes one step of CoLM
(see METHOD.md): keep every example of the small sources, split the remaining
budget across the big sources in proportion to their share of the batch,
compute Adam-normalised, sparsified gradient features of the last block's
value projection for the big-source examples, and pick each big source's
medoids by greedy facility location.
"""

from __future__ import annotations

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
from .selector_config import FEATURES, METHODS, METRICS, PRESETS, WEIGHTS, SelectorConfig
from .sources import allocate_budget, find_small_sources

__all__ = [
    "FEATURES",
    "METHODS",
    "METRICS",
    "PRESETS",
    "WEIGHTS",
    "CoresetSelector",
    "Selection",
    "SelectionOutOfMemoryError",
    "SelectorConfig",
]


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
        if info.active and feats.replay.sharded:  # FSDP2, ZeRO-3: the same trunk passes
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
