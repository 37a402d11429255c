"""Quality at equal steps: full, random and colm (and the paper's ablations) over seeds.

Each run is one ``colm train`` process (``python -m colm.cli train``) on
``configs/bench_quality.yaml`` (SmolLM2-135M-Instruct + LoRA on the built-in
mixture, source batch 16 -> coreset 8, 128 tokens), with the variant's
overrides and ``train.seed``; every run trains the same number of steps and is
evaluated the same way (held-out loss per source on a fixed test split, and a
small generation-accuracy sample in and out of domain). The mixture itself is
fixed (``data.mixture.seed``), so the spread over seeds is the training's.

Then: mean +- std over seeds of the final held-out loss per source, of the
in/out-of-domain mean loss and accuracy, and of the time per step; training
loss curves vs step and vs wall time (mean with a +-1 std band);
``quality.json``, ``quality.md`` (a Markdown section) and PNGs in ``--out``.

Variants (``--variants``, comma list, ``default`` or ``all``):
  full, random, colm                the default set
  accumulate                        same gradient as full (skipped unless named)
  no_small, no_adam, joint,         ablations of the paper's Table 2
  cluster_weights, exact,
  small_random_big                  (needs SelectorConfig(method="random_big"))
  match                             GradMatch-style selection (only when named)

    python benchmarks/bench_quality.py                      # full, random, colm x seeds 0,1,2
    python benchmarks/bench_quality.py --variants all       # + the ablations
    python benchmarks/bench_quality.py --quick              # tiny model, 2 steps, 1 seed
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import default_threads, machine_info, make_tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "bench_quality.yaml"

# name -> (overrides, description); the paper's Table 2 ablations change one thing of colm
VARIANTS: dict[str, tuple[list[str], str]] = {
    "full": (["train.method=full"], "the whole source batch (plain large-batch training)"),
    "random": (["train.method=random"], "uniform random subset of the coreset's size"),
    "colm": (["train.method=colm"], "CoLM with the paper's defaults"),
    "accumulate": (
        ["train.method=accumulate"],
        "the whole source batch in coreset-sized pieces (same gradient as full)",
    ),
    "no_small": (
        ["train.method=colm", "selector.small_sources=[]"],
        "colm without keeping small sources whole (all sources selected by medoids)",
    ),
    "no_adam": (
        ["train.method=colm", "selector.adam=false"],
        "colm without Adam normalisation of the features",
    ),
    "joint": (
        ["train.method=colm", "selector.per_source=false"],
        "colm with medoids chosen jointly over the big sources, not per source",
    ),
    "cluster_weights": (
        ["train.method=colm", "selector.weights=cluster"],
        "colm with cluster-size weights instead of uniform ones",
    ),
    "exact": (
        ["train.method=colm", "selector.feature=exact"],
        "colm with exact first-order features instead of zeroth-order ones",
    ),
    "small_random_big": (
        ["train.method=colm", "selector.method=random_big"],
        "small sources kept whole, the big sources' share picked at random",
    ),
    "match": (
        ["train.method=colm", "selector.method=match"],
        "big sources' examples chosen to match the source's mean feature (GradMatch-style)",
    ),
}
DEFAULT_VARIANTS = ["full", "random", "colm"]
ABLATIONS = ["no_small", "no_adam", "joint", "cluster_weights", "exact", "small_random_big"]

# the --quick set-up: a tiny model, a small mixture, 2 steps
QUICK_OVERRIDES = [
    "data.max_length=96",
    "data.mixture={seed: 0, train: {basic_arithmetic: 40, chain_sum: 30, gcd: 6, lcm: 4},"
    " test_per_source: 2, ood: {products: 2}}",
    "model.lora={r: 4, alpha: 8, dropout: 0.0, targets: [q_proj, k_proj, v_proj, o_proj]}",
    "train.source_batch=8",
    "eval.max_new_tokens=4",
    "eval.batch_size=8",
    "eval.limit_per_task=2",
]


def log(msg: str) -> None:
    print(f"bench_quality: {msg}", file=sys.stderr, flush=True)


def variant_available(name: str) -> tuple[bool, str]:
    """Whether this colm can run a variant (some need selector methods being added)."""
    from colm import SelectorConfig

    for item in VARIANTS[name][0]:
        key, _, value = item.partition("=")
        if key == "selector.method":
            try:
                SelectorConfig(method=value)
            except (ValueError, TypeError):
                return False, (
                    f"needs SelectorConfig(method={value!r}), which this colm does not accept "
                    "(to be added)"
                )
    return True, ""


def parse_variants(text: str) -> list[str]:
    names: list[str] = []
    for part in text.split(","):
        part = part.strip()
        group = {"default": DEFAULT_VARIANTS, "all": DEFAULT_VARIANTS + ABLATIONS}.get(part)
        for n in group or [part]:
            if n not in VARIANTS:
                raise SystemExit(
                    f"unknown variant {n!r}; expected default, all or some of {list(VARIANTS)}"
                )
            if n not in names:
                names.append(n)
    return names


# --------------------------------------------------------------------------- running


def run_order(plan: list[tuple[str, list[int]]]) -> list[tuple[str, int]]:
    """(variant, seeds) -> the (variant, seed) runs in the order to run them: the
    default variants first and seed-major (an interrupted benchmark leaves whole seeds
    of full/random/colm to compare), then the others, seed-major as well."""
    names = [name for name, _ in plan]
    runs = [(name, seed) for name, seeds in plan for seed in dict.fromkeys(seeds)]
    return sorted(runs, key=lambda r: (r[0] not in DEFAULT_VARIANTS, r[1], names.index(r[0])))


def resolved_config(config: Path, overrides: list[str]) -> dict[str, Any]:
    from colm.config import load_config, to_dict

    return to_dict(load_config(config, overrides))


def run_one(
    config: Path, overrides: list[str], run_dir: Path, env: dict, timeout: float, force: bool
) -> dict[str, Any]:
    """Train + evaluate one run in its own process (skipped when a finished run with
    the same resolved configuration is already there)."""
    import yaml

    want = resolved_config(config, overrides)
    done = run_dir / "eval.json"
    if not force and done.exists() and (run_dir / "config.yaml").exists():
        have = yaml.safe_load((run_dir / "config.yaml").read_text())
        if have == want:
            log(f"{run_dir.name}: finished run found, reused (--force to rerun)")
            return {"reused": True, "process_s": None, "returncode": 0}
    if done.exists():
        done.unlink()
    cmd = [sys.executable, "-m", "colm.cli", "train", str(config), *overrides]
    log(f"{run_dir.name}: {shlex.join(cmd[2:])}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as logf:
        try:
            proc = subprocess.run(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - t0
    log(f"{run_dir.name}: exit {rc} after {seconds:.0f} s")
    return {"reused": False, "process_s": seconds, "returncode": rc}


# --------------------------------------------------------------------------- aggregating


def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """What one finished run measured."""
    from colm.report import read_run

    run = read_run(run_dir)
    ev = run.eval or {}
    summary = ev.get("summary") or {}
    curve = [
        (int(r["step"]), float(r["loss"]), float(r.get("wall_time", math.nan))) for r in run.train
    ]
    sel = run.selection_seconds
    return {
        "steps": run.steps,
        "final_train_loss": run.final_loss,
        "train_wall_s": run.wall_time,
        "time_per_step_s": run.time_per_step,
        "selection_s_per_step": statistics.fmean(sel) if sel else None,
        "peak_mb": run.peak_mb,
        "heldout_loss": dict(ev.get("loss") or {}),
        "loss_in": summary.get("loss_in"),
        "loss_out": summary.get("loss_out"),
        "acc_in": summary.get("acc_in"),
        "acc_out": summary.get("acc_out"),
        "acc_all": summary.get("acc_all"),
        "eval_s": ev.get("seconds"),
        "ood_sources": sorted(ev.get("accuracy_out") or {}),
        "curve": curve,
    }


SCALARS = (
    "loss_in",
    "loss_out",
    "acc_in",
    "acc_out",
    "acc_all",
    "final_train_loss",
    "time_per_step_s",
    "selection_s_per_step",
    "train_wall_s",
    "eval_s",
    "peak_mb",
)


def paired(runs: list[dict[str, Any]], reference: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per-seed differences ``run[key] - reference[key]`` over the seeds both have (a seed
    fixes the LoRA initialisation and the data order, so pairs share everything but the
    method): mean +- std of the difference and how many seeds came out lower."""
    ref = {r["seed"]: r.get(key) for r in reference}
    diffs = [
        r[key] - ref[r["seed"]]
        for r in runs
        if r.get(key) is not None and ref.get(r["seed"]) is not None
    ]
    return {**_mean_std(diffs), "lower": sum(d < 0 for d in diffs)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    agg = {k: _mean_std([r.get(k) for r in runs]) for k in SCALARS}
    sources = []
    for r in runs:
        sources += [s for s in r["heldout_loss"] if s not in sources]
    agg["heldout_loss"] = {s: _mean_std([r["heldout_loss"].get(s) for r in runs]) for s in sources}
    return agg


# --------------------------------------------------------------------------- plots


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _band(curves: list[list[tuple[int, float, float]]], window: int):
    """Per step (present in every seed): mean step, mean/std smoothed loss, mean wall time."""
    if not curves:
        return [], [], [], []
    steps = sorted(set.intersection(*[{s for s, _, _ in c} for c in curves]))
    series, walls = [], []
    for c in curves:
        by = {s: (loss, wall) for s, loss, wall in c}
        series.append(_smooth([by[s][0] for s in steps], window))
        walls.append([by[s][1] for s in steps])
    mean = [statistics.fmean(col) for col in zip(*series)]
    std = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*series)]
    wall = [statistics.fmean(col) for col in zip(*walls)]
    return steps, mean, std, wall


