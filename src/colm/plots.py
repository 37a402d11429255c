"""The report's PNG plots, drawn with matplotlib's object-oriented API on the Agg canvas
(so the caller's pyplot backend is left alone). Each ``plot_*`` returns False, drawing
nothing, when no run has the data it needs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runs import (
    RunData,
    _accuracy,
    _is_number,
    _share_source,
    _tasks,
    heldout_after,
    heldout_before,
    out_of_domain,
)


def _figure(width: float = 7.5, height: float = 4.5):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.subplots()


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average; the raw loss of one small batch is noisy."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss(runs: Sequence[RunData], path: Path, x_key: str) -> bool:
    fig, ax = _figure()
    colors = _colors(len(runs))
    scale, unit = 1.0, "s"
    if x_key == "wall_time":
        longest = max((r.wall_time or 0.0) for r in runs)
        scale, unit = (60.0, "min") if longest >= 600 else (1.0, "s")
        if longest >= 36000:
            scale, unit = 3600.0, "h"
    drawn = False
    for run, color in zip(runs, colors):
        rows = [r for r in run.train if _is_number(r.get(x_key))]
        if not rows:
            continue
        x = [float(r[x_key]) / scale for r in rows]
        y = [float(r["loss"]) for r in rows]
        window = max(1, len(y) // 20)
        if window > 1:
            ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(x, _smooth(y, window), color=color, linewidth=1.6, label=f"{run.name} (train)")
        ev = [r for r in run.evals if _is_number(r.get(x_key))]
        if ev:
            ax.plot(
                [float(r[x_key]) / scale for r in ev],
                [float(r["eval_loss"]) for r in ev],
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{run.name} (eval)",
            )
        drawn = True
    if not drawn:
        return False
    ax.set_xlabel("step" if x_key == "step" else f"wall time ({unit})")
    ax.set_ylabel("loss")
    ax.set_title(
        "Training loss (smoothed; over each run's own trained examples)"
        + (" vs wall time" if x_key == "wall_time" else "")
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True


def plot_accuracy(runs: Sequence[RunData], path: Path) -> bool:
    tasks = _tasks(runs)
    with_eval = [r for r in runs if _accuracy(r, "in") or _accuracy(r, "out")]
    if not tasks or not with_eval:
        return False
    fig, ax = _figure(max(7.5, 0.6 * len(tasks) * max(1, len(with_eval) / 2) + 2), 4.8)
    width = 0.8 / len(with_eval)
    colors = _colors(len(runs))
    for k, run in enumerate(with_eval):
        heights = [
            (_accuracy(run, split).get(task) or {}).get("accuracy", 0.0) for task, split in tasks
        ]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(tasks))]
        ax.bar(xs, heights, width=width, color=colors[runs.index(run)], label=run.name)
    n_in = sum(split == "in" for _, split in tasks)
    if 0 < n_in < len(tasks):
        ax.axvline(n_in - 0.5, color="gray", linestyle=":")
        ax.text(n_in - 0.4, 1.02, "out of domain", fontsize="small", color="gray")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([t for t, _ in tasks], rotation=35, ha="right", fontsize="small")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy (score = 1)")
    ax.set_title("Generation accuracy per task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True


def plot_share(runs: Sequence[RunData], path: Path) -> bool:
    bars = [(run, _share_source(run)) for run in runs]
    bars = [(run, s) for run, s in bars if s is not None]
    if not bars:
        return False
    sources: list[str] = []
    for _, (_, counts) in bars:
        sources += [s for s in counts if s not in sources]
    fig, ax = _figure(max(6.0, 1.3 * len(bars) + 4.0), 4.8)
    colors = _colors(len(sources))
    bottoms = [0.0] * len(bars)
    for source, color in zip(sources, colors):
        shares = [counts.get(source, 0.0) / sum(counts.values()) for _, (_, counts) in bars]
        ax.bar(range(len(bars)), shares, bottom=bottoms, color=color, label=source, width=0.6)
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    labels = [run.name + ("" if stat == "selected" else "\n(in batch)") for run, (stat, _) in bars]
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels(labels, fontsize="small")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of selected examples")
    ax.set_title("Selected examples per source")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path)
    return True


def _time_scale(runs: Sequence[RunData]) -> tuple[float, str]:
    longest = max([(r.wall_time or 0.0) for r in runs] + [0.0])
    if longest >= 36000:
        return 3600.0, "h"
    return (60.0, "min") if longest >= 600 else (1.0, "s")


def _mean_loss(point: dict[str, Any], sources: Sequence[str]) -> tuple[float, float] | None:
    """Mean held-out loss over ``sources`` at one point, and its standard error (the
    sources' errors combined as independent)."""
    loss, se = point.get("loss") or {}, point.get("se") or {}
    if not sources or not all(_is_number(loss.get(s)) for s in sources):
        return None
    mean = sum(float(loss[s]) for s in sources) / len(sources)
    errs = [float(se[s]) for s in sources if _is_number(se.get(s))]
    err = (
        math.sqrt(sum(e * e for e in errs)) / len(sources)
        if len(errs) == len(sources)
        else math.nan
    )
    return mean, err


def plot_heldout(runs: Sequence[RunData], path: Path, x_key: str) -> bool:
    """Held-out loss (mean over the in-domain sources) against step or training wall
    time (evaluations excluded), one line per run on the same axes, with a 95% band where
    standard errors were recorded. The untrained model's point is step 0."""
    with_curve = [r for r in runs if r.heldout]
    if not with_curve:
        return False
    scale, unit = _time_scale(runs) if x_key == "wall_time" else (1.0, "")
    fig, ax = _figure()
    colors = _colors(len(runs))
    for run in with_curve:
        out = set(run.heldout[-1].get("sources_out") or [])
        sources = [s for s in run.heldout[-1]["loss"] if s not in out]
        xs, ys, lo, hi = [], [], [], []
        for p in run.heldout:
            m = _mean_loss(p, sources)
            if m is None or not _is_number(p.get(x_key)):
                continue
            xs.append(float(p[x_key]) / scale)
            ys.append(m[0])
            lo.append(m[0] - 1.96 * m[1])
            hi.append(m[0] + 1.96 * m[1])
        color = colors[runs.index(run)]
        ax.plot(xs, ys, color=color, marker="o", markersize=3, linewidth=1.6, label=run.name)
        if all(math.isfinite(v) for v in lo + hi):
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax.set_xlabel("step" if x_key == "step" else f"training wall time ({unit})")
    ax.set_ylabel("held-out loss (in domain, mean over sources)")
    ax.set_title("Held-out loss" + (" vs training time" if x_key == "wall_time" else " vs step"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True


def plot_before_after(runs: Sequence[RunData], path: Path) -> bool:
    """Held-out loss per source: the untrained model (where a run measured it) beside
    every run's trained model, with 95% intervals."""
    before = next((b for b in map(heldout_before, runs) if b), None)
    afters = [(run, heldout_after(run)) for run in runs]
    afters = [(run, a) for run, a in afters if a]
    if not afters:
        return False
    sources: list[str] = []
    for _, a in afters:
        sources += [s for s in a if s not in sources]
    bars: list[tuple[str, dict[str, tuple[float, float]], Any]] = []
    if before:
        bars.append(("untrained", before, (0.6, 0.6, 0.6, 1.0)))
    colors = _colors(len(runs))
    bars += [(run.name, a, colors[runs.index(run)]) for run, a in afters]
    fig, ax = _figure(max(7.5, 0.55 * len(sources) * max(1, len(bars) / 2) + 2), 4.8)
    width = 0.8 / len(bars)
    for k, (label, values, color) in enumerate(bars):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(sources))]
        hs = [values.get(s, (math.nan, math.nan))[0] for s in sources]
        es = [1.96 * values.get(s, (math.nan, math.nan))[1] for s in sources]
        errs = [e if math.isfinite(e) else 0.0 for e in es]
        ax.bar(
            xs,
            hs,
            width=width,
            color=color,
            label=label,
            yerr=errs,
            capsize=2,
            error_kw={"linewidth": 0.8},
        )
    ood = out_of_domain(runs)
    ax.set_xticks(range(len(sources)))
    ax.set_xticklabels(
        [f"{s} (out)" if s in ood else s for s in sources],
        rotation=35,
        ha="right",
        fontsize="small",
    )
    ax.set_ylabel("held-out loss (95% interval)")
    ax.set_title("Held-out loss per source, before and after training")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True
