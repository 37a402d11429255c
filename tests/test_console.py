"""The console of ``colm train``: one progress bar, no log dictionaries, a summary."""

from __future__ import annotations

import io
import json
import math
import re

import pytest

from colm.cli import main
from colm.console import ConsoleProgress, summary_table
from tests.integration.test_cli import _config


def test_train_console_shows_a_bar_and_a_summary_not_log_dicts(tmp_path, tiny_model_dir, capfd):
    cfg = _config(tmp_path, tiny_model_dir, "colm")
    # 80 tokens truncate some examples: the data report must say so once
    args = ["train.steps=3", "eval.at_start=true", "eval.generate=false", "data.max_length=80"]
    assert main(["train", str(cfg), *args, "data.overflow=truncate"]) == 0
    out, err = capfd.readouterr()
    console = out + err
    # the Trainer's log dicts (with colm's per-source keys) are not printed ...
    assert "colm/basic_arithmetic/selected" not in console
    assert "{'loss'" not in console
    # ... but they are all in metrics.jsonl
    assert "colm/basic_arithmetic/selected" in (tmp_path / "colm" / "metrics.jsonl").read_text()
    # one bar that reached the last step, with the figures a person watches
    assert re.search(r"training: 100%.*3/3", err)
    assert re.search(r"loss \d+\.\d{3}, \d+\.\d\d s/step, selection \d+%", err)
    # the summary: before -> after per group, time, memory, report
    assert re.search(r"big sources\s+2\s+\d+\.\d{3}\s+\d+\.\d{3}\s+[+-]\d+\.\d{3}", out)
    assert re.search(r"small sources\s+2\s+\d+\.\d{3}", out)
    assert re.search(r"out of domain\s+1\s+\d+\.\d{3}", out)
    assert "training time" in out and "peak memory" in out
    assert f"colm report {tmp_path / 'colm'}" in out
    # the data report once, as a line of colm's (not also as a warning with its source line)
    assert console.count("examples kept at max_length=80") == 1
    assert re.search(r"kept at max_length=80 \([1-9]\d* truncated", console)
    assert "is_gradient_checkpointing" not in console
    assert "warnings.warn(" not in console


def test_summary_table_groups_and_differences():
    text = summary_table(
        {"a": 2.0, "b": 1.0, "s": 3.0, "o": 4.0},
        {"a": 1.5, "b": 0.5, "s": 2.0, "o": 3.5},
        small={"s"},
        out_of_domain={"o"},
        seconds=125,
        peak_mb=2048,
        report=None,
    )
    rows = {
        line.split()[0] + line.split()[1]: line.split()
        for line in text.splitlines()
        if "sources" in line or "domain" in line
    }
    assert rows["bigsources"][2:] == ["2", "1.500", "1.000", "-0.500"]
    assert rows["smallsources"][2:] == ["1", "3.000", "2.000", "-1.000"]
    assert rows["outof"][3:] == ["1", "4.000", "3.500", "-0.500"]
    assert "2 min 5 s" in text and "2.0 GB" in text
    # no "before" (no step-0 evaluation): dashes, not made-up numbers
    text = summary_table(None, {"a": 1.0}, set(), set(), None, None, None)
    assert re.search(r"big sources\s+1\s+-\s+1\.000\s+-", text)


def test_progress_postfix_is_median_step_and_selection_share():
    bar = ConsoleProgress(file=io.StringIO())
    bar.step_s = [2.0, 4.0, 100.0]
    bar.selection_s = [1.0, 1.0, 1.0]
    bar._loss = 1.23456
    assert bar.postfix() == "loss 1.235, 4.00 s/step, selection 25%"


def test_tensorboard_event_files_hold_the_loss_and_selection_stats(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config(tmp_path, tiny_model_dir, "colm")
    assert main(["train", str(cfg), "train.steps=3", "train.report_to=[tensorboard]"]) == 0
    folder = tmp_path / "colm" / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*")), "no event file"
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "train/loss" in tags
    assert {"train/colm/basic_arithmetic/selected", "train/colm/time_features"} <= tags
    loss = [e.value for e in events.Scalars("train/loss")]
    assert len(loss) == 3 and all(math.isfinite(v) for v in loss)
    # the same numbers as metrics.jsonl
    rows = [json.loads(x) for x in (tmp_path / "colm" / "metrics.jsonl").read_text().splitlines()]
    want = [r["loss"] for r in rows if "loss" in r]
    assert loss == pytest.approx(want, rel=1e-6)
    selected = [e.value for e in events.Scalars("train/colm/basic_arithmetic/selected")]
    assert selected == [r["colm/basic_arithmetic/selected"] for r in rows if "loss" in r]
