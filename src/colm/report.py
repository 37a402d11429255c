"""Compare training runs: a Markdown report with tables and PNG plots.

:func:`make_report` reads run directories (:mod:`colm.runs` says what they hold) and
writes ``report.md`` with its plots (:mod:`colm.plots`) next to it: held-out loss
against step and wall time, held-out loss per source before and after training with
95% intervals, the training loss (smoothed), generation accuracy per task where it was
measured, and each source's share of the selected examples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import write_text_atomic
from .plots import plot_accuracy, plot_before_after, plot_heldout, plot_loss, plot_share
from .runs import (
    FINAL_FRACTION,
    RunData,
    _accuracy,
    _share_source,
    _tasks,
    _unique_names,
    final_loss,
    heldout_after,
    heldout_before,
    out_of_domain,
    read_run,
)

__all__ = ["RunData", "final_loss", "make_report", "read_run"]


# --------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _memory(mb: float | None) -> str:
    if mb is None:
        return "-"
    return f"{mb:.0f} MB" if mb < 10240 else f"{mb / 1024:.1f} GB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """A Markdown table; `align` holds one of l/r per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


# --------------------------------------------------------------------------- report


def _summary_table(runs: Sequence[RunData]) -> list[str]:
    header = [
        "run",
        "method",
        "steps",
        "final train loss",
        "wall time",
        "time/step",
        "selection time/step",
        "held-out loss (in)",
        "accuracy (in)",
        "accuracy (out)",
        "peak memory",
    ]
    rows = []
    for run in runs:
        sel = run.selection_seconds
        rows.append(
            [
                run.name,
                run.method,
                "-" if run.steps is None else str(run.steps),
                _num(run.final_loss),
                _duration(run.wall_time),
                "-" if run.time_per_step is None else f"{run.time_per_step:.2f} s",
                f"{sum(sel) / len(sel):.2f} s" if sel else "-",
                _num(run.summary.get("loss_in")),
                _pct(run.summary.get("acc_in")),
                _pct(run.summary.get("acc_out")),
                _memory(run.peak_mb),
            ]
        )
    return _table(header, rows, "ll" + "r" * (len(header) - 2))


def _accuracy_table(runs: Sequence[RunData]) -> list[str]:
    rows = []
    for task, split in _tasks(runs):
        row = [task, split]
        for run in runs:
            acc = _accuracy(run, split).get(task)
            row.append("-" if acc is None else _accuracy_cell(acc.get("accuracy"), acc.get("n")))
        rows.append(row)
    return _table(["task", "domain", *[r.name for r in runs]], rows, "ll" + "r" * len(runs))


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sane at 0 of 5, unlike p +- 2 se)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _accuracy_cell(acc: Any, n: Any) -> str:
    if acc is None or not isinstance(n, int) or n <= 0:
        return _pct(acc)
    lo, hi = wilson(acc * n, n)
    return f"{_pct(acc)} of {n} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _interval(value: tuple[float, float] | None) -> str:
    if value is None or not math.isfinite(value[0]):
        return "-"
    loss, se = value
    return f"{loss:.4f}" if not math.isfinite(se) else f"{loss:.4f} ± {1.96 * se:.4f}"


def _loss_table(runs: Sequence[RunData]) -> list[str]:
    """Held-out loss per source with its 95% interval: the untrained model (where a run
    measured it) and every run after training; n is the held-out examples per source."""
    before = next((b for b in map(heldout_before, runs) if b), None)
    afters = [heldout_after(r) or {} for r in runs]
    sources: list[str] = []
    for a in afters:
        sources += [s for s in a if s not in sources]
    n_of: dict[str, Any] = {}
    for r in runs:
        n_of.update((r.eval or {}).get("loss_examples") or {})
    header = ["source", "n"] + (["untrained"] if before else []) + [r.name for r in runs]
    rows = []
    ood = out_of_domain(runs)
    for s in sources:
        row = [f"{s} (out)" if s in ood else s, str(n_of.get(s, "-"))]
        if before:
            row.append(_interval(before.get(s)))
        rows.append(row + [_interval(a.get(s)) for a in afters])
    return _table(header, rows, "l" + "r" * (len(header) - 1))


def _share_table(runs: Sequence[RunData]) -> list[str]:
    shown = [(run, _share_source(run)) for run in runs]
    shown = [(run, s) for run, s in shown if s is not None]
    sources: list[str] = []
    for _, (_, counts) in shown:
        sources += [s for s in counts if s not in sources]
    rows = [[s, *[_pct(c.get(s, 0.0) / sum(c.values())) for _, (_, c) in shown]] for s in sources]
    names = [run.name + ("" if stat == "selected" else " (in batch)") for run, (stat, _) in shown]
    return _table(["source", *names], rows)


def _pseudo_sources_section(runs: Sequence[RunData]) -> list[str]:
    """Runs trained on pseudo-sources (data.sources=auto): what each cluster is."""
    lines: list[str] = []
    for run in runs:
        for name, when in (
            ("pseudo_sources.json", ""),
            ("pseudo_sources_warm.json", ", clustered again after step {step}"),
        ):
            path = Path(run.path) / name
            if path.exists():
                lines += _clusters(run.name, json.loads(path.read_text()), when)
    if lines:
        lines = [
            "## Pseudo-sources",
            "",
            "Sources found by k-means on the model's hidden states (data without source "
            "labels, or data.sources=auto; docs/pseudo_sources.md).",
            "",
            *lines,
        ]
    return lines


