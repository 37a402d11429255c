"""What a person sees in the terminal during ``colm train``: one progress bar, one summary.

The Trainer's own console output prints every log dictionary (with colm's per-source
counts, about 30 keys a step) on its own lines, which buries the progress bar. colm
replaces it with :class:`ConsoleProgress`: one bar with the ETA and the few figures a
person watches (training loss, seconds per step, the share of the step spent selecting).
Everything else still goes to ``metrics.jsonl`` and to ``report_to`` (TensorBoard,
W&B). At the end :func:`summary_table` prints held-out loss before -> after per source
group, the time, the peak memory and where the report is.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

SELECTION_KEYS = ("colm/time_features", "colm/time_selection")


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (the launchers set RANK), else True."""
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    """One ``colm: ...`` line on stderr, from the main process only."""
    if is_main_process():
        print(f"colm: {msg}", file=sys.stderr, flush=True)


def install(trainer: Any) -> ConsoleProgress:
    """Swap the Trainer's console callbacks (which print each log dict) for one bar."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    bar = ConsoleProgress()
    trainer.add_callback(bar)
    return bar


class ConsoleProgress(TrainerCallback):
    """One tqdm bar on stderr, main process only: step / total with ETA, and as postfix
    the last logged loss, the median seconds per step and the selection's share of it."""

    def __init__(self, file: Any = None):
        self.file = file
        self.bar: Any = None
        self.step_s: list[float] = []
        self.selection_s: list[float] = []
        self._last: float | None = None
        self._loss: float | None = None

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            desc="training",
            unit="step",
            file=self.file or sys.stderr,
            dynamic_ncols=True,
        )
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.bar is None:
            return
        now = time.perf_counter()
        if self._last is not None:
            self.step_s.append(now - self._last)
        self._last = now
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is None or not logs or "loss" not in logs:
            return
        self._loss = float(logs["loss"])
        if any(k in logs for k in SELECTION_KEYS):
            self.selection_s.append(sum(float(logs.get(k, 0.0)) for k in SELECTION_KEYS))
        self.bar.set_postfix_str(self.postfix(), refresh=True)

    def postfix(self) -> str:
        parts = []
        if self._loss is not None and math.isfinite(self._loss):
            parts.append(f"loss {self._loss:.3f}")
        if self.step_s:
            step = statistics.median(self.step_s)
            parts.append(f"{step:.2f} s/step")
            if self.selection_s and step > 0:
                share = statistics.median(self.selection_s) / step
                parts.append(f"selection {min(share, 1.0):.0%}")
        return ", ".join(parts)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def group_of(source: str, small: set[str], out_of_domain: set[str]) -> str:
    if source in out_of_domain:
        return "out of domain"
    return "small sources" if source in small else "big sources"


def summary_table(
    before: Mapping[str, float] | None,
    after: Mapping[str, float],
    small: set[str],
    out_of_domain: set[str],
    seconds: float | None,
    peak_mb: float | None,
    report: str | None,
) -> str:
    """The end-of-run summary: held-out loss per source group (mean over the group's
    sources), before training -> after, then time, peak memory and the report's path."""
    groups: dict[str, list[str]] = {}
    for src in after:
        groups.setdefault(group_of(src, small, out_of_domain), []).append(src)
    lines = ["", "held-out loss (mean over sources)", ""]
    rows: list[Sequence[str]] = [("group", "sources", "before", "after", "change")]
    for name in ("big sources", "small sources", "out of domain"):
        srcs = groups.get(name)
        if not srcs:
            continue
        a = statistics.fmean(after[s] for s in srcs)
        b = statistics.fmean(before[s] for s in srcs) if before else None
        rows.append(
            (
                name,
                str(len(srcs)),
                "-" if b is None else f"{b:.3f}",
                f"{a:.3f}",
                "-" if b is None else f"{a - b:+.3f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
        )
    lines.append("")
    if seconds is not None:
        lines.append(f"training time  {_duration(seconds)}")
    if peak_mb is not None:
        lines.append(f"peak memory    {peak_mb / 1024:.1f} GB")
    if report:
        lines.append(f"report         {report}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"
