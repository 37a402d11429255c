"""Reading colm run directories: what ``colm train`` wrote, parsed for reports.

A run directory holds::

    config.yaml    resolved configuration (``name``, ``train.method``, ...)
    metrics.jsonl  one JSON object per line: training lines with ``step``, ``loss``,
                   ``wall_time`` (s since start) and CoLM selection statistics
                   ``colm/<source>/{in_batch,selected,kept}``; eval lines with ``eval_loss``
    heldout.jsonl  held-out loss per source during training (``eval.every``,
                   ``eval.at_start``): ``step``, ``wall_time``, ``loss``, ``se``
    eval.json      the :func:`colm.evaluate.evaluate` result (optional)
    memory.json    ``{"peak_mb": ...}`` (optional)
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

__all__ = [
    "RunData",
    "final_loss",
    "heldout_after",
    "heldout_before",
    "out_of_domain",
    "read_run",
]

_STATS = ("in_batch", "selected", "kept")
FINAL_FRACTION = 0.1
"""The final train loss is the mean of the last 10% of the logged losses (at least one)."""


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
    heldout: list[dict[str, Any]] = field(default_factory=list)
    """heldout.jsonl's points (``step``, ``wall_time``, ``loss`` and ``se`` per source), by step."""

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
        method=_method_label(config, train_cfg),
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
    run.heldout = _read_heldout(path / "heldout.jsonl")
    memory = _read_json(path / "memory.json", "peak memory")
    if memory is not None and _is_number(memory.get("peak_mb")):
        run.peak_mb = float(memory["peak_mb"])
    return run


def _method_label(config: dict[str, Any], train_cfg: dict[str, Any]) -> str:
    """``train.method``, with the selection named where the config names it
    (``colm (random_big)``, ``colm (paper)``): colm runs differ by their selector."""
    method = str(train_cfg.get("method") or config.get("method") or "-")
    selector = config.get("selector")
    if method == "colm" and isinstance(selector, dict):
        named = selector.get("method") or selector.get("preset")
        if isinstance(named, str):
            return f"colm ({named})"
    return method


def _read_heldout(path: Path) -> list[dict[str, Any]]:
    """heldout.jsonl's points with a loss per source, one per step (the last written wins:
    a resumed run measures a step again)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in _read_metrics(path) if path.is_file() else []:
        if _is_number(row.get("step")) and isinstance(row.get("loss"), dict):
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


Interval = tuple[float, float]  # (loss, standard error; NaN where not measured)


def heldout_before(run: RunData) -> dict[str, Interval] | None:
    """Held-out loss per source of the untrained model (heldout.jsonl's step 0, written
    with eval.at_start), or None."""
    if not run.heldout or int(run.heldout[0]["step"]) != 0:
        return None
    return _with_se(run.heldout[0]["loss"], run.heldout[0].get("se"))


def heldout_after(run: RunData) -> dict[str, Interval] | None:
    """Held-out loss per source after training (eval.json, else the last curve point)."""
    ev = run.eval or {}
    if ev.get("loss"):
        return _with_se(ev["loss"], ev.get("loss_se"))
    if run.heldout and int(run.heldout[-1]["step"]) > 0:
        return _with_se(run.heldout[-1]["loss"], run.heldout[-1].get("se"))
    return None


def out_of_domain(runs: Sequence[RunData]) -> set[str]:
    """Held-out sources that no run trained on (heldout.jsonl's ``sources_out``)."""
    return {s for r in runs for p in r.heldout for s in p.get("sources_out") or ()}


def _with_se(loss: dict[str, Any], se: dict[str, Any] | None) -> dict[str, Interval]:
    se = se or {}
    return {
        s: (float(v), float(se[s]) if _is_number(se.get(s)) else math.nan)
        for s, v in loss.items()
        if _is_number(v)
    }


def _unique_names(runs: list[RunData]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.name, 0)
        seen[run.name] = n + 1
        if n:
            run.name = f"{run.name} ({n + 1})"


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
