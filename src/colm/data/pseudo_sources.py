"""Pseudo-sources for data without source labels: k-means on the model's hidden states.

CoLM keeps small sources whole and selects from big ones, so it needs to know
which sub-dataset each example comes from. Most fine-tuning data has no such
label, yet is just as imbalanced. The paper's answer (its SuperGLUE runs) is to
cluster the model's own representations and treat the clusters as sources; this
module does that:

1. :func:`embed_examples`: every example once through the model, without
   gradients, stopping at the input of the LAST transformer block (the block
   the selector works on; located with :func:`colm.features.locate.find_layers`,
   the same locator the selector uses). The embedding is the mean of that hidden
   state over the example's real (non-padding) tokens.
2. :func:`cluster_embeddings`: the embeddings after per-dimension standardisation
   and L2 normalisation (so that a few high-magnitude hidden dimensions, common in
   LMs, do not decide the clusters alone, and Euclidean distances behave like
   cosine ones), clustered by k-means (scikit-learn) when k is given, and otherwise
   by density (HDBSCAN, scikit-learn), which finds the number of clusters itself and,
   unlike k-means with a silhouette-chosen k, isolates small sources instead of
   splitting big ones (see :func:`cluster_embeddings`).
3. :func:`pseudo_sources`: both, returning :class:`PseudoSources` (one label
   ``cluster_0``, ``cluster_1``, ... per example, largest cluster first).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..features.locate import _unwrap, find_layers
from ..features.replay import _StopForward
from ..models import eval_mode
from .errors import DataError

# automatic k, by density: HDBSCAN on the first PCA_DIMS principal components of at
# most DENSITY_SAMPLE examples, min_cluster_size MIN_CLUSTER_SIZE (less on small data),
# doubled while more than MAX_DENSITY_CLUSTERS clusters come out
PCA_DIMS = 50
DENSITY_SAMPLE = 5000
MIN_CLUSTER_SIZE = 15
MAX_DENSITY_CLUSTERS = 20
# automatic k, by silhouette (auto="silhouette", and the fallback when no dense group is
# found): the silhouette is compared for k = 2 .. min(MAX_AUTO_K, n - 1)
MAX_AUTO_K = 10
# silhouette scores are computed on at most this many examples (O(n^2) otherwise)
SILHOUETTE_SAMPLE = 2000
CLUSTER_PREFIX = "cluster_"


@dataclass
class PseudoSources:
    """The clusters that stand in for sources.

    ``labels[i]`` is example i's cluster name (``cluster_0`` is the largest);
    ``k`` the number of clusters; ``method`` how they were found (``"kmeans"``
    with k given, ``"density"`` or ``"silhouette"`` when k was chosen);
    ``min_cluster_size`` the density clustering's (None otherwise); ``silhouettes``
    the silhouette score per k tried by the silhouette choice (empty otherwise); ``typical`` the
    index of each cluster's example closest to its centroid, to show what a
    cluster holds; ``note`` says when the clustering was degenerate (e.g. all
    examples embed identically).
    """

    labels: list[str]
    k: int
    silhouettes: dict[int, float] = field(default_factory=dict)
    typical: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    note: str | None = None
    method: str = "kmeans"
    min_cluster_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "method": self.method,
            "min_cluster_size": self.min_cluster_size,
            "seed": self.seed,
            "silhouettes": {str(k): v for k, v in self.silhouettes.items()},
            "sizes": self.sizes,
            "typical": self.typical,
            "note": self.note,
            "labels": self.labels,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PseudoSources:
        return cls(
            labels=list(d["labels"]),
            k=int(d["k"]),
            silhouettes={int(k): float(v) for k, v in d.get("silhouettes", {}).items()},
            typical={str(k): int(v) for k, v in d.get("typical", {}).items()},
            sizes={str(k): int(v) for k, v in d.get("sizes", {}).items()},
            seed=int(d.get("seed", 0)),
            note=d.get("note"),
            method=str(d.get("method", "silhouette" if d.get("silhouettes") else "kmeans")),
            min_cluster_size=d.get("min_cluster_size"),
        )


def _token_rows(examples: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """Each example's real tokens (attention_mask 1), refusing examples without any."""
    if isinstance(examples, (Mapping, str, bytes)):
        raise DataError("pseudo_sources needs a list of tokenized examples, got a single one")
    rows = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            raise DataError(
                f"example {i} has no 'input_ids'; tokenize the data with tokenize_records first",
                index=i,
                field="input_ids",
            )
        ids = [int(t) for t in ex["input_ids"]]
        mask = ex.get("attention_mask")
        if mask is not None:
            ids = [t for t, m in zip(ids, mask) if int(m)]
        if not ids:
            raise DataError(
                f"example {i} has no tokens (an empty text); pseudo-sources embed every "
                "example: remove empty examples from the data",
                index=i,
                field="input_ids",
            )
        rows.append(ids)
    if not rows:
        raise DataError("pseudo_sources got no examples; the training data is empty")
    return rows


