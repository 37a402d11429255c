"""Quality at equal steps and at equal wall time: every method, paired by seed.

Each run is one ``colm train`` process (``python -m colm.cli train``) on
``configs/bench_quality.yaml`` (SmolLM2-135M-Instruct + LoRA on the built-in
mixture, source batch 16 -> coreset 8, 128 tokens, constant learning rate after
a short warm-up, 50 held-out examples per source), with the variant's overrides
and ``train.seed``. A seed fixes the LoRA initialisation and the data order, so
the variants of one seed see the same source batches and are compared pair by
pair. Held-out loss per source is evaluated every ``eval.every`` steps during
training (``heldout.jsonl``; evaluation time is not counted as training time),
so every run gives a curve of held-out loss against step and against wall time.

Comparisons (each a paired difference over seeds with a 95% t interval):

* at equal steps: the held-out loss after the last step;
* at equal wall time: the held-out loss each variant has reached after the
  training time the fastest variant needs for all its steps (time axis: step x
  the variant's median time per step over its seeds, so that a moment of load
  on the machine in one run does not move its curve; loss interpolated linearly
  between evaluations).

The constant learning rate makes every prefix of a run a fair shorter run, which
is what comparing curves at equal time needs.

Every finished run is kept as one small JSON record under ``--out``/finished/
(committed with the results), keyed by its resolved configuration: an interrupted
benchmark, or one started again in a later session, reruns only what is missing.
The untrained model's held-out loss (step 0: LoRA starts as the identity, so it is
the same for every seed and variant) is measured once.

Variants (``--variants``, comma list; ``protocol`` = the first six, ``all`` adds the
paper's Table 2 ablations and the selector candidates):

    python benchmarks/bench_quality.py                         # the protocol x 5 seeds
    python benchmarks/bench_quality.py --variants protocol,exact_match --seeds 0,1,2,3,4
    python benchmarks/bench_quality.py --quick                 # tiny model, 4 steps, 1 seed
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
from stats import excludes_zero, fmt_ci, paired_ci  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "bench_quality.yaml"

# the paper's selection, pinned (whatever SelectorConfig's defaults are)
PAPER = [
    "train.method=colm",
    "selector.preset=paper",
]
# name -> (overrides, description); "{beta2_small}" is filled in from the configuration
VARIANTS: dict[str, tuple[list[str], str]] = {
    "full": (["train.method=full"], "the whole source batch (plain large-batch training)"),
    "accumulate": (
        ["train.method=accumulate"],
        "the whole source batch in coreset-sized pieces (full's gradient at random's memory)",
    ),
    "random": (["train.method=random"], "uniform random subset of the coreset's size"),
    "random_b2": (
        ["train.method=random", "train.adam_beta2={beta2_small}"],
        "random subset with Adam's beta2 scaled to the smaller batch, beta2 ** (b / B) "
        "(Marek et al., 2025: the second moment's half-life fixed in tokens)",
    ),
    "random_big": (
        ["train.method=colm", "selector.preset=paper", "selector.method=random_big"],
        "small sources kept whole, colm's per-source budgets, big sources' picks at random "
        "(no features)",
    ),
    "colm": (PAPER, "CoLM as the paper configures it (zo q=1, Adam-normalised, facility location)"),
    # the paper's Table 2 ablations: each changes one thing of the paper's colm
    "no_small": ([*PAPER, "selector.small_sources=[]"], "colm without keeping small sources"),
    "no_adam": ([*PAPER, "selector.adam=false"], "colm without Adam normalisation"),
    "joint": ([*PAPER, "selector.per_source=false"], "colm with medoids over all big sources"),
    "cluster_weights": ([*PAPER, "selector.weights=cluster"], "colm with cluster-size weights"),
    # selector candidates
    "exact": ([*PAPER, "selector.feature=exact"], "colm with exact value-block gradients"),
    "exact_match": (
        [*PAPER, "selector.feature=exact", "selector.method=match"],
        "exact features, gradient matching per source",
    ),
    # data without source labels (the labels of the built-in mixture hidden): the clusters
    # of the model's hidden states are the sources (docs/pseudo_sources.md); the held-out
    # loss is still reported per true source
    "random_big_pseudo": (
        [
            "train.method=colm",
            "selector.preset=paper",
            "selector.method=random_big",
            "data.sources=auto",
        ],
        "random_big on pseudo-sources (clusters of the hidden states, found by density)",
    ),
    "random_big_pseudo_k4": (
        [
            "train.method=colm",
            "selector.preset=paper",
            "selector.method=random_big",
            "data.sources=auto",
            "data.num_sources=4",
        ],
        "random_big on 4 pseudo-sources (k-means; the k the silhouette chooses on this mixture)",
    ),
    "random_big_pseudo_k12": (
        [
            "train.method=colm",
            "selector.preset=paper",
            "selector.method=random_big",
            "data.sources=auto",
            "data.num_sources=12",
        ],
        "random_big on 12 pseudo-sources (the k that keeps the small sources whole with the "
        "fewest big-source examples, benchmarks/bench_pseudo_k.py)",
    ),
    "colm_pseudo": (
        [*PAPER, "data.sources=auto"],
        "CoLM as the paper configures it, on pseudo-sources instead of the true sources",
    ),
    "match_exact_opt": (
        [
            *PAPER,
            "selector.feature=exact",
            "selector.method=match",
            "selector.moments=optimizer",
        ],
        "gradient matching per source on exact value-block gradients, Adam-normalised with "
        "the training optimizer's state (the best selector in the gradient-matching benchmark "
        "at step 0)",
    ),
    "match_exact_warm": (
        [
            *PAPER,
            "selector.feature=exact",
            "selector.method=match",
            "selector.moments=warm",
        ],
        "gradient matching per source on exact value-block gradients, Adam-normalised with "
        "moments warm-started from the first batch (the best selector over the "
        "gradient-matching benchmark's 48 batch-points)",
    ),
}
PROTOCOL = ["full", "accumulate", "random", "random_b2", "random_big", "colm"]
ABLATIONS = ["no_small", "no_adam", "joint", "cluster_weights"]
CANDIDATES = ["match_exact_opt", "match_exact_warm", "exact", "exact_match"]
PSEUDO = ["random_big_pseudo", "random_big_pseudo_k4", "random_big_pseudo_k12", "colm_pseudo"]
REFERENCES = ("random_big", "random", "full", "colm")  # paired against, when present

# the --quick set-up: a tiny model, a small mixture, 4 steps
QUICK_OVERRIDES = [
    "data.max_length=96",
    "data.mixture={seed: 0, train: {basic_arithmetic: 40, chain_sum: 30, gcd: 6, lcm: 4},"
    " test_per_source: 3, ood: {products: 3}}",
    "model.lora={r: 4, alpha: 8, dropout: 0.0, targets: [q_proj, k_proj, v_proj, o_proj]}",
    "train.source_batch=8",
    "train.steps=4",
    "eval.every=2",
    "eval.batch_size=8",
]


def log(msg: str) -> None:
    print(f"bench_quality: {msg}", file=sys.stderr, flush=True)


def parse_variants(text: str) -> list[str]:
    groups = {"protocol": PROTOCOL, "all": PROTOCOL + ABLATIONS + CANDIDATES + PSEUDO}
    names: list[str] = []
    for part in text.split(","):
        part = part.strip()
        for n in groups.get(part) or [part]:
            if n not in VARIANTS:
                raise SystemExit(
                    f"unknown variant {n!r}; expected protocol, all or some of {list(VARIANTS)}"
                )
            if n not in names:
                names.append(n)
    return names


def variant_overrides(name: str, base: dict[str, Any]) -> list[str]:
    """The variant's overrides with the placeholders filled from the base configuration."""
    from colm.config import RunConfig, _build

    cfg = _build(RunConfig, base, "")
    t = cfg.train
    b = cfg.selector_config().coreset_size(t.source_batch)
    beta2_small = round(t.adam_beta2 ** (b / t.source_batch), 6)
    return [o.format(beta2_small=beta2_small) for o in VARIANTS[name][0]]


