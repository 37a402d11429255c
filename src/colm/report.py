"""Compare training runs: a Markdown report with tables and PNG plots.

A run directory (written by ``colm train``) holds::

    config.yaml    resolved configuration (``name``, ``train.method``, ...)
    metrics.jsonl  one JSON object per line: training lines with ``step``, ``loss``,
                   ``wall_time`` (s since start) and CoLM selection statistics
                   ``colm/<source>/{in_batch,selected,kept}``; eval lines with ``eval_loss``
    eval.json      the :func:`colm.evaluate.evaluate` result (optional)
    memory.json    ``{"peak_mb": ...}`` (optional)

:func:`make_report` reads several of them and writes ``report.md`` with
``loss_vs_step.png``, ``loss_vs_time.png``, ``accuracy_per_task.png`` and
``selected_share.png`` next to it. Plots are drawn with matplotlib's
object-oriented API on the Agg canvas, so the caller's pyplot backend is left alone.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunData", "final_loss", "make_report", "read_run"]

_STATS = ("in_batch", "selected", "kept")
FINAL_FRACTION = 0.1
"""The final train loss is the mean of the last 10% of the logged losses (at least one)."""


# --------------------------------------------------------------------------- reading


@dataclass
class RunData:
    """What a run directory holds, parsed."""

    path: Path
    name: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)
    """Training log lines (``step`` and ``loss``), one per step (the last one written wins)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Lines with ``eval_loss``."""
    selection: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{stat: {source: total over all lines}}`` for stat in in_batch, selected, kept."""
    selection_seconds: list[float] = field(default_factory=list)
    """``colm/time_features + colm/time_selection`` of each line that has them."""
    wall_time: float | None = None
    eval: dict[str, Any] | None = None
    peak_mb: float | None = None

    @property
    def steps(self) -> int | None:
        return int(self.train[-1]["step"]) if self.train else None

    @property
    def final_loss(self) -> float | None:
        return final_loss([float(line["loss"]) for line in self.train])

    @property
    def time_per_step(self) -> float | None:
        """Wall time at the last logged step divided by that step."""
        last = next((ln for ln in reversed(self.train) if _is_number(ln.get("wall_time"))), None)
        if last is None or int(last["step"]) <= 0:
            return None
        return float(last["wall_time"]) / int(last["step"])

    @property
    def summary(self) -> dict[str, Any]:
        return (self.eval or {}).get("summary") or {}


def final_loss(losses: Sequence[float], fraction: float = FINAL_FRACTION) -> float | None:
    """Mean of the last ``ceil(fraction * n)`` losses (at least one); None if there are none."""
    if not losses:
        return None
    k = max(1, math.ceil(fraction * len(losses)))
    tail = losses[-k:]
    return sum(tail) / len(tail)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """Lines of metrics.jsonl; unreadable lines (a run killed mid-write) are skipped with a warning."""
    rows, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad.append(lineno)
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:10]))}"
            f"{', ...' if len(bad) > 10 else ''}); a run stopped while writing leaves a "
            "truncated last line",
            stacklevel=3,
        )
    return rows


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: not valid JSON ({e}); {what} shown as '-'", stacklevel=3)
        return None
    if not isinstance(data, dict):
        warnings.warn(f"{path}: expected a JSON object; {what} shown as '-'", stacklevel=3)
        return None
    return data


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        warnings.warn(f"{path}: not valid YAML ({e}); using the folder name", stacklevel=3)
        return {}
    return data if isinstance(data, dict) else {}