@torch.no_grad()
def embed_examples(
    model: nn.Module,
    examples: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """[n, hidden] float64: per example, the mean over its tokens of the hidden
    state that the last transformer block receives.

    The forward pass stops at that block (a pre-hook raises), so the last block
    and the LM head are never run. Examples are batched by length (sorted) to
    limit padding; padding is on the right, so with the causal mask it does not
    change the real tokens' states.
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected an integer >= 1")
    rows = _token_rows(examples)
    _, layers = find_layers(model)
    last = layers[-1]
    inner = _unwrap(model)
    device = next(inner.parameters()).device
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    out: np.ndarray | None = None
    handle = last.register_forward_pre_hook(hook, with_kwargs=True)
    with eval_mode(inner):
        try:
            bar = tqdm(total=len(rows), desc="pseudo-sources: embedding", disable=not progress)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(rows[i]) for i in idx)
                ids = torch.zeros(len(idx), width, dtype=torch.long)
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for j, i in enumerate(idx):
                    ids[j, : len(rows[i])] = torch.tensor(rows[i])
                    mask[j, : len(rows[i])] = 1
                ids, mask = ids.to(device), mask.to(device)
                captured.clear()
                with contextlib.suppress(_StopForward):  # the hook ends the pass at the block
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                if "h" not in captured:
                    raise RuntimeError("the forward pass never reached the last transformer block")
                h = captured["h"].float()
                m = mask.unsqueeze(-1).to(h.dtype)
                mean = ((h * m).sum(1) / m.sum(1)).double().cpu().numpy()
                if out is None:
                    out = np.empty((len(rows), mean.shape[1]), dtype=np.float64)
                out[idx] = mean
                bar.update(len(idx))
            bar.close()
        finally:
            handle.remove()
    assert out is not None
    return out


def _normalise(embeddings: np.ndarray) -> np.ndarray:
    """Standardise each dimension, then scale each row to unit length."""
    x = np.asarray(embeddings, dtype=np.float64)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _distinct(x: np.ndarray) -> int:
    """Number of distinct rows, up to float noise (batched padding changes the last bits)."""
    scale = max(float(np.abs(x).max()), 1e-12)
    return len(np.unique(np.round(x / scale, 6), axis=0))


def _check_k(k: Any, n: int, distinct: int) -> None:
    setting = "k (data.num_sources in a run config)"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(
            f"{setting}={k!r} is invalid; expected an integer >= 1, or None to choose the "
            "number of clusters automatically"
        )
    if k > n:
        raise DataError(
            f"{setting}={k} is larger than the data ({n} examples); set it to at most {n}, "
            "or None to choose it automatically",
            field="num_sources",
        )
    if k > distinct:
        raise DataError(
            f"{setting}={k} but only {distinct} of the {n} examples are distinct (the others "
            f"are duplicates); set it to at most {distinct}, or None to choose it automatically",
            field="num_sources",
        )


def cluster_embeddings(
    embeddings: np.ndarray,
    k: int | None = None,
    seed: int = 0,
    n_init: int = 10,
    max_k: int = MAX_AUTO_K,
    auto: str = "density",
) -> PseudoSources:
    """Clusters of ``embeddings`` ([n, d]) as pseudo-sources.

    With ``k`` given: k-means (``n_init`` starts, ``random_state=seed``).

    With ``k=None`` and ``auto="density"`` (the default) the number of clusters
    comes from the data's density: HDBSCAN (scikit-learn) on the first PCA_DIMS
    principal components, with ``min_cluster_size`` MIN_CLUSTER_SIZE (n // 8 on
    fewer than 8 x MIN_CLUSTER_SIZE examples; doubled while more than
    MAX_DENSITY_CLUSTERS clusters come out), fitted on at most DENSITY_SAMPLE
    examples; every example it leaves as noise (and every example outside the
    sample) joins the cluster with the nearest centroid. Why not k-means with a
    chosen k: CoLM needs clusters that keep the small sources apart, so that they
    are kept whole, and the big ones in one piece each. k-means (whose objective
    is the squared distance to the centroids) prefers splitting a big, spread-out
    source over isolating a small group, so a k that separates the small sources
    also cuts the big ones into pieces, some below the mean size and kept whole.
    A density clustering does not trade one for the other: any dense group of at
    least ``min_cluster_size`` examples becomes a cluster, whatever its size.
    Measured on 13 mixtures drawn from the built-in sources with SmolLM2's
    embeddings (``benchmarks/bench_pseudo_k.py``, docs/pseudo_sources.md).

    With ``auto="silhouette"`` (and as the fallback when HDBSCAN finds no dense
    group at all) k-means runs for k = 2 .. min(max_k, n - 1) and the k with the
    highest silhouette score is kept (on a sample of at most SILHOUETTE_SAMPLE
    examples). The silhouette cannot score k = 1; data with no structure yields
    low scores for every k (see ``silhouettes``).

    All examples embedding identically (duplicates only) give one cluster and a
    ``note``. Deterministic for a ``seed``.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"embeddings must be a non-empty [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(
            "the model's hidden states are not finite (NaN / inf) for some examples; "
            "check the model (dtype, weights) before computing pseudo-sources"
        )
    n = x.shape[0]
    distinct = _distinct(x)
    if k is not None:
        _check_k(k, n, distinct)
    if distinct == 1:
        note = (
            "a single example: one cluster"
            if n == 1
            else f"all {n} examples have the same embedding (duplicates only): one cluster; "
            "pseudo-sources cannot split such data"
        )
        warnings.warn(note, stacklevel=2)
        return _result(np.zeros(n, dtype=int), x, {}, seed, note)
    if auto not in ("density", "silhouette"):
        raise ValueError(f"auto={auto!r} is invalid; expected 'density' or 'silhouette'")
    z = _normalise(x)
    silhouettes: dict[int, float] = {}
    if k is None:
        if n < 3:
            raise DataError(
                f"choosing the number of clusters automatically needs at least 3 examples, "
                f"got {n}; set k (data.num_sources in a run config) to 1 or {n}",
                field="num_sources",
            )
        if auto == "density":
            found = _density_clusters(z, seed)
            if found is not None:
                labels, size = found
                return _result(labels, z, {}, seed, None, "density", size)
        best: tuple[float, int, np.ndarray] | None = None
        sample = min(n, SILHOUETTE_SAMPLE)
        for kk in range(2, min(max_k, n - 1, distinct) + 1):
            labels = KMeans(n_clusters=kk, n_init=n_init, random_state=seed).fit_predict(z)
            score = float(silhouette_score(z, labels, sample_size=sample, random_state=seed))
            silhouettes[kk] = score
            if best is None or score > best[0] + 1e-12:
                best = (score, kk, labels)
        if best is None:  # n == 3 with 2 distinct points, ...: no k in range
            labels = KMeans(n_clusters=distinct, n_init=n_init, random_state=seed).fit_predict(z)
        else:
            labels = best[2]
        return _result(labels, z, silhouettes, seed, None, "silhouette")
    elif k == 1:
        labels = np.zeros(n, dtype=int)
    else:
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(z)
    return _result(labels, z, silhouettes, seed, None)


