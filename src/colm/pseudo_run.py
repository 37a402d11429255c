"""``colm train`` with ``data.sources: auto``: pseudo-sources for the run directory.

:func:`assign_pseudo_sources` clusters the training examples before training (or
restores the assignment on resume) and writes ``pseudo_sources.json``; the embeddings
are kept in the run directory and, with ``data.embeddings_cache``, in a folder shared
by runs. :class:`WarmClustersWriter` writes ``pseudo_sources_warm.json`` when the
Trainer clusters again after ``data.cluster_after`` steps
(:mod:`colm.integrations.recluster`). The clustering itself is
:mod:`colm.data.pseudo_sources`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from .config import RunConfig
from .console import log as _log
from .files import atomic_write, write_text_atomic

PSEUDO_SOURCES_FILE = "pseudo_sources.json"
PSEUDO_EMBEDDINGS_FILE = "pseudo_sources_embeddings.npy"


def _fingerprint(cfg: RunConfig, examples: list[dict]) -> str:
    """Identifies the embedded data: the model, its dtype and every example's tokens."""
    import hashlib

    h = hashlib.sha256(f"{cfg.model.name}|{cfg.model.dtype}|".encode())
    for ex in examples:
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def assign_pseudo_sources(
    cfg: RunConfig,
    run: Path,
    model,
    tokenizer,
    examples: list[dict],
    resume: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    """data.sources=auto: set each tokenized example's ``source`` to its pseudo-source.

    A resumed run restores the assignment from RUN/pseudo_sources.json (no model
    pass). Otherwise the embeddings are reused from RUN/pseudo_sources_embeddings.npy
    when they were made from the same model and tokens, else computed; then they
    are clustered (data.num_sources, train.seed). The assignment is written with k,
    how k was found (the silhouette per k, where tried), each cluster's size and
    typical example (index and first words) and, when the data had source labels (the
    built-in mixture), the adjusted Rand index against them. Returns that record.
    """
    from .data.pseudo_sources import (
        PseudoSources,
        pseudo_sources,
    )

    path, cache = run / PSEUDO_SOURCES_FILE, run / PSEUDO_EMBEDDINGS_FILE
    fingerprint = _fingerprint(cfg, examples)
    saved = json.loads(path.read_text()) if path.exists() else None
    if resume and saved is not None and saved.get("fingerprint") == fingerprint:
        record = saved
        _log(f"pseudo-sources restored from {path} (k={record['k']})")
    else:
        if resume:
            _log(f"{path} is missing or was made for other data: computing pseudo-sources")
        embeddings = None
        if saved is not None and saved.get("fingerprint") == fingerprint and cache.exists():
            embeddings = np.load(cache)
            _log(f"pseudo-sources: reusing the embeddings in {cache}")
        elif cache.exists():
            cache.unlink()
        shared = None
        if cfg.data.embeddings_cache is not None:
            shared = Path(cfg.data.embeddings_cache) / f"pseudo_sources_{fingerprint[:32]}.npy"
            if embeddings is None and shared.exists():
                embeddings = _shared_embeddings(shared, model, examples)
                if embeddings is not None:
                    shared = None  # nothing new to write there
        embedding_s = 0.0  # seconds spent embedding in this run (0: reused)
        if embeddings is None:
            from .data.pseudo_sources import embed_examples

            t0 = time.perf_counter()
            embeddings = embed_examples(model, examples)
            embedding_s = time.perf_counter() - t0
        result = pseudo_sources(
            model,
            examples,
            k=cfg.data.num_sources,
            seed=cfg.train.seed,
            progress=False,
            embeddings=embeddings,
        )
        truth = [ex.get("source") for ex in examples]  # labelled data clustered anyway
        record = {
            "fingerprint": fingerprint,
            **describe(result, tokenizer, examples, truth),
            "embedding_s": embedding_s,
        }
        if write:
            np.save(cache, embeddings)
            if shared is not None:  # computed or taken from the run directory here
                with atomic_write(shared, "wb") as f:  # runs sharing the folder: never half
                    np.save(f, embeddings)
            write_text_atomic(path, json.dumps(record, indent=1))
    labels = PseudoSources.from_dict(record).labels
    if len(labels) != len(examples):
        raise ValueError(f"{path} assigns {len(labels)} examples, the data has {len(examples)}")
    for ex, label in zip(examples, labels):
        ex["source"] = label
    sizes = ", ".join(f"{n} {c}" for c, n in record["sizes"].items())
    _log(
        f"pseudo-sources: k={record['k']} ({sizes})"
        + (f"; {record['note']}" if record.get("note") else "")
        + f"; assignment in {path}"
    )
    return record


SPOT_CHECK_EXAMPLES = 2
SPOT_CHECK_COSINE = 0.999


def _shared_embeddings(path: Path, model, examples: list[dict]) -> np.ndarray | None:
    """The embeddings in a shared cache file, or None (with a notice) when they do not fit.

    The fingerprint names the model by its name, not its weights, so a spot check
    embeds the first examples again: different weights under the same name (a model
    fine-tuned and saved in place) give different embeddings, and the cache is redone.
    """
    from .data.pseudo_sources import embed_examples

    try:
        cached = np.load(path)
    except (OSError, ValueError) as exc:
        _log(f"pseudo-sources: {path} is unreadable ({exc}); embedding again")
        return None
    if cached.ndim != 2 or len(cached) != len(examples):
        _log(f"pseudo-sources: {path} holds {cached.shape}, not {len(examples)} rows; redoing it")
        return None
    n = min(SPOT_CHECK_EXAMPLES, len(examples))
    fresh = embed_examples(model, examples[:n], progress=False)
    if fresh.shape[1] != cached.shape[1]:
        _log(f"pseudo-sources: {path} was made by another model (width); embedding again")
        return None
    old = cached[:n]
    cos = (fresh * old).sum(1) / np.maximum(
        np.linalg.norm(fresh, axis=1) * np.linalg.norm(old, axis=1), 1e-30
    )
    if float(cos.min()) < SPOT_CHECK_COSINE:
        _log(
            f"pseudo-sources: {path} does not match this model's embeddings "
            f"(cosine {float(cos.min()):.4f} on a spot check); embedding again"
        )
        return None
    _log(f"pseudo-sources: reusing the shared embeddings in {path}")
    return cached


WARM_SOURCES_FILE = "pseudo_sources_warm.json"


def describe(result, tokenizer, examples: list[dict], truth: Sequence[Any]) -> dict[str, Any]:
    """A clustering as the run directory records it: labels, k, silhouettes, sizes, each
    cluster's typical example (index and first words) and, when the data had several
    source labels, the adjusted Rand index against them."""
    from .data.pseudo_sources import adjusted_rand_index, first_words

    record = result.as_dict()
    record["first_words"] = first_words(tokenizer, examples, result.typical)
    if len(set(truth)) > 1:
        record["ari_vs_labels"] = adjusted_rand_index(list(truth), result.labels)
    return record


class WarmClustersWriter(TrainerCallback):
    """Writes RUN/pseudo_sources_warm.json once the Trainer has clustered the data again
    (``data.cluster_after``), and says so."""

    def __init__(self, run: Path, trainer, tokenizer, truth: Sequence[Any]):
        self.path = run / WARM_SOURCES_FILE
        self.trainer, self.tokenizer, self.truth = trainer, tokenizer, list(truth)
        self.written: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        warm = self.trainer.colm_warm_sources
        if warm is None or self.written == warm[0]:
            return control
        step, result = warm
        record = {
            "step": step,
            **describe(result, self.tokenizer, self.trainer.train_dataset, self.truth),
        }
        write_text_atomic(self.path, json.dumps(record, indent=1))
        self.written = step
        sizes = ", ".join(f"{n} {c}" for c, n in record["sizes"].items())
        _log(
            f"pseudo-sources clustered again after step {step}: k={record['k']} ({sizes}); in {self.path}"
        )
        return control