def plot_curves(variants: dict[str, dict], out: Path) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    written = []
    names = [n for n, v in variants.items() if v["runs"]]
    if not names:
        return written
    cmap = colormaps["tab10"]
    longest = max(len(r["curve"]) for n in names for r in variants[n]["runs"])
    window = max(1, longest // 10)
    for x_key, fname in (("step", "loss_vs_step.png"), ("wall", "loss_vs_time.png")):
        fig = Figure(figsize=(7.5, 4.5), dpi=110, layout="constrained")
        ax = fig.subplots()
        for i, name in enumerate(names):
            curves = [r["curve"] for r in variants[name]["runs"] if r["curve"]]
            steps, mean, std, wall = _band(curves, window)
            if not steps:
                continue
            x = steps if x_key == "step" else wall
            color = cmap(i % cmap.N)
            n = len(curves)
            ax.plot(x, mean, color=color, linewidth=1.6, label=f"{name} (n={n})")
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=color,
                alpha=0.2,
                linewidth=0,
            )
        ax.set_xlabel("optimizer step" if x_key == "step" else "training wall time (s)")
        ax.set_ylabel(f"training loss (moving mean of {window})")
        ax.set_title(
            "Training loss, mean +- std over seeds" + (" vs wall time" if x_key == "wall" else "")
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.savefig(out / fname)
        written.append(fname)

    # final held-out loss per source, with error bars
    sources: list[str] = []
    for n in names:
        sources += [s for s in variants[n]["aggregate"]["heldout_loss"] if s not in sources]
    if sources:
        fig = Figure(figsize=(max(7.5, 0.7 * len(sources) + 3), 4.8), dpi=110, layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            hl = variants[name]["aggregate"]["heldout_loss"]
            xs, means, stds = [], [], []
            for i, src in enumerate(sources):
                stat = hl.get(src) or {}
                if stat.get("mean") is not None:
                    xs.append(i - 0.4 + width * (k + 0.5))
                    means.append(stat["mean"])
                    stds.append(stat["std"] or 0.0)
            ax.errorbar(
                xs, means, yerr=stds, fmt="o", capsize=3, color=cmap(k % cmap.N), label=name
            )
        ax.set_xticks(range(len(sources)))
        ax.set_xticklabels(sources, rotation=35, ha="right", fontsize="small")
        ax.set_ylabel("held-out loss (mean +- std over seeds)")
        ax.set_title("Final held-out loss per source")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
        fig.savefig(out / "heldout_loss.png")
        written.append("heldout_loss.png")
    return written


# --------------------------------------------------------------------------- report


def _ms(stat: dict | None, digits: int = 4, pct: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    m, s = stat["mean"], stat["std"] or 0.0
    if stat.get("n") == 1:  # one seed: no spread to show
        return f"{100 * m:.1f}%" if pct else f"{m:.{digits}f}"
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}%"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(payload: dict[str, Any], plots: list[str]) -> str:
    s = payload["settings"]
    variants = payload["variants"]
    shown = [n for n, v in variants.items() if v["runs"]]
    lines = [
        "## Quality at equal steps",
        "",
        f"{s['model']} + LoRA on the built-in mixture, {s['steps']} steps, source batch "
        f"{s['source_batch']} -> coreset {s['coreset']} (full: all {s['source_batch']}), "
        f"{s['max_length']} tokens; mean ± std over the n seeds of each variant "
        f"(`{payload['command']}`, {payload['date']}, "
        f"{payload['machine']['cpu_affinity']} CPUs, {payload['machine']['torch_threads']} torch threads"
        + (f", {payload['machine']['gpu']}" if payload["machine"].get("gpu") else "")
        + ").",
        "",
        "| variant | n | held-out loss (in) | held-out loss (out) | accuracy (in) "
        "| accuracy (out) | time/step | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in shown:
        a = variants[n]["aggregate"]
        lines.append(
            f"| {n} | {len(variants[n]['runs'])} | {_ms(a['loss_in'])} | {_ms(a['loss_out'])} | {_ms(a['acc_in'], pct=True)} "
            f"| {_ms(a['acc_out'], pct=True)} | {_ms(a['time_per_step_s'], 2)} s "
            f"| {_ms(a['train_wall_s'], 0)} s |"
        )
    sources: list[str] = []
    for n in shown:
        sources += [x for x in variants[n]["aggregate"]["heldout_loss"] if x not in sources]
    if sources:
        lines += [
            "",
            "Final held-out loss per source ((out): not trained on, out of domain):",
            "",
            "| source | " + " | ".join(shown) + " |",
            "|---|" + "---:|" * len(shown),
        ]
        ood = {x for n in shown for r in variants[n]["runs"] for x in r.get("ood_sources", [])}
        for src in sources:
            cells = [_ms(variants[n]["aggregate"]["heldout_loss"].get(src)) for n in shown]
            label = f"{src} (out)" if src in ood else src
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    refs = [r for r in ("random", "full") if variants.get(r, {}).get("runs")]
    if refs and len(shown) > 1:
        lines += [
            "",
            "Paired by seed (same LoRA initialisation and data order): held-out loss (in) minus "
            "the reference's, mean ± std over the seeds both ran, and on how many of them the "
            "variant's loss was lower. Negative is better than the reference.",
            "",
            "| variant | " + " | ".join(f"vs {r}" for r in refs) + " |",
            "|---|" + "---:|" * len(refs),
        ]
        for n in shown:
            cells = []
            for r in refs:
                if n == r:
                    cells.append("–")
                    continue
                d = paired(variants[n]["runs"], variants[r]["runs"], "loss_in")
                cells.append(f"{_ms(d)} ({d['lower']}/{d['n']} lower)" if d["n"] else "-")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [""]
    for name in plots:
        lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
    lines += ["Notes:", ""]
    lines += [f"- {note}" for note in payload["notes"]]
    for n, why in payload["skipped"].items():
        lines.append(f"- `{n}` not run: {why}")
    for n in shown:
        lines.append(
            f"- `{n}`: {variants[n]['description']} ({' '.join(variants[n]['overrides'])})"
        )
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--variants", default="default", help="comma list, 'default' or 'all'")
    p.add_argument("--seeds", default=None, help='comma list (default "0,1,2")')
    p.add_argument(
        "--ablation-seeds",
        default=None,
        help="comma list for the variants outside full/random/colm (default: --seeds)",
    )
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--model", default=None, help="override model.name (a directory)")
    p.add_argument("--device", default=None, help="cpu hides GPUs from the runs (default: any)")
    p.add_argument("--set", action="append", default=[], help="extra key=value override")
    p.add_argument("--out", default=None, help="folder (benchmarks/results/quality)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--quick", action="store_true", help="tiny model, small mixture, 2 steps")
    args = p.parse_args(argv)

    config = Path(args.config)
    out = Path(
        args.out or ROOT / "benchmarks/results" / ("quality_quick" if args.quick else "quality")
    )
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    ablation_seeds = (
        [int(x) for x in args.ablation_seeds.split(",")] if args.ablation_seeds else seeds
    )
    names = parse_variants(args.variants)
    notes = [
        "`accumulate` trains on the same examples as `full` with the same gradient (only "
        "the memory/time differ, see bench_step.py), so it is skipped unless named.",
        "Training loss is over the examples each method trained on (the coreset for colm "
        "and random, the whole batch for full), so its level is not comparable across "
        "methods; compare held-out losses.",
        "The mixture (train and test splits) is the same for every seed (data.mixture.seed); "
        "a seed changes LoRA initialisation, data order and the selector's directions.",
    ]
    if "accumulate" in names:
        notes = notes[1:]

    common: list[str] = []
    model = args.model
    if args.quick:
        common += QUICK_OVERRIDES
        if model is None:
            model = str(make_tiny_model_dir(out / "tiny-model"))
        notes.append("--quick: a tiny random model and a small mixture; numbers are meaningless.")
    if model:
        common.append(f"model.name={model}")
    steps = args.steps or (2 if args.quick else None)
    if steps:
        common.append(f"train.steps={steps}")
    common += args.set
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda, but torch sees no GPU")

    base = resolved_config(config, common)
    variants: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    failed: list[str] = []
    wanted: list[tuple[str, list[int]]] = []
    for name in names:
        ok, why = variant_available(name)
        if not ok:
            skipped[name] = why
            log(f"skipping {name}: {why}")
            continue
        overrides, description = VARIANTS[name]
        variants[name] = {"overrides": overrides, "description": description, "runs": []}
        wanted.append((name, ablation_seeds if name not in DEFAULT_VARIANTS else seeds))
    for name, seed in run_order(wanted):
        overrides = variants[name]["overrides"]
        run_dir = out / "runs" / f"{name}-seed{seed}"
        ov = [*common, *overrides, f"name={name}", f"output_dir={run_dir}", f"train.seed={seed}"]
        res = run_one(config, ov, run_dir, env, args.timeout, args.force)
        if res["returncode"] != 0 or not (run_dir / "eval.json").exists():
            failed.append(f"{name}-seed{seed}")
            log(f"{name}-seed{seed} failed; see {run_dir.parent / (run_dir.name + '.log')}")
            continue
        metrics = run_metrics(run_dir)
        variants[name]["runs"].append({"seed": seed, "dir": str(run_dir), **res, **metrics})
    for name in variants:
        variants[name]["runs"].sort(key=lambda r: r["seed"])
        variants[name]["aggregate"] = aggregate(variants[name]["runs"])

    plots = plot_curves(variants, out)
    from colm.config import load_config

    t = base["train"]
    coreset = load_config(config, common).selector_config().coreset_size(t["source_batch"])
    device = "cuda" if args.device != "cpu" and _cuda() else "cpu"
    payload = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device, default_threads()),
        "config": str(config),
        "settings": {
            "model": base["model"]["name"],
            "steps": t["steps"],
            "source_batch": t["source_batch"],
            "coreset": coreset,
            "max_length": base["data"]["max_length"],
            "eval": base["eval"],
            "overrides": common,
        },
        "seeds": seeds,
        "variants": variants,
        "skipped": skipped,
        "failed": failed,
        "notes": notes,
        "plots": plots,
    }
    (out / "quality.json").write_text(json.dumps(payload, indent=1))
    md = markdown(payload, plots)
    (out / "quality.md").write_text(md)
    print(md)
    print(
        f"wrote {out / 'quality.json'}, {out / 'quality.md'} and {', '.join(plots) or 'no plots'}"
    )
    return 1 if failed else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
