"""Time facility location (L1) at the sizes CoLM uses, beside its peers, as a Markdown table.

    python benchmarks/bench_facility.py --repeats 50 --device cpu
    pip install -e ".[bench]"   # submodlib-py and apricot-select, to time them alongside

For each N in 128, 256, 512 (d = 2560 sparsified feature coordinates, as in the
paper, and k = N / 2) it times, on random float32 features:

* distance: ``pairwise_distances(x, "l1")`` and ``C - d`` (the same similarity is
  handed to every library, so all optimise the same objective);
* greedy: colm's ``facility_location(None, k, similarity=sim)`` (greedy + weights),
  submodlib's ``FacilityLocationFunction(mode="dense", sijs=sim).maximize(k,
  "LazyGreedy")`` and apricot's ``FacilityLocationSelection(k, "precomputed",
  optimizer="lazy").fit(sim)``, each where installed;
* total: distance + greedy for each library, and colm's ``facility_location(x, k)``
  end to end, timed on its own.

Each number is the median over ``--repeats`` runs after ``--warmup`` runs (apricot:
``--peer-repeats``, it takes seconds per call); the libraries alternate within each
repeat so that load on the machine falls on all of them alike. The objective values
F(S) of every library's set are printed too: they must agree (same greedy, ties aside).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from colm.facility import facility_location, pairwise_distances

TARGET_MS = {"cpu": 10.0, "cuda": 1.0}


def objective(sim: torch.Tensor, picks: list[int]) -> float:
    """F(S) = sum_i max_{s in S} sim[i, s]."""
    return float(sim[:, picks].max(dim=1).values.sum())


def peers(sim: torch.Tensor, k: int) -> dict[str, Callable[[], list[int]]]:
    """The installed peers' greedy on the same similarity: name -> call returning picks."""
    out: dict[str, Callable[[], list[int]]] = {}
    s = sim.double().cpu().numpy()
    try:
        from submodlib import FacilityLocationFunction

        def submodlib_lazy() -> list[int]:
            f = FacilityLocationFunction(n=s.shape[0], mode="dense", sijs=s, separate_rep=False)
            got = f.maximize(
                budget=k,
                optimizer="LazyGreedy",
                stopIfZeroGain=False,
                stopIfNegativeGain=False,
                verbose=False,
                show_progress=False,
            )
            return [int(i) for i, _ in got]

        out["submodlib LazyGreedy"] = submodlib_lazy
    except ImportError:
        pass
    try:
        from apricot import FacilityLocationSelection

        def apricot_lazy() -> list[int]:
            sel = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy")
            return [int(i) for i in sel.fit(s).ranking]

        out["apricot lazy"] = apricot_lazy
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per cell (median)")
    parser.add_argument("--peer-repeats", type=int, default=3, help="timed runs of apricot")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dim", type=int, default=2560, help="feature coordinates d")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="N values")
    parser.add_argument("--no-peers", action="store_true", help="time colm only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)
    gen = torch.Generator().manual_seed(args.seed)
    target = TARGET_MS.get(device.type)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1e3

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cores} CPU threads"
    print(f"facility location, L1, float32, d={args.dim}, k=N/2, {name}, torch {torch.__version__}")
    print(f"median of {args.repeats} runs after {args.warmup} warm-up runs\n")
    print("| N | library | distance (ms) | greedy (ms) | distance + greedy (ms) | F(S) |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.sizes:
        k = n // 2
        x = torch.randn(n, args.dim, generator=gen).to(device)

        def distance(x: torch.Tensor = x) -> torch.Tensor:
            d = pairwise_distances(x, "l1")
            return d.max() - d

        sim = distance()
        calls: dict[str, Callable[[], object]] = {
            "distance": distance,
            "colm": lambda sim=sim, k=k: facility_location(None, k, similarity=sim),
            "colm end to end": lambda x=x, k=k: facility_location(x, k, "l1"),
        }
        others = {} if args.no_peers else peers(sim, k)
        calls.update(others)
        for fn in calls.values():
            for _ in range(args.warmup if fn not in others.values() else 1):
                fn()
        sync()
        times: dict[str, list[float]] = {key: [] for key in calls}
        for r in range(args.repeats):
            for key, fn in calls.items():
                if key.startswith("apricot") and r >= args.peer_repeats:
                    continue
                times[key].append(timed(fn))
        med = {key: statistics.median(v) for key, v in times.items()}
        picks = {"colm": facility_location(None, k, similarity=sim).indices.tolist()}
        picks.update({key: fn() for key, fn in others.items()})
        sim_cpu = sim.double().cpu()
        for key in ["colm", *others]:
            f = objective(sim_cpu, picks[key])
            total = med["distance"] + med[key]
            print(
                f"| {n} | {key} | {med['distance']:.2f} | {med[key]:.2f} | {total:.2f} | {f:.6g} |"
            )
        e2e = med["colm end to end"]
        note = f" ({e2e / target:.2f}x the {target:g} ms target)" if n == 128 and target else ""
        print(f"| {n} | colm, `facility_location(x, k)` on its own{note} | | | {e2e:.2f} | |")


if __name__ == "__main__":
    main()