def _clusters(run_name: str, ps: dict, when: str) -> list[str]:
    tried = ", ".join(f"k={k}: {v:.3f}" for k, v in ps.get("silhouettes", {}).items())
    ari = ps.get("ari_vs_labels")
    return [
        f"`{run_name}`{when.format(step=ps.get('step'))}: k={ps['k']}"
        + (
            f" (silhouette {tried})"
            if tried
            else f" (found by density, min_cluster_size {ps.get('min_cluster_size')})"
            if ps.get("method") == "density"
            else " (data.num_sources)"
        )
        + (f"; adjusted Rand index against the data's labels {ari:.3f}" if ari else "")
        + (f"; {ps['note']}" if ps.get("note") else ""),
        "",
        *_table(
            ["cluster", "examples", "typical example (first words)"],
            [[c, str(n), ps.get("first_words", {}).get(c, "-")] for c, n in ps["sizes"].items()],
            "lrl",
        ),
        "",
    ]


def make_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Compare the runs in `run_dirs`; write ``report.md`` and its plots into `out_dir`.

    The summary table has, per run: name (``name`` in config.yaml, else the
    folder name), method (``train.method``), the last logged step, the final
    train loss (mean of the last 10% of logged losses), wall time (largest
    ``wall_time`` logged), time per step (wall time at the last step / step),
    mean CoLM selection time per logged step, held-out in-domain loss and
    in/out-of-domain accuracy (eval.json), and peak memory (memory.json);
    missing values show as "-". Then held-out loss curves (heldout.jsonl), held-out
    loss per source before and after training with 95% intervals, the training loss,
    per-task accuracy with its n and interval (where generation was evaluated) and
    per-source share of the selected examples. Plots without data are left out.

    Returns the path of ``report.md``.
    """
    if not run_dirs:
        raise ValueError("no run directories given; pass at least one")
    runs = [read_run(d) for d in run_dirs]
    _unique_names(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    plots = {
        "heldout_vs_step.png": plot_heldout(runs, out / "heldout_vs_step.png", "step"),
        "heldout_vs_time.png": plot_heldout(runs, out / "heldout_vs_time.png", "wall_time"),
        "heldout_before_after.png": plot_before_after(runs, out / "heldout_before_after.png"),
        "loss_vs_step.png": plot_loss(runs, out / "loss_vs_step.png", "step"),
        "loss_vs_time.png": plot_loss(runs, out / "loss_vs_time.png", "wall_time"),
        "accuracy_per_task.png": plot_accuracy(runs, out / "accuracy_per_task.png"),
        "selected_share.png": plot_share(runs, out / "selected_share.png"),
    }

    def image(name: str, alt: str, missing: str | None = None) -> list[str]:
        if plots[name]:
            return [f"![{alt}]({name})", ""]
        return [f"_{missing}_", ""] if missing else []

    lines = [
        "# colm run report",
        "",
        "Runs: " + ", ".join(f"`{r.name}` ({r.path})" for r in runs),
        "",
        "## Summary",
        "",
        *_summary_table(runs),
        "",
        f"Final train loss: mean of the last {FINAL_FRACTION:.0%} of the logged training "
        "losses, over each run's own trained examples (a coreset, a random subset or the "
        "whole batch), so compare held-out losses across methods, not train losses. "
        "Time/step: wall time at the last logged step divided by that step.",
        "",
        "## Held-out loss",
        "",
    ]
    if plots["heldout_vs_step.png"]:
        lines += [
            "Mean over the in-domain sources, measured during training (`eval.every`; "
            "`eval.at_start` adds the untrained model at step 0); the band is a 95% interval "
            "over the held-out examples. Wall time is training time, evaluations excluded.",
            "",
            *image("heldout_vs_step.png", "held-out loss vs step"),
            *image("heldout_vs_time.png", "held-out loss vs training time"),
        ]
    if any(heldout_after(r) for r in runs):
        lines += [
            "Per source (± half-width of the 95% interval over the source's n held-out "
            "examples; models evaluated on the same examples differ by less noise than the "
            "intervals suggest; (out): a source not trained on):",
            "",
            *_loss_table(runs),
            "",
            *image("heldout_before_after.png", "held-out loss per source, before and after"),
        ]
    else:
        lines += ["_No run measured held-out loss._", ""]
    lines += [
        "## Training loss",
        "",
        *image("loss_vs_step.png", "loss vs step", "No run logged a training loss."),
        *image("loss_vs_time.png", "loss vs wall time"),
    ]
    if _tasks(runs):
        lines += [
            "## Accuracy per task",
            "",
            "Share of test examples whose generated answer the task's checker scores 1.0, "
            "of n examples, with a 95% (Wilson) interval: with a few examples per task the "
            "interval is wide, so read it before the figure.",
            "",
            *_accuracy_table(runs),
            "",
            *image("accuracy_per_task.png", "accuracy per task"),
        ]
    lines += _pseudo_sources_section(runs)
    lines += ["## Selected examples per source", ""]
    if plots["selected_share.png"]:
        lines += [
            "Share of each source among the examples selected for training (runs without "
            "selection statistics: among the examples in the batch).",
            "",
            *_share_table(runs),
            "",
        ]
    lines += image(
        "selected_share.png", "selected share per source", "No run logged selection statistics."
    )
    report = out / "report.md"
    return write_text_atomic(report, "\n".join(lines).rstrip() + "\n")
