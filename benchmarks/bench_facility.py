"""Time facility location (L1) at the sizes CoLM uses and print a Markdown table.

    python benchmarks/bench_facility.py --repeats 20 --device cpu

For each N in 128, 256, 512 (d = 2560 sparsified feature coordinates, as in the
paper, and k = N / 2) it times, on random float32 features:

* distance: ``pairwise_distances(x, "l1")`` and ``C - d``;
* greedy:   ``facility_location(None, k, similarity=sim)`` (greedy + weights);
* total:    ``facility_location(x, k)`` end to end, timed on its own.

Each number is the median over ``--repeats`` runs after ``--warmup`` runs. The
last column compares the N=128 total with the target: 10 ms on CPU, 1 ms on GPU.
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


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per cell (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dim", type=int, default=2560, help="feature coordinates d")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="N values")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)
    gen = torch.Generator().manual_seed(args.seed)
    target = TARGET_MS.get(device.type)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cores} CPU threads"
    print(f"facility location, L1, float32, d={args.dim}, k=N/2, {name}, torch {torch.__version__}")
    print(f"median of {args.repeats} runs after {args.warmup} warm-up runs\n")
    print("| N | k | distance (ms) | greedy (ms) | total (ms) | total / target |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        k = n // 2
        x = torch.randn(n, args.dim, generator=gen).to(device)

        def distance(x: torch.Tensor = x) -> torch.Tensor:
            d = pairwise_distances(x, "l1")
            return d.max() - d

        sim = distance()
        t_dist = _median_ms(distance, device, args.repeats, args.warmup)
        t_greedy = _median_ms(
            lambda sim=sim, k=k: facility_location(None, k, similarity=sim),
            device,
            args.repeats,
            args.warmup,
        )
        t_total = _median_ms(
            lambda x=x, k=k: facility_location(x, k, "l1"), device, args.repeats, args.warmup
        )
        ratio = f"{t_total / target:.2f}x of {target:g} ms" if n == 128 and target else ""
        print(f"| {n} | {k} | {t_dist:.2f} | {t_greedy:.2f} | {t_total:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
