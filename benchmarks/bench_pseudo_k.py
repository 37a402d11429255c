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

The same is counted for the automatic choices (``auto:density``, colm's default, and
``auto:silhouette``), on the whole mixture and, with ``--mixtures N``, on N more
mixtures drawn from the same examples: some big sources (300-1000 examples each) and a
few small ones (15-50 examples each, drawn from the small sources and the big sources
left out), so that which sources are small, and how small, varies.

Small sources and kept clusters follow the selector's rule (the default
``below_mean``: sources, or clusters, smaller than the mean size).

    python benchmarks/bench_quality.py --variants random_big_pseudo --seeds 0 --device cpu
    python benchmarks/bench_pseudo_k.py --run benchmarks/results/quality/runs/random_big_pseudo-seed0 \
        --mixtures 12
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


AUTO = ("auto:density", "auto:silhouette")


def scan(
    embeddings: np.ndarray, truth: Sequence[str], ks: Sequence[int | str], seed: int = 0
) -> list[dict]:
    """One row per k (an int, or "auto:density" / "auto:silhouette" for colm's automatic
    choices): ARI, and the small-source / big-source examples kept whole. ``clustering``
    is the k asked for and ``k_found`` the k used; ``k`` labels the row ("auto:density
    (4)" for an automatic choice)."""
    small = kept_whole(truth)
    rows = []
    for k in ks:
        auto = k.split(":")[1] if isinstance(k, str) else None
        res = cluster_embeddings(
            embeddings, k=None if auto else k, seed=seed, auto=auto or "density"
        )
        labels = res.labels
        kept = kept_whole(labels)
        whole = [lab in kept for lab in labels]
        rows.append(
            {
                "k": f"{k} ({res.k})" if auto else k,
                "clustering": k,
                "k_found": res.k,
                "ari": adjusted_rand_index(list(truth), labels),
                "small_kept": sum(w for t, w in zip(truth, whole) if t in small),
                "small_total": sum(t in small for t in truth),
                "big_kept": sum(w for t, w in zip(truth, whole) if t not in small),
            }
        )
    return rows


def mixtures(truth: Sequence[str], n: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """The whole data and ``n`` mixtures drawn from it: (name, example indices)."""
    truth = np.asarray(truth)
    rng = np.random.default_rng(seed)
    counts = collections.Counter(truth.tolist())
    big = sorted(s for s, c in counts.items() if c >= 300)
    rest = sorted(s for s in counts if s not in big)
    out = [("whole", np.arange(len(truth)))]
    for i in range(n):
        chosen = rng.choice(big, rng.integers(2, len(big) + 1), replace=False)
        pool = rest + [s for s in big if s not in chosen]
        small = rng.choice(pool, min(len(pool), int(rng.integers(2, 6))), replace=False)
        idx: list[int] = []
        for names, lo, hi in ((chosen, 300, 1000), (small, 15, 50)):
            for name in names:
                ix = np.flatnonzero(truth == name)
                idx += rng.choice(
                    ix, min(len(ix), int(rng.integers(lo, hi))), replace=False
                ).tolist()
        out.append((f"mixture {i + 1}", np.sort(np.asarray(idx))))
    return out


def compare(
    embeddings: np.ndarray, truth: Sequence[str], n: int, ks: Sequence[int | str], seed: int = 0
) -> list[dict]:
    """Each way of clustering (``ks``) on the whole data and ``n`` drawn mixtures."""
    truth = np.asarray(truth)
    rows = []
    for name, idx in mixtures(truth, n, seed):
        sizes = collections.Counter(truth[idx].tolist())
        for row in scan(embeddings[idx], truth[idx].tolist(), ks, seed):
            rows.append({"mixture": name, "sources": dict(sizes.most_common()), **row})
    return rows


def summary(rows: list[dict]) -> str:
    """Per way of clustering, over the mixtures: mean ARI and the totals kept whole."""
    lines = [
        "| clustering | mixtures | mean ARI | small-source examples kept whole "
        "| big-source examples kept whole |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in dict.fromkeys(r["clustering"] for r in rows):
        mine = [r for r in rows if r["clustering"] == m]
        found = sorted({r["k_found"] for r in mine})
        label = f"{m} (k = {', '.join(map(str, found))})" if m in AUTO else str(m)
        lines.append(
            f"| {label} | {len(mine)} | {np.mean([r['ari'] for r in mine]):.2f} "
            f"| {sum(r['small_kept'] for r in mine)} / {sum(r['small_total'] for r in mine)} "
            f"| {sum(r['big_kept'] for r in mine)} |"
        )
    return "\n".join(lines)


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
    p.add_argument("--ks", default=",".join(map(str, (*AUTO, *KS))))
    p.add_argument("--mixtures", type=int, default=0, help="drawn mixtures besides the whole")
    p.add_argument(
        "--compare", default=",".join((*AUTO, "12")), help="clusterings run on the mixtures"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    run = Path(a.run)
    embeddings = np.load(run / "pseudo_sources_embeddings.npy")
    truth = _truth(run)
    if len(truth) != len(embeddings):
        raise SystemExit(f"{run}: {len(embeddings)} embeddings but {len(truth)} examples")

    def ks(text: str) -> list[int | str]:
        return [k if k in AUTO else int(k) for k in text.split(",")]

    rows = scan(embeddings, truth, ks(a.ks), a.seed)
    print(table(rows))
    result: dict = {"whole": rows}
    if a.mixtures:
        drawn = compare(embeddings, truth, a.mixtures, ks(a.compare), a.seed)
        print()
        for r in drawn:
            if r["k"] == drawn[0]["k"]:  # once per mixture
                print(f"{r['mixture']}: {r['sources']}")
        print()
        print(table([{**r, "k": f"{r['mixture']}: {r['k']}"} for r in drawn]))
        print()
        print(summary(drawn))
        result["mixtures"] = drawn
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
