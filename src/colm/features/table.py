"""A batch's gradient features as selection reads them: held whole, or streamed.

Selection needs, per big source, the Adam-normalised features of the source's
examples at the source's ``h`` top coordinates (largest |mean| over its rows),
plus batch statistics (a warm start's moments) and the selected examples' mean
g and g^2 (the selector's moment update). :class:`DenseFeatures` holds the
features of every row, [n, D]. With LoRA, D is small (8 x 960 numbers for
SmolLM2-135M at r = 8); in full fine-tuning the block is the value projection's
weight itself (1024 x 4096 = 4M numbers per example in Llama-3-8B), and n rows of
it (plus their normalised copy) would dwarf a training step's memory.

:class:`StreamedFeatures` gives the same answers (the same chunks, so the same
numbers, bitwise) while holding at most a chunk of rows of D numbers at a time:

1. one pass over the chunks sums each source's normalised features (and marks
   the non-finite rows); each source's top coordinates follow from the sums;
2. a second pass keeps each row's values at its source's top coordinates only,
   [n, h];
3. the moment update passes once more over the selected rows only.

A warm start's first step needs the batch's statistics before it can normalise:
one more pass then. Memory: a chunk of rows (raw and normalised), one [D] sum per
big source (float64, so that the top coordinates do not depend on the order of
the sums) and the [n, h] kept values; time: each pass recomputes the chunk's
features (exact features: a replay with backward per pass; zo: only the cheap
lifting of the stored coefficients, [n, q]).

Under data parallelism the table of ``exact`` features is streamed on every
rank over its own share of the rows; the sums, the finite flags and the kept
values are summed over the ranks (each rank contributes zeros elsewhere), so
every rank ends with the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .normalize import Moments, adam_features, top_dims, top_of

# (table positions [c], raw features [c, D]) for one chunk of this rank's rows
Chunks = Callable[[Sequence[int] | None], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _normalized(g: torch.Tensor, finite: torch.Tensor, moments: Moments | None) -> torch.Tensor:
    """Adam-normalised features of the finite rows of ``g``, zero rows elsewhere."""
    clean = torch.where(finite[:, None], g, torch.zeros_like(g))
    f = adam_features(clean, moments) if moments is not None else clean.float()
    return torch.where(finite[:, None], f, torch.zeros_like(f))


class DenseFeatures:
    """Every row's features held at once, ``g`` [n, D]: the plain path, and the slow
    twin the streamed one is tested against."""

    streamed = False

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.finite = torch.isfinite(g).all(1)
        self.numel = g.shape[1]
        self.passes = 0

    def batch_moments(self, beta1: float, beta2: float, eps: float) -> Moments:
        """m = mean g, v = mean g^2 over the finite rows (no bias correction)."""
        g = self.g[self.finite].float()
        return Moments(g.mean(0), (g * g).mean(0), beta1, beta2, eps, None)

    def source_features(
        self, groups: Sequence[Sequence[int]], moments: Moments | None, h: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group of table positions: (its finite positions, their normalised
        features at the group's ``h`` top coordinates [len, h'])."""
        f = _normalized(self.g, self.finite, moments)
        out = []
        for group in groups:
            pos = torch.tensor([p for p in group if bool(self.finite[p])], dtype=torch.long)
            fs = f[pos.to(f.device)]
            out.append((pos, fs[:, top_dims(fs, h)]))
        return out

    def means(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean g and mean g^2 [D] over ``positions``."""
        g = self.g[torch.tensor(list(positions), dtype=torch.long, device=self.g.device)].float()
        return g.mean(0), (g * g).mean(0)


class StreamedFeatures:
    """The answers of :class:`DenseFeatures` from ``chunks``, which yields this rank's
    rows a chunk at a time (all of them, or only ``positions`` when given), without
    ever holding more than a chunk of [D] rows.

    Args:
        chunks: ``chunks(positions)`` -> iterator of (table positions, raw features).
        n: rows in the table (over all ranks).
        numel: D, the feature width.
        reduce: sums a tensor over the ranks (identity in one process).
    """

    streamed = True

    def __init__(
        self,
        chunks: Chunks,
        n: int,
        numel: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ):
        self._chunks = chunks
        self.n, self.numel = n, numel
        self._reduce = reduce
        self._finite: torch.Tensor | None = None
        self.passes = 0

    def _pass(self, positions: Sequence[int] | None = None):
        self.passes += 1
        yield from self._chunks(positions)

    @property
    def finite(self) -> torch.Tensor:
        if self._finite is None:
            self._scan(None)
        return self._finite

    def _scan(self, moments: Moments | None, groups=None, group_of=None):
        """One pass: finite flags, and (``groups`` given) per-group sums of normalised
        features of the finite rows, [len(groups), D]."""
        bad = torch.zeros(self.n, dtype=torch.float64)
        sums = None
        for pos, g in self._pass():
            ok = torch.isfinite(g).all(1)
            bad[pos.cpu()] = (~ok).double().cpu()
            if groups is None:
                continue
            f = _normalized(g, ok, moments)
            if sums is None:  # float64: see top_dims
                sums = torch.zeros(len(groups), self.numel, dtype=torch.float64, device=f.device)
            index = group_of[pos.cpu()].to(f.device)
            keep = (index >= 0) & ok
            sums.index_add_(0, index[keep], f[keep].double())
        self._finite = self._reduce(bad) == 0
        if groups is not None and sums is None:
            sums = torch.zeros(len(groups), self.numel, dtype=torch.float64)
        return None if groups is None else self._reduce(sums)

    def _sums(self, positions: Sequence[int] | None = None):
        """One pass: sum g and sum g^2 [D] over the finite rows (of ``positions``), and
        each row's non-finite flag [n] (zero for rows not visited)."""
        bad = torch.zeros(self.n, dtype=torch.float64)
        s = s2 = None
        for pos, g in self._pass(positions):
            ok = torch.isfinite(g).all(1)
            bad[pos.cpu()] = (~ok).double().cpu()
            g = g[ok].float()
            if s is None:
                s = torch.zeros(self.numel, dtype=torch.float32, device=g.device)
                s2 = torch.zeros_like(s)
            s += g.sum(0)
            s2 += (g * g).sum(0)
        if s is None:
            s = s2 = torch.zeros(self.numel, dtype=torch.float32)
        return self._reduce(s), self._reduce(s2), self._reduce(bad)

    def batch_moments(self, beta1: float, beta2: float, eps: float) -> Moments:
        """m = mean g, v = mean g^2 over the finite rows, in one pass (which also
        finds the finite rows)."""
        s, s2, bad = self._sums()
        self._finite = bad == 0
        count = max(1, int(self._finite.sum()))
        return Moments(s / count, s2 / count, beta1, beta2, eps, None)

    def source_features(
        self, groups: Sequence[Sequence[int]], moments: Moments | None, h: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """As :meth:`DenseFeatures.source_features`, in two passes."""
        group_of = torch.full((self.n,), -1, dtype=torch.long)
        for j, group in enumerate(groups):
            group_of[torch.tensor(list(group), dtype=torch.long)] = j
        sums = self._scan(moments, groups, group_of)
        finite = self._finite
        kept = [torch.tensor([p for p in g if bool(finite[p])], dtype=torch.long) for g in groups]
        dims = [top_of(sums[j], h) for j in range(len(groups))]
        device = sums.device
        del sums
        width = min(h, self.numel)
        values = torch.zeros(self.n, width, dtype=torch.float32, device=device)
        for pos, g in self._pass():
            ok = torch.isfinite(g).all(1)
            f = _normalized(g, ok, moments)
            for r, p in enumerate(pos.tolist()):
                j = int(group_of[p])
                if j >= 0 and bool(ok[r]):
                    values[p] = f[r, dims[j].to(f.device)]
        values = self._reduce(values)
        return [(k, values[k.to(values.device)]) for k in kept]

    def means(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean g and mean g^2 [D] over ``positions`` (finite rows, as the selected
        ones are): one pass over those rows only."""
        s, s2, _ = self._sums(list(positions))
        count = max(1, len(positions))
        return s / count, s2 / count
