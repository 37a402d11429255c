"""Which number of pseudo-sources protects the small sources? (the pseudo-sources issue)

colm keeps small sources whole and selects from big ones. On data without labels the
sources are k-means clusters of the model's hidden states (``data.sources: auto``), and
the small-source rule is applied to the clusters. This re-clusters the embeddings a
finished ``random_big_pseudo`` run of ``bench_quality.py`` made (no model pass) for
each k, and counts, against the data's true sources:

* the adjusted Rand index;
* the examples of true small sources that land in clusters kept whole (the true labels
  keep all of them), and the examples of big sources kept whole with them (the true
  labels keep none).

Small sources and kept clusters follow the selector's rule (``--rule``, the default
``below_mean``: sources, or clusters, smaller than the mean size).

    python benchmarks/bench_quality.py --variants random_big_pseudo --seeds 0 --device cpu
    python benchmarks/bench_pseudo_k.py --run benchmarks/results/quality/runs/random_big_pseudo-seed0
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from colm.data.pseudo_sources import adjusted_rand_index, cluster_embeddings  # noqa: E402

KS = (4, 6, 8, 10, 12, 16, 20, 24)


def kept_whole(labels: Sequence[str]) -> set[str]:
    """The labels the ``below_mean`` rule keeps whole: those with fewer examples than
    the mean count per label."""
    sizes = collections.Counter(labels)
    mean = len(labels) / len(sizes)
    return {name for name, n in sizes.items() if n < mean}


def scan(
    embeddings: np.ndarray, truth: Sequence[str], ks: Sequence[int], seed: int = 0
) -> list[dict]:
    """One row per k: ARI, and the small-source / big-source examples kept whole."""
    small = kept_whole(truth)
    rows = []
    for k in ks:
        labels = cluster_embeddings(embeddings, k=k, seed=seed).labels
        kept = kept_whole(labels)
        whole = [lab in kept for lab in labels]
        rows.append(
            {
                "k": k,
                "ari": adjusted_rand_index(list(truth), labels),
                "small_kept": sum(w for t, w in zip(truth, whole) if t in small),
                "small_total": sum(t in small for t in truth),
                "big_kept": sum(w for t, w in zip(truth, whole) if t not in small),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| k | ARI | small-source examples kept whole | big-source examples kept whole |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['ari']:.2f} | {r['small_kept']} / {r['small_total']} "
            f"| {r['big_kept']} |"
        )
    return "\n".join(lines)


def _truth(run: Path) -> list[str]:
    """The true source of every training example of ``run``, in the embeddings' order
    (the run's tokenized examples, as colm train made them)."""
    from colm.config import load_config
    from colm.data import tokenize_records
    from colm.models import load_model
    from colm.train import load_data

    cfg = load_config(run / "config.yaml")
    records, _, _ = load_data(cfg)
    _, tokenizer = load_model(cfg.model.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        examples, _ = tokenize_records(
            records, tokenizer, max_length=cfg.data.max_length, overflow=cfg.data.overflow
        )
    return [e["source"] for e in examples]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished random_big_pseudo run directory")
    p.add_argument("--ks", default=",".join(map(str, KS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    run = Path(a.run)
    embeddings = np.load(run / "pseudo_sources_embeddings.npy")
    truth = _truth(run)
    if len(truth) != len(embeddings):
        raise SystemExit(f"{run}: {len(embeddings)} embeddings but {len(truth)} examples")
    rows = scan(embeddings, truth, [int(k) for k in a.ks.split(",")], a.seed)
    print(table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
