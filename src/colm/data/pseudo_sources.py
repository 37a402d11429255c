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
2. :func:`cluster_embeddings`: k-means (scikit-learn) on the embeddings after
   per-dimension standardisation and L2 normalisation, so that a few
   high-magnitude hidden dimensions (common in LMs) do not decide the clusters
   alone, and Euclidean k-means behaves like clustering by cosine similarity.
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

# automatic k: the silhouette is compared for k = 2 .. min(MAX_AUTO_K, n - 1)
MAX_AUTO_K = 10
# silhouette scores are computed on at most this many examples (O(n^2) otherwise)
SILHOUETTE_SAMPLE = 2000
CLUSTER_PREFIX = "cluster_"


@dataclass
class PseudoSources:
    """The clusters that stand in for sources.

    ``labels[i]`` is example i's cluster name (``cluster_0`` is the largest);
    ``k`` the number of clusters; ``silhouettes`` the silhouette score per k
    tried by the automatic choice (empty when k was given); ``typical`` the
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
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
) -> PseudoSources:
    """k-means clusters of ``embeddings`` ([n, d]) as pseudo-sources.

    With ``k=None`` the number of clusters is chosen by the silhouette score
    over k = 2 .. min(max_k, n - 1): the silhouette compares each example's
    distance to its own cluster with the distance to the nearest other one, so it
    rewards clusters that are both tight and apart, needs no reference
    distribution (unlike the gap statistic, which would multiply the k-means
    runs by its reference draws) and costs one pairwise-distance pass per k
    (on a sample of at most SILHOUETTE_SAMPLE examples). The range is small on
    purpose: a source count beyond ~10 rarely helps selection and makes every
    cluster small, i.e. kept whole. The silhouette cannot score k = 1; data with
    no structure yields low scores for every k (see ``silhouettes``).

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
    z = _normalise(x)
    silhouettes: dict[int, float] = {}
    if k is None:
        if n < 3:
            raise DataError(
                f"choosing the number of clusters automatically needs at least 3 examples, "
                f"got {n}; set k (data.num_sources in a run config) to 1 or {n}",
                field="num_sources",
            )
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
    elif k == 1:
        labels = np.zeros(n, dtype=int)
    else:
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(z)
    return _result(labels, z, silhouettes, seed, None)


def _result(
    raw: np.ndarray, z: np.ndarray, silhouettes: dict[int, float], seed: int, note: str | None
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
) -> PseudoSources:
    """Pseudo-sources for tokenized ``examples`` (rows of ``tokenize_records``).

    Embeds every example with ``model`` (:func:`embed_examples`; pass
    ``embeddings`` to reuse a cached result) and clusters the embeddings
    (:func:`cluster_embeddings`; ``k=None`` chooses k by silhouette). Bad input
    (no examples, an example without tokens, k larger than the data or than its
    distinct examples) raises :class:`DataError` / ``ValueError`` naming the
    setting.
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
    return cluster_embeddings(embeddings, k=k, seed=seed, n_init=n_init, max_k=max_k)


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
