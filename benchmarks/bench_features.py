"""Cost of gradient features on the real SmolLM2-135M + LoRA, side by side.

Times, in one run and as medians over repeats, one no-grad forward pass of the
full model on a source batch (the reference), ``zo`` features with 1 and 8
directions, and ``exact`` features; prints each as a ratio to the forward.
Then measures peak memory of selection against a training step (forward +
backward) on the coreset, each in its own process (peak RSS growth on CPU,
``max_memory_allocated`` on GPU).

    python benchmarks/bench_features.py                  # CPU, 32 x 128 -> 16
    python benchmarks/bench_features.py --device cuda --batch 128 --seq 512 --coreset 64

``--fsdp N`` measures selection on a model sharded by FSDP2 instead: N processes
(``torch.distributed.run``; gloo on CPU, nccl on GPU), ``fully_shard`` on each
decoder layer and the model, each rank computing zo features for its share of the
source batch in chunks of its share of the coreset, then a training step (forward +
backward) on its share of the coreset, as ``coreset_step`` does. Printed per process:
the model's whole and local (shard) parameter bytes, the bytes selection gathered
(last block + final norm + head, exact), and the peak memory growth of selection and
of the training step over the sharded model (CPU: peak RSS, reset between the phases
as bench_step does; GPU: ``max_memory_allocated``).

    python benchmarks/bench_features.py --fsdp 2 --batch 16 --seq 128 --coreset 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from colm.features import GradientFeatures, draw_directions  # noqa: E402
from colm.models import DEFAULT_MODEL, add_lora, load_model  # noqa: E402


def setup(args):
    torch.manual_seed(0)
    model, _ = load_model(args.model)
    model = add_lora(model, r=args.lora_r, target_modules=["q_proj", "v_proj"]).to(args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt part, masked as in SFT
    batch = {
        "input_ids": ids.to(args.device),
        "attention_mask": torch.ones_like(ids).to(args.device),
        "labels": labels.to(args.device),
    }
    return model, batch


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def phases(model, batch, args):
    feats = GradientFeatures(model, chunk_size=args.coreset)
    gen = torch.Generator().manual_seed(1)
    ids, am, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def forward():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, use_cache=False)

    def zo(q):
        def run():
            model.eval()
            feats.compute(ids, am, lab, "zo", draw_directions(q, feats.numel, gen))

        return run

    def exact():
        model.eval()
        feats.compute(ids, am, lab, "exact")

    def train():
        model.train()
        n = args.coreset
        out = model(input_ids=ids[:n], attention_mask=am[:n], labels=lab[:n], use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return {"forward": forward, "zo_q1": zo(1), "zo_q8": zo(8), "exact": exact, "train": train}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(args) -> None:
    """Child process: run one phase once and print its peak memory growth (MB)."""
    model, batch = setup(args)
    run = phases(model, batch, args)[args.phase]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        base = rss_mb()
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"phase": args.phase, "base_mb": base, "peak_mb": peak}))


def measure_sharded(args) -> None:
    """One rank of ``--fsdp N``: selection and a training step on an FSDP2 model; prints
    one JSON line."""
    import torch.distributed as dist
    from bench_step import PeakMemory
    from torch.distributed.fsdp import fully_shard

    from colm.features.locate import find_layers

    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    model, batch = setup(args)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in find_layers(model)[1]:
        fully_shard(layer)
    fully_shard(model)
    local = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in model.parameters()
    )
    share, part = args.batch // world, args.coreset // world
    rows = slice(rank * share, (rank + 1) * share)
    ids, am, lab = (batch[k][rows] for k in ("input_ids", "attention_mask", "labels"))
    feats = GradientFeatures(model, chunk_size=part)
    with torch.no_grad():  # FSDP's lazy initialisation, outside the measured phases
        model(input_ids=ids[:1], attention_mask=am[:1], use_cache=False)
    mem = PeakMemory(args.device)

    model.eval()
    mem.set_baseline()
    directions = draw_directions(1, feats.numel, torch.Generator().manual_seed(1))
    feats.compute(ids, am, lab, "zo", directions)
    selection = mem.peak()

    model.train()
    mem.set_baseline()
    out = model(input_ids=ids[:part], attention_mask=am[:part], labels=lab[:part], use_cache=False)
    out.loss.backward()
    train = mem.peak()
    model.zero_grad(set_to_none=True)
    record = {
        "rank": rank,
        "whole_mb": whole / 2**20,
        "local_mb": local / 2**20,
        "gathered_mb": feats.replay.gathered_bytes / 2**20,
        "selection_mb": selection,
        "train_mb": train,
    }
    # one file per rank: lines printed by several processes to one pipe can interleave
    Path(args.ranks_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def run_sharded(args) -> None:
    """``--fsdp N``: launch N ranks of :func:`measure_sharded` and print their figures."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={args.fsdp}", __file__, "--phase", "fsdp",
    ] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("phase", "repeats", "ranks_dir")
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.fsdp))}
    with tempfile.TemporaryDirectory() as ranks_dir:
        subprocess.run(
            cmd + [f"--ranks-dir={ranks_dir}"], capture_output=True, text=True, check=True, env=env
        )
        ranks = [json.loads(Path(ranks_dir, f"rank{r}.json").read_text()) for r in range(args.fsdp)]
    print(
        f"## Selection on an FSDP2 model, {args.fsdp} processes ({args.device}), "
        f"source batch {args.batch} x {args.seq} tokens -> coreset {args.coreset}, "
        f"zo q=1, each rank {args.batch // args.fsdp} rows in chunks of "
        f"{args.coreset // args.fsdp}\n"
    )
    print(
        "| rank | model whole (MB) | shard held (MB) | gathered for selection (MB) "
        "| selection peak growth (MB) | training step peak growth (MB) | selection / step |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in ranks:
        print(
            f"| {r['rank']} | {r['whole_mb']:.1f} | {r['local_mb']:.1f} | {r['gathered_mb']:.1f} "
            f"| {r['selection_mb']:.0f} | {r['train_mb']:.0f} "
            f"| {r['selection_mb'] / max(r['train_mb'], 1e-9):.2f} |"
        )
    print(
        "\ngathered: the whole last block, final norm and head (bytes, exact); peak growth: "
        + ("max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)")
        + " over the sharded model, each phase from its own baseline"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or directory")
    p.add_argument("--fsdp", type=int, default=0, help="processes of an FSDP2 run (see above)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--coreset", type=int, default=16)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--ranks-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.phase == "fsdp":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        return measure_sharded(args)
    if args.phase:
        return measure_memory(args)
    if args.fsdp:
        return run_sharded(args)

    model, batch = setup(args)
    run = phases(model, batch, args)
    names = ["forward", "zo_q1", "zo_q8", "exact"]
    for name in names:  # warm-up
        run[name]()
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:  # interleaved, so drift hits all alike
            sync(args.device)
            t0 = time.perf_counter()
            run[name]()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(
        f"## Features on SmolLM2-135M + LoRA r={args.lora_r} (q,v), {args.device}, "
        f"source batch {args.batch} x {args.seq} tokens, chunk {args.coreset}, "
        f"median of {args.repeats}\n"
    )
    print("| phase | median (s) | ratio to forward | target |")
    print("|---|---:|---:|---|")
    targets = {"zo_q1": "<= 1.3"}
    for n in names:
        print(f"| {n} | {med[n]:.3f} | {med[n] / med['forward']:.2f} | {targets.get(n, '')} |")

    print(f"\n## Peak memory, each phase in its own process ({args.device})\n")
    print("| phase | growth over loaded model (MB) |")
    print("|---|---:|")
    mem = {}
    for phase in ["zo_q1", "exact", "train"]:
        cmd = [sys.executable, __file__, "--phase", phase] + [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k not in ("phase", "repeats", "ranks_dir")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        mem[phase] = r["peak_mb"] - r["base_mb"]
        label = phase if phase != "train" else f"train step on {args.coreset}"
        print(f"| {label} | {mem[phase]:.0f} |")
    print(
        f"\nselection (zo q=1) / training step memory: {mem['zo_q1'] / mem['train']:.2f} "
        f"(exact: {mem['exact'] / mem['train']:.2f}); target < 1"
    )


if __name__ == "__main__":
    main()