def run_order(plan: list[tuple[str, list[int]]]) -> list[tuple[str, int]]:
    """(variant, seeds) -> runs, seed-major in the order the variants were given, so that
    an interrupted benchmark leaves whole seeds to compare."""
    names = [name for name, _ in plan]
    runs = [(name, seed) for name, seeds in plan for seed in dict.fromkeys(seeds)]
    return sorted(runs, key=lambda r: (r[1], names.index(r[0])))


def resolved_config(config: Path, overrides: list[str]) -> dict[str, Any]:
    from colm.config import load_config, to_dict

    return to_dict(load_config(config, overrides))


def _key(cfg: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's result: the resolved configuration without where it is written
    (nor where the pseudo-source embeddings are cached: the same either way)."""
    out = {k: v for k, v in cfg.items() if k not in ("output_dir", "name")}
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k != "embeddings_cache"}
    return out


def same_config(stored: Any, want: Any, defaults: Any) -> bool:
    """Whether a committed record was made with the configuration wanted now. A setting
    added to colm after the record was made (absent from it) matches when the wanted
    value is that setting's default, which is what the record's run used; any other
    difference, or a setting the record has and colm no longer knows, does not match."""
    if isinstance(stored, dict) and isinstance(want, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        for k in set(stored) | set(want):
            if k not in want:
                return False
            if k not in stored:
                if k not in defaults or want[k] != defaults[k]:
                    return False
            elif not same_config(stored[k], want[k], defaults.get(k)):
                return False
        return True
    return stored == want


def _defaults() -> dict[str, Any]:
    from colm.config import RunConfig, to_dict

    return to_dict(RunConfig())


# --------------------------------------------------------------------------- running


def record_of(run_dir: Path) -> dict[str, Any]:
    """What one finished run measured, small enough to commit."""
    from colm.report import read_run

    run = read_run(run_dir)
    ev = run.eval or {}
    steps = [r for r in run.train if "wall_time" in r]
    walls = [0.0] + [float(r["wall_time"]) for r in steps]
    step_s = [b - a for a, b in zip(walls, walls[1:])]
    curve = [json.loads(x) for x in (run_dir / "heldout.jsonl").read_text().splitlines()]
    return {
        "steps": run.steps,
        "train_loss": [[int(r["step"]), float(r["loss"])] for r in run.train],
        "step_s": step_s,
        "time_per_step_s": statistics.median(step_s) if step_s else None,
        "selection_s_per_step": statistics.fmean(run.selection_seconds)
        if run.selection_seconds
        else None,
        "peak_mb": run.peak_mb,
        "heldout": [
            {k: p[k] for k in ("step", "wall_time", "loss", "loss_in", "loss_out")} for p in curve
        ],
        "eval_s": ev.get("seconds"),
        **_pseudo_record(run_dir),
    }


def _pseudo_record(run_dir: Path) -> dict[str, Any]:
    """A pseudo-source run's clustering: k, the sizes and the agreement with the hidden
    true sources (adjusted Rand index); nothing for a run on the true sources."""
    path = run_dir / "pseudo_sources.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    keep = ("k", "sizes", "ari_vs_labels", "embedding_s")
    return {"pseudo_sources": {k: saved[k] for k in keep if k in saved}}


def run_one(config, overrides, run_dir, record_path, env, timeout, force) -> dict | None:
    """The run's record: the committed one if its configuration matches, else trained and
    evaluated now in its own process (None if it failed)."""
    want = _key(resolved_config(config, overrides))
    if not force and record_path.exists():
        rec = json.loads(record_path.read_text())
        if same_config(rec.get("config"), want, _key(_defaults())):
            log(f"{record_path.stem}: finished run found, reused (--force to rerun)")
            return rec
    cmd = [sys.executable, "-m", "colm.cli", "train", str(config), *overrides]
    log(f"{run_dir.name}: {shlex.join(cmd[2:])}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in ("eval.json", "heldout.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as logf:
        try:
            rc = subprocess.run(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - t0
    log(f"{run_dir.name}: exit {rc} after {seconds:.0f} s")
    if rc != 0 or not (run_dir / "eval.json").exists():
        return None
    rec = {"config": want, "process_s": seconds, **record_of(run_dir)}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(rec, indent=1))
    return rec


def measure_times(config, names, variants, common, out, env, rounds, steps, warmup) -> dict:
    """Time per step of every variant, measured side by side on an otherwise idle machine:
    short ``colm train`` runs without evaluation, the variants alternating in ``rounds``
    so that a moment of load falls on all of them; the median over the steps after
    ``warmup`` of every round. Written to ``finished/timing.json`` (reused by later
    analyses; ``--timing`` measures it again)."""
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            run_dir = out / "runs" / f"timing-{name}"
            ov = [
                *common,
                *variants[name]["overrides"],
                f"name=timing-{name}",
                f"output_dir={run_dir}",
                f"train.steps={warmup + steps}",
                "eval.enabled=false",
                "eval.every=0",
                f"train.seed={r}",
            ]
            cmd = [sys.executable, "-m", "colm.cli", "train", str(config), *ov]
            log(f"timing {name}, round {r + 1}/{rounds}")
            with open(out / "runs" / f"timing-{name}.log", "w") as logf:
                subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            rec = record_of_steps(run_dir)
            times[name] += rec[warmup:]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info("cpu", default_threads()),
        "rounds": rounds,
        "steps": steps,
        "warmup": warmup,
        "time_per_step_s": {n: statistics.median(t) for n, t in times.items() if t},
        "step_s": times,
    }
    (out / "finished" / "timing.json").write_text(json.dumps(result, indent=1))
    return result


def record_of_steps(run_dir: Path) -> list[float]:
    """Seconds of every logged step of a run (from metrics.jsonl's wall times)."""
    walls = [0.0]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "wall_time" in row:
            walls.append(float(row["wall_time"]))
    return [b - a for a, b in zip(walls, walls[1:])]


def base_point(config: Path, common: list[str], path: Path) -> dict[str, Any]:
    """Held-out loss of the untrained model (LoRA B = 0: the base model), measured once."""
    cfg_dict = resolved_config(config, common)
    data = _key(cfg_dict)["data"]
    want = {"model": cfg_dict["model"]["name"], "data": data, "eval": cfg_dict["eval"]}
    if path.exists():
        rec = json.loads(path.read_text())
        d = _defaults()
        if same_config(rec.get("config"), want, {"data": d["data"], "eval": d["eval"]}):
            return rec
    from colm.config import eval_max_length, load_config
    from colm.evaluate import heldout_loss
    from colm.models import load_model
    from colm.train import _limited, heldout_record, load_data

    cfg = load_config(config, common)
    _, test_in, test_out = load_data(cfg)
    test_in, test_out = _limited(cfg, test_in, test_out)
    model, tok = load_model(cfg.model.name)
    log("held-out loss of the untrained model")
    t0 = time.perf_counter()
    loss = {
        split: heldout_loss(model, tok, recs, eval_max_length(cfg), cfg.eval.batch_size)
        for split, recs in (("in", test_in), ("out", test_out))
        if recs
    }
    point = heldout_record(0, 0.0, loss, time.perf_counter() - t0)
    rec = {
        "config": want,
        "point": {k: point[k] for k in ("step", "wall_time", "loss", "loss_in", "loss_out")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    return rec


# --------------------------------------------------------------------------- analysis


def curve(rec: dict, base: dict, key: str = "loss_in") -> list[tuple[int, float]]:
    """(step, held-out loss) of a run, from the untrained model's point on."""
    pts = {0: base["point"][key]}
    for p in rec["heldout"]:
        pts[int(p["step"])] = p[key]
    return sorted(pts.items())


def at(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (x, y) points at ``x`` (None outside their range)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def analyse(variants: dict[str, dict], base: dict, timing: dict | None = None) -> dict[str, Any]:
    """Per variant: time per step (from the side-by-side timing run where it has the
    variant, else the median over the variant's own runs), final losses; equal-step and
    equal-time comparisons."""
    clean = (timing or {}).get("time_per_step_s", {})
    for name, v in variants.items():
        runs = v["runs"]
        tps = [r["time_per_step_s"] for r in runs if r.get("time_per_step_s")]
        v["time_per_step_own_s"] = statistics.median(tps) if tps else None
        v["time_source"] = "timing run" if name in clean else "own runs"
        v["time_per_step_s"] = clean.get(name, v["time_per_step_own_s"])
        v["steps"] = max((r["steps"] for r in runs), default=0)
    timed = [v for v in variants.values() if v["runs"] and v["time_per_step_s"]]
    if any(v["time_source"] == "timing run" for v in timed):
        # the equal-time point comes from the side-by-side timings only: a variant's own
        # runs share the machine with other work, and a lucky median would move it
        timed = [v for v in timed if v["time_source"] == "timing run"]
    budget = min((v["steps"] * v["time_per_step_s"] for v in timed), default=None)
    for v in variants.values():
        for r in v["runs"]:
            for key in ("loss_in", "loss_out"):
                pts = curve(r, base, key)
                r[f"final_{key}"] = pts[-1][1]
                if budget and v["time_per_step_s"]:
                    timeline = [(s * v["time_per_step_s"], y) for s, y in pts]
                    r[f"time_{key}"] = at(timeline, budget)
    comparisons: dict[str, dict] = {}
    refs = [r for r in REFERENCES if variants.get(r, {}).get("runs")]
    for name, v in variants.items():
        comparisons[name] = {}
        for ref in refs:
            if ref == name:
                continue
            by_seed = {r["seed"]: r for r in variants[ref]["runs"]}
            row = {}
            for what in ("final_loss_in", "final_loss_out", "time_loss_in", "time_loss_out"):
                diffs = [
                    r[what] - by_seed[r["seed"]][what]
                    for r in v["runs"]
                    if r["seed"] in by_seed
                    and r.get(what) is not None
                    and by_seed[r["seed"]].get(what) is not None
                ]
                row[what] = paired_ci(diffs)
            comparisons[name][ref] = row
    return {"time_budget_s": budget, "comparisons": comparisons}


def _mean_ci(values: list[float]) -> tuple[float, float]:
    from scipy import stats

    vals = [x for x in values if x is not None and math.isfinite(x)]
    if not vals:
        return math.nan, 0.0
    if len(vals) < 2:
        return vals[0], 0.0
    half = stats.t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return statistics.fmean(vals), half


# --------------------------------------------------------------------------- plots


def plot_curves(variants: dict[str, dict], base: dict, analysis: dict, out: Path) -> list[str]:
    """Held-out loss (in domain) against step and against wall time: mean with a 95%
    band over seeds; and the final held-out loss per source."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    names = [n for n, v in variants.items() if v["runs"]]
    if not names:
        return []
    cmap = colormaps["tab10"]
    written = []
    for x_key, fname in (("step", "heldout_vs_step.png"), ("time", "heldout_vs_time.png")):
        fig = Figure(figsize=(7.5, 4.6), dpi=110, layout="constrained")
        ax = fig.subplots()
        for i, name in enumerate(names):
            v = variants[name]
            curves = [dict(curve(r, base)) for r in v["runs"]]
            steps = sorted(set.intersection(*[set(c) for c in curves]))
            stats_ = [_mean_ci([c[s] for c in curves]) for s in steps]
            scale = v["time_per_step_s"] if x_key == "time" else 1.0
            if scale is None:
                continue
            x = [s * scale for s in steps]
            mean = [m for m, _ in stats_]
            color = cmap(i % cmap.N)
            ax.plot(x, mean, "o-", color=color, ms=3, lw=1.5, label=f"{name} (n={len(curves)})")
            ax.fill_between(
                x, [m - h for m, h in stats_], [m + h for m, h in stats_], color=color, alpha=0.15
            )
        if x_key == "time" and analysis["time_budget_s"]:
            ax.axvline(analysis["time_budget_s"], color="grey", ls=":", lw=1)
        ax.set_xlabel(
            "optimizer step" if x_key == "step" else "training time (s; step x median s/step)"
        )
        ax.set_ylabel("held-out loss, in domain (mean, 95% CI)")
        ax.set_title(
            "Held-out loss " + ("against step" if x_key == "step" else "against wall time")
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.savefig(out / fname)
        written.append(fname)

    sources = list(base["point"]["loss"])
    fig = Figure(figsize=(max(7.5, 0.75 * len(sources) + 3), 4.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        last = [r["heldout"][-1]["loss"] for r in variants[name]["runs"]]
        stats_ = [_mean_ci([x.get(s) for x in last]) for s in sources]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(sources))]
        ax.errorbar(
            xs,
            [m for m, _ in stats_],
            yerr=[h for _, h in stats_],
            fmt="o",
            ms=3,
            capsize=2,
            color=cmap(k % cmap.N),
            label=name,
        )
    ax.set_xticks(range(len(sources)))
    ax.set_xticklabels(sources, rotation=35, ha="right", fontsize="small")
    ax.set_ylabel("final held-out loss (mean, 95% CI)")
    ax.set_title("Final held-out loss per source")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out / "heldout_per_source.png")
    return [*written, "heldout_per_source.png"]


# --------------------------------------------------------------------------- report


def markdown(payload: dict[str, Any], plots: list[str]) -> str:
    s, variants, an = payload["settings"], payload["variants"], payload["analysis"]
    shown = [n for n, v in variants.items() if v["runs"]]
    budget = an["time_budget_s"]
    lines = [
        "## Held-out loss at equal steps and at equal wall time",
        "",
        f"{s['model']} + LoRA on the built-in mixture, {s['steps']} steps, source batch "
        f"{s['source_batch']} -> coreset {s['coreset']}, {s['max_length']} tokens, "
        f"held-out loss on {s['heldout_examples']} examples ({s['per_source']} per source); "
        f"`{payload['command']}`, {payload['date']}, {payload['machine']['processor']}, "
        f"{payload['machine']['cpu_affinity']} CPUs, {payload['machine']['torch_threads']} torch "
        "threads"
        + (f", {payload['machine']['gpu']}" if payload["machine"].get("gpu") else "")
        + ".",
        "",
        f"Equal time: after {budget:.0f} s of training (all steps of the fastest variant"
        + (
            " timed side by side; variants not in that timing have no equal-time figure)."
            if payload.get("timing")
            else ")."
        )
        if budget
        else "",
        "",
        "Time per step: "
        + (
            f"measured side by side on an idle machine ({payload['timing']['date']}, "
            f"{payload['timing']['rounds']} rounds x {payload['timing']['steps']} steps, "
            "median)"
            if payload.get("timing")
            else "median over each variant's own runs (no side-by-side timing run yet)"
        )
        + "; the runs' own medians, measured while other work shared the machine, in "
        "brackets.",
        "Held-out loss: mean ± half-width of the 95% t interval over seeds (one seed: no "
        "interval).",
        "",
        "| variant | seeds | s / step | held-out loss (in), last step | (out) | at equal time (in) "
        "| (out) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def mc(v, key):
        m, h = _mean_ci([r.get(key) for r in v["runs"]])
        if math.isnan(m):
            return "-"
        return f"{m:.4f}" if len(v["runs"]) < 2 else f"{m:.4f} ± {h:.4f}"

    for n in shown:
        v = variants[n]
        tps, own = v["time_per_step_s"], v["time_per_step_own_s"]
        lines.append(
            f"| {n} | {len(v['runs'])} | {tps:.2f} ({own:.2f}) | {mc(v, 'final_loss_in')} | "
            f"{mc(v, 'final_loss_out')} | {mc(v, 'time_loss_in')} | {mc(v, 'time_loss_out')} |"
        )
    refs = [r for r in REFERENCES if r in shown]
    for what, title in (
        ("final_loss_in", "at equal steps (in domain)"),
        ("time_loss_in", "at equal wall time (in domain)"),
        ("final_loss_out", "at equal steps (out of domain)"),
        ("time_loss_out", "at equal wall time (out of domain)"),
    ):
        lines += [
            "",
            f"Paired by seed, {title}: variant minus reference, mean [95% CI] (seeds lower). "
            "**Bold**: the interval excludes zero.",
            "",
            "| variant | " + " | ".join(f"− {r}" for r in refs) + " |",
            "|---|" + "---:|" * len(refs),
        ]
        for n in shown:
            cells = []
            for r in refs:
                ci = an["comparisons"][n].get(r, {}).get(what)
                text = fmt_ci(ci) if ci else "–"
                cells.append(f"**{text}**" if ci and excludes_zero(ci) else text)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [""]
    for name in plots:
        lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
    lines += ["Variants:", ""]
    for n in shown:
        lines.append(
            f"- `{n}`: {variants[n]['description']} (`{' '.join(variants[n]['overrides'])}`)"
        )
    for n in payload["failed"]:
        lines.append(f"- failed: {n} (see its log under runs/)")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--variants", default="protocol", help="comma list, 'protocol' or 'all'")
    p.add_argument("--seeds", default=None, help='comma list (default "0,1,2,3,4")')
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--model", default=None, help="override model.name (a directory)")
    p.add_argument("--device", default=None, help="cpu hides GPUs from the runs (default: any)")
    p.add_argument("--set", action="append", default=[], help="extra key=value override")
    p.add_argument("--out", default=None, help="folder (benchmarks/results/quality)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--report-only", action="store_true", help="aggregate the finished runs only")
    p.add_argument(
        "--timing",
        action="store_true",
        help="measure every variant's time per step side by side (no evaluation; run it "
        "on an idle machine), then report",
    )
    p.add_argument("--timing-rounds", type=int, default=2)
    p.add_argument("--timing-steps", type=int, default=6, help="timed steps per round")
    p.add_argument("--quick", action="store_true", help="tiny model, small mixture, 4 steps")
    args = p.parse_args(argv)

    config = Path(args.config)
    out = Path(
        args.out or ROOT / "benchmarks/results" / ("quality_quick" if args.quick else "quality")
    )
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2,3,4")).split(",")]
    names = parse_variants(args.variants)
    common: list[str] = []
    model = args.model
    if args.quick:
        common += QUICK_OVERRIDES
        if model is None:
            model = str(make_tiny_model_dir(out / "tiny-model"))
    if model:
        common.append(f"model.name={model}")
    if args.steps:
        common.append(f"train.steps={args.steps}")
    common += args.set
    # pseudo-source variants embed the training data once, for every seed and variant
    common.append(f"data.embeddings_cache={out / 'runs' / 'embeddings'}")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""

    base_cfg = resolved_config(config, common)
    base = base_point(config, common, out / "finished" / "base.json")
    variants: dict[str, dict] = {}
    for name in names:
        variants[name] = {
            "overrides": variant_overrides(name, base_cfg),
            "description": VARIANTS[name][1],
            "runs": [],
        }
    failed: list[str] = []
    for name, seed in run_order([(n, seeds) for n in names]):
        ov = variants[name]["overrides"]
        run_dir = out / "runs" / f"{name}-seed{seed}"
        ov = [*common, *ov, f"name={name}", f"output_dir={run_dir}", f"train.seed={seed}"]
        record = out / "finished" / f"{name}-seed{seed}.json"
        if args.report_only:
            want = _key(resolved_config(config, ov))
            rec = json.loads(record.read_text()) if record.exists() else None
            rec = rec if rec and same_config(rec.get("config"), want, _key(_defaults())) else None
            if rec is None:
                continue
        else:
            rec = run_one(config, ov, run_dir, record, env, args.timeout, args.force)
        if rec is None:
            failed.append(f"{name}-seed{seed}")
            continue
        variants[name]["runs"].append(
            {"seed": seed, **{k: v for k, v in rec.items() if k != "config"}}
        )

    timing_path = out / "finished" / "timing.json"
    if args.timing:
        steps = 2 if args.quick else args.timing_steps
        measure_times(
            config, names, variants, common, out, env, args.timing_rounds, steps, warmup=2
        )
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    analysis = analyse(variants, base, timing)
    plots = plot_curves(variants, base, analysis, out)
    from colm.config import load_config

    cfg = load_config(config, common)
    t = cfg.train
    per_source = cfg.eval.limit_per_task or cfg.data.mixture.get("test_per_source", 20)
    device = "cuda" if args.device != "cpu" and _cuda() else "cpu"
    payload = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device, default_threads()),
        "config": str(config),
        "settings": {
            "model": cfg.model.name,
            "steps": t.steps,
            "source_batch": t.source_batch,
            "coreset": cfg.selector_config().coreset_size(t.source_batch),
            "max_length": cfg.data.max_length,
            "per_source": per_source,
            "heldout_examples": len(base["point"]["loss"]) * per_source,
            "eval": base_cfg["eval"],
            "overrides": common,
        },
        "seeds": seeds,
        "base": base,
        "variants": variants,
        "analysis": analysis,
        "timing": timing,
        "failed": failed,
        "plots": plots,
    }
    (out / "quality.json").write_text(json.dumps(payload, indent=1))
    md = markdown(payload, plots)
    (out / "quality.md").write_text(md)
    print(md)
    print(f"wrote {out / 'quality.json'}, {out / 'quality.md'} and {', '.join(plots)}")
    return 1 if failed and not args.report_only else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