def read_run(run_dir: str | os.PathLike) -> RunData:
    """Parse one run directory. Raises FileNotFoundError if it has no metrics.jsonl."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{path} has no metrics.jsonl, so it is not a colm run directory (or its run "
            "never logged a step); pass the folder given as the training output directory"
        )
    config = _read_config(path / "config.yaml")
    train_cfg = config.get("train") if isinstance(config.get("train"), dict) else {}
    run = RunData(
        path=path,
        name=str(config.get("name") or path.resolve().name),
        method=str(train_cfg.get("method") or config.get("method") or "-"),
        config=config,
    )
    by_step: dict[int, dict[str, Any]] = {}
    wall = []
    for row in _read_metrics(metrics):
        if _is_number(row.get("wall_time")):
            wall.append(float(row["wall_time"]))
        if _is_number(row.get("step")) and _is_number(row.get("loss")):
            by_step[int(row["step"])] = row  # a resumed run logs steps again: keep the last
        if _is_number(row.get("eval_loss")):
            run.evals.append(row)
        for key, value in row.items():
            if not key.startswith("colm/") or not _is_number(value):
                continue
            source, _, stat = key[len("colm/") :].rpartition("/")
            if source and stat in _STATS:
                counts = run.selection.setdefault(stat, {})
                counts[source] = counts.get(source, 0.0) + float(value)
        times = [row.get("colm/time_features"), row.get("colm/time_selection")]
        if any(_is_number(t) for t in times):
            run.selection_seconds.append(sum(float(t) for t in times if _is_number(t)))
    run.train = [by_step[s] for s in sorted(by_step)]
    run.wall_time = max(wall) if wall else None
    if not run.train:
        warnings.warn(f"{metrics} has no training lines (step + loss)", stacklevel=2)
    run.eval = _read_json(path / "eval.json", "held-out loss and accuracy")
    memory = _read_json(path / "memory.json", "peak memory")
    if memory is not None and _is_number(memory.get("peak_mb")):
        run.peak_mb = float(memory["peak_mb"])
    return run


def _unique_names(runs: list[RunData]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.name, 0)
        seen[run.name] = n + 1
        if n:
            run.name = f"{run.name} ({n + 1})"


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


def _accuracy(run: RunData, split: str) -> dict[str, dict[str, Any]]:
    return (run.eval or {}).get(f"accuracy_{split}") or {}


def _tasks(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    """(task, split) over all runs, in-domain first, in first-seen order."""
    out: list[tuple[str, str]] = []
    for split in ("in", "out"):
        for run in runs:
            for task in _accuracy(run, split):
                if (task, split) not in out:
                    out.append((task, split))
    return out


def _share_source(run: RunData) -> tuple[str, dict[str, float]] | None:
    """(stat, counts) for the selected-share plot: ``selected``, else ``in_batch``."""
    for stat in ("selected", "in_batch"):
        counts = run.selection.get(stat)
        if counts and sum(counts.values()) > 0:
            return stat, counts
    return None


# --------------------------------------------------------------------------- plots


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


def _plot_loss(runs: Sequence[RunData], path: Path, x_key: str) -> bool:
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
    ax.set_title("Training loss" + (" vs wall time" if x_key == "wall_time" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True


def _plot_accuracy(runs: Sequence[RunData], path: Path) -> bool:
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


def _plot_share(runs: Sequence[RunData], path: Path) -> bool:
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
            row.append("-" if acc is None else f"{_pct(acc.get('accuracy'))} (n={acc.get('n')})")
        rows.append(row)
    return _table(["task", "domain", *[r.name for r in runs]], rows, "ll" + "r" * len(runs))


def _loss_table(runs: Sequence[RunData]) -> list[str]:
    sources: list[str] = []
    for run in runs:
        sources += [s for s in (run.eval or {}).get("loss") or {} if s not in sources]
    rows = [[s, *[_num(((r.eval or {}).get("loss") or {}).get(s)) for r in runs]] for s in sources]
    return _table(["source", *[r.name for r in runs]], rows)


def _share_table(runs: Sequence[RunData]) -> list[str]:
    shown = [(run, _share_source(run)) for run in runs]
    shown = [(run, s) for run, s in shown if s is not None]
    sources: list[str] = []
    for _, (_, counts) in shown:
        sources += [s for s in counts if s not in sources]
    rows = [[s, *[_pct(c.get(s, 0.0) / sum(c.values())) for _, (_, c) in shown]] for s in sources]
    names = [run.name + ("" if stat == "selected" else " (in batch)") for run, (stat, _) in shown]
    return _table(["source", *names], rows)


def make_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Compare the runs in `run_dirs`; write ``report.md`` and its plots into `out_dir`.

    The summary table has, per run: name (``name`` in config.yaml, else the
    folder name), method (``train.method``), the last logged step, the final
    train loss (mean of the last 10% of logged losses), wall time (largest
    ``wall_time`` logged), time per step (wall time at the last step / step),
    mean CoLM selection time per logged step, held-out in-domain loss and
    in/out-of-domain accuracy (eval.json), and peak memory (memory.json);
    missing values show as "-". Then per-task accuracy, per-source held-out
    loss and per-source share of the selected examples. Plots without data
    (e.g. no run has eval.json) are left out and the report says so.

    Returns the path of ``report.md``.
    """
    if not run_dirs:
        raise ValueError("no run directories given; pass at least one")
    runs = [read_run(d) for d in run_dirs]
    _unique_names(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    plots = {
        "loss_vs_step.png": _plot_loss(runs, out / "loss_vs_step.png", "step"),
        "loss_vs_time.png": _plot_loss(runs, out / "loss_vs_time.png", "wall_time"),
        "accuracy_per_task.png": _plot_accuracy(runs, out / "accuracy_per_task.png"),
        "selected_share.png": _plot_share(runs, out / "selected_share.png"),
    }

    def image(name: str, alt: str, missing: str) -> list[str]:
        return [f"![{alt}]({name})", ""] if plots[name] else [f"_{missing}_", ""]

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
        "losses. Time/step: wall time at the last logged step divided by that step. "
        "Accuracy: share of test examples whose generated answer the task's checker scores "
        "1.0, averaged over tasks.",
        "",
        "## Loss curves",
        "",
        *image("loss_vs_step.png", "loss vs step", "No run logged a training loss."),
        *image("loss_vs_time.png", "loss vs wall time", "No run logged wall_time."),
        "## Accuracy per task",
        "",
    ]
    if _tasks(runs):
        lines += [*_accuracy_table(runs), ""]
    lines += image("accuracy_per_task.png", "accuracy per task", "No run has eval.json.")
    lines += ["## Held-out loss per source", ""]
    if any((r.eval or {}).get("loss") for r in runs):
        lines += [*_loss_table(runs), ""]
    else:
        lines += ["_No run has eval.json._", ""]
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
    tmp = report.with_name(f".report.md.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, report)
    return report