def _density_clusters(z: np.ndarray, seed: int) -> tuple[np.ndarray, int] | None:
    """(labels, min_cluster_size) of the density clustering described in
    :func:`cluster_embeddings`, or None when it finds no cluster."""
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA
    from sklearn.metrics import pairwise_distances_argmin

    n, d = z.shape
    dims = min(PCA_DIMS, d, n - 1)
    y = PCA(n_components=dims, random_state=seed).fit_transform(z) if dims < d else z
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, DENSITY_SAMPLE, replace=False)) if n > DENSITY_SAMPLE else None
    fit = y if sample is None else y[sample]
    size = max(2, min(MIN_CLUSTER_SIZE, len(fit) // 8))
    while True:
        raw = HDBSCAN(min_cluster_size=size, copy=True).fit(fit).labels_
        found = int(raw.max()) + 1
        if found <= MAX_DENSITY_CLUSTERS or 2 * size > len(fit) // 2:
            break
        size *= 2
    if found == 0:
        return None
    centres = np.stack([fit[raw == c].mean(axis=0) for c in range(found)])
    labels = pairwise_distances_argmin(y, centres)  # noise and unsampled examples
    kept = np.flatnonzero(raw >= 0)
    labels[kept if sample is None else sample[kept]] = raw[kept]
    return labels, size


def _result(
    raw: np.ndarray,
    z: np.ndarray,
    silhouettes: dict[int, float],
    seed: int,
    note: str | None,
    method: str = "kmeans",
    min_cluster_size: int | None = None,
) -> PseudoSources:
    """Clusters renamed by size (cluster_0 largest; ties: earliest first example)."""
    ids = sorted(np.unique(raw), key=lambda c: (-int((raw == c).sum()), int(np.argmax(raw == c))))
    rename = {int(c): j for j, c in enumerate(ids)}
    idx = np.array([rename[int(c)] for c in raw])
    typical, sizes = {}, {}
    for j in range(len(ids)):
        members = np.flatnonzero(idx == j)
        centre = z[members].mean(axis=0)
        d = ((z[members] - centre) ** 2).sum(axis=1)
        name = f"{CLUSTER_PREFIX}{j}"
        typical[name] = int(members[int(np.argmin(d))])
        sizes[name] = len(members)
    return PseudoSources(
        labels=[f"{CLUSTER_PREFIX}{j}" for j in idx],
        k=len(ids),
        silhouettes=silhouettes,
        typical=typical,
        sizes=sizes,
        seed=seed,
        note=note,
        method=method,
        min_cluster_size=min_cluster_size,
    )


def pseudo_sources(
    model: nn.Module,
    examples: Sequence[Mapping[str, Any]],
    k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    n_init: int = 10,
    max_k: int = MAX_AUTO_K,
    progress: bool = True,
    embeddings: np.ndarray | None = None,
    auto: str = "density",
) -> PseudoSources:
    """Pseudo-sources for tokenized ``examples`` (rows of ``tokenize_records``).

    Embeds every example with ``model`` (:func:`embed_examples`; pass
    ``embeddings`` to reuse a cached result) and clusters the embeddings
    (:func:`cluster_embeddings`). Bad input
    (no examples, an example without tokens, k larger than the data or than its
    distinct examples) raises :class:`DataError` / ``ValueError`` naming the
    setting. ``k=None`` chooses the clusters by density (``auto="density"``) or by
    silhouette (``auto="silhouette"``): see :func:`cluster_embeddings`.
    """
    rows = _token_rows(examples)
    if k is not None:
        _check_k(k, len(rows), len(rows))
    if embeddings is None:
        embeddings = embed_examples(model, examples, batch_size=batch_size, progress=progress)
    elif len(embeddings) != len(rows):
        raise DataError(
            f"{len(embeddings)} cached embeddings for {len(rows)} examples; delete the cache"
        )
    return cluster_embeddings(embeddings, k=k, seed=seed, n_init=n_init, max_k=max_k, auto=auto)


def with_pseudo_sources(
    model: nn.Module,
    dataset: Any,
    k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    column: str = "source",
) -> tuple[Any, PseudoSources]:
    """``dataset`` (a list of tokenized rows or a ``datasets.Dataset``) with each row's
    ``column`` set to its pseudo-source, and the clustering. What
    ``CoLMTrainer(..., source_column=None)`` does with its training set."""
    result = pseudo_sources(model, dataset, k=k, seed=seed, batch_size=batch_size)
    if hasattr(dataset, "add_column"):  # datasets.Dataset
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        return dataset.add_column(column, result.labels), result
    rows = [{**row, column: label} for row, label in zip(dataset, result.labels)]
    return rows, result


def first_words(
    tokenizer: Any, examples: Sequence[Mapping[str, Any]], typical: Mapping[str, int], n: int = 12
) -> dict[str, str]:
    """Each cluster's typical example as text, so that a person can see what a cluster
    holds: its first ``n`` words after the lines all typical examples begin with (e.g. a
    chat template's system prompt)."""
    lines = {
        c: tokenizer.decode(examples[i]["input_ids"], skip_special_tokens=True).splitlines()
        for c, i in typical.items()
    }
    shared = len(os.path.commonprefix(list(lines.values()))) if len(lines) > 1 else 0
    return {c: " ".join(" ".join(t[shared:]).split()[:n]) for c, t in lines.items()}


def adjusted_rand_index(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Agreement of two labelings, 0 for chance, 1 for identical up to renaming."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(list(a), list(b)))


__all__ = [
    "CLUSTER_PREFIX",
    "PseudoSources",
    "adjusted_rand_index",
    "cluster_embeddings",
    "embed_examples",
    "first_words",
    "pseudo_sources",
    "with_pseudo_sources",
]
