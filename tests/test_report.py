"""colm.report: Markdown numbers, PNG plots, and the awkward run directories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from colm.report import final_loss, make_report, read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCES = {"basic_arithmetic": 10, "chain_sum": 4, "gcd": 2}  # examples per batch


def _loss(step: int, offset: float) -> float:
    return 3.0 * math.exp(-step / 15) + offset + 0.05 * ((step * 7) % 5)


def _eval_result(loss_offset: float, acc: float) -> dict:
    loss = {"basic_arithmetic": 1.0 + loss_offset, "chain_sum": 1.5 + loss_offset, "gcd": 0.5}
    acc_in = {
        "basic_arithmetic": {"accuracy": acc, "n": 20, "mean_score": acc},
        "chain_sum": {"accuracy": acc / 2, "n": 20, "mean_score": acc / 2 + 0.1},
        "gcd": {"accuracy": 1.0, "n": 20, "mean_score": 1.0},
    }
    acc_out = {"products": {"accuracy": acc / 4, "n": 20, "mean_score": acc / 4}}
    a_in = [v["accuracy"] for v in acc_in.values()]
    return {
        "loss": {**loss, "products": 2.0},
        "accuracy_in": acc_in,
        "accuracy_out": acc_out,
        "summary": {
            "loss_in": sum(loss.values()) / 3,
            "loss_out": 2.0,
            "acc_in": sum(a_in) / 3,
            "acc_out": acc / 4,
            "acc_all": (sum(a_in) + acc / 4) / 4,
        },
    }


def make_run(
    root: Path,
    folder: str,
    *,
    name: str | None,
    method: str,
    steps: int = 30,
    offset: float = 0.0,
    seconds_per_step: float = 2.0,
    selection: bool = True,
    eval_result: dict | None = None,
    peak_mb: float | None = None,
) -> Path:
    """A run directory as the trainer writes it."""
    run = root / folder
    run.mkdir(parents=True)
    config = {"seed": 0, "train": {"method": method, "max_steps": steps, "batch_size": 16}}
    if name is not None:
        config["name"] = name
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step in range(1, steps + 1):
        line = {
            "step": step,
            "loss": _loss(step, offset),
            "learning_rate": 1e-4,
            "wall_time": seconds_per_step * step,
        }
        for source, n in SOURCES.items():
            line[f"colm/{source}/in_batch"] = n
            if selection:  # big sources halved, the small one kept whole
                line[f"colm/{source}/selected"] = n if source == "gcd" else n // 2
                line[f"colm/{source}/kept"] = n if source == "gcd" else 0
        if selection:
            line["colm/time_features"] = 0.5
            line["colm/time_selection"] = 0.01
        lines.append(line)
        if step % 10 == 0:
            lines.append(
                {"step": step, "eval_loss": 1.5 - step / 100, "wall_time": line["wall_time"]}
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if eval_result is not None:
        (run / "eval.json").write_text(json.dumps(eval_result))
    if peak_mb is not None:
        (run / "memory.json").write_text(json.dumps({"peak_mb": peak_mb}))
    return run


@pytest.fixture
def runs(tmp_path):
    colm = make_run(
        tmp_path,
        "colm-run",
        name="colm",
        method="colm",
        eval_result=_eval_result(0.0, 0.6),
        peak_mb=4700.0,
    )
    random = make_run(
        tmp_path,
        "random-baseline",
        name=None,
        method="random",
        offset=0.2,
        seconds_per_step=1.5,
        selection=False,
        eval_result=_eval_result(0.1, 0.4),
    )
    return colm, random


def table_rows(markdown: str, first_header: str) -> dict[str, dict[str, str]]:
    """The Markdown table whose first column is `first_header`, as {first cell: {col: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is suspiciously small ({len(data)} bytes)"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 0.01  # not a blank canvas


# --------------------------------------------------------------------------- the report


def test_report_summary_numbers(runs, tmp_path):
    report = make_report(list(runs), tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text()
    rows = table_rows(text, "run")
    assert list(rows) == ["colm", "random-baseline"]  # folder name when config has no name
    colm, rand = rows["colm"], rows["random-baseline"]
    assert (colm["method"], rand["method"]) == ("colm", "random")
    assert colm["steps"] == rand["steps"] == "30"
    # final loss: mean of the last 10% of 30 logged losses = the last 3
    want = sum(_loss(s, 0.0) for s in (28, 29, 30)) / 3
    assert colm["final train loss"] == f"{want:.4f}"
    want = sum(_loss(s, 0.2) for s in (28, 29, 30)) / 3
    assert rand["final train loss"] == f"{want:.4f}"
    assert (colm["wall time"], colm["time/step"]) == ("60.0 s", "2.00 s")
    assert (rand["wall time"], rand["time/step"]) == ("45.0 s", "1.50 s")
    assert (colm["selection time/step"], rand["selection time/step"]) == ("0.51 s", "-")
    assert colm["held-out loss (in)"] == f"{1.0:.4f}"  # (1.0 + 1.5 + 0.5) / 3
    assert rand["held-out loss (in)"] == f"{(1.1 + 1.6 + 0.5) / 3:.4f}"
    assert colm["accuracy (in)"] == f"{100 * (0.6 + 0.3 + 1.0) / 3:.1f}%"
    assert colm["accuracy (out)"] == "15.0%"
    assert (colm["peak memory"], rand["peak memory"]) == ("4700 MB", "-")


def test_report_detail_tables(runs, tmp_path):
    text = make_report(list(runs), tmp_path / "out").read_text()
    acc = table_rows(text, "task")
    assert list(acc) == ["basic_arithmetic", "chain_sum", "gcd", "products"]
    assert acc["products"]["domain"] == "out"
    # with n and the 95% Wilson interval (6 of 20: [14.5, 51.9]; 8 of 20: [21.9, 61.3])
    assert acc["chain_sum"]["colm"] == "30.0% of 20 [15, 52]"
    assert acc["basic_arithmetic"]["random-baseline"] == "40.0% of 20 [22, 61]"
    loss = table_rows(text, "source")  # the first "source" table is the loss table
    assert loss["chain_sum"]["random-baseline"] == "1.6000"
    assert loss["products"]["colm"] == "2.0000"
    section = text[text.index("## Selected examples per source") :]
    share = table_rows(section, "source")
    # colm: selected 5 + 2 + 2 per step; random: falls back to in_batch 10 + 4 + 2
    assert share["basic_arithmetic"]["colm"] == f"{100 * 5 / 9:.1f}%"
    assert share["gcd"]["colm"] == f"{100 * 2 / 9:.1f}%"
    assert share["basic_arithmetic"]["random-baseline (in batch)"] == "62.5%"


def test_report_writes_valid_plots(runs, tmp_path):
    out = tmp_path / "out"
    text = make_report(list(runs), out).read_text()
    for name in ("loss_vs_step", "loss_vs_time", "accuracy_per_task", "selected_share"):
        assert_png(out / f"{name}.png")
        assert f"]({name}.png)" in text


# --------------------------------------------------------------------------- awkward inputs


def test_truncated_last_line_is_skipped_with_a_warning(runs, tmp_path):
    metrics = runs[1] / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 31, "loss": 0.1, "wall_ti')  # killed mid-write
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable line.*truncated"):
        text = make_report(list(runs), tmp_path / "out").read_text()
    assert table_rows(text, "run")["random-baseline"]["steps"] == "30"


def test_missing_eval_and_memory_show_dashes(tmp_path):
    bare = make_run(tmp_path, "bare", name="bare", method="colm")
    other = make_run(tmp_path, "other", name="other", method="random", selection=False)
    out = tmp_path / "out"
    text = make_report([bare, other], out).read_text()
    row = table_rows(text, "run")["bare"]
    assert row["steps"] == "30"
    for column in ("held-out loss (in)", "accuracy (in)", "accuracy (out)", "peak memory"):
        assert row[column] == "-"
    assert "No run measured held-out loss" in text
    assert not (out / "accuracy_per_task.png").exists()
    for name in ("loss_vs_step", "loss_vs_time", "selected_share"):
        assert_png(out / f"{name}.png")


def test_mixed_runs_with_and_without_eval(runs, tmp_path):
    bare = make_run(tmp_path, "bare", name="bare", method="colm")
    out = tmp_path / "out"
    text = make_report([*runs, bare], out).read_text()
    assert table_rows(text, "task")["gcd"]["bare"] == "-"
    assert_png(out / "accuracy_per_task.png")


def test_no_metrics_is_a_clear_error(runs, tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not-a-run has no metrics.jsonl"):
        make_report([runs[0], empty], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_report([tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(ValueError, match="no run directories"):
        make_report([], tmp_path / "out")


def test_read_run_details(tmp_path):
    run = make_run(tmp_path, "r", name=None, method="colm", steps=12)
    (run / "config.yaml").unlink()  # no config: folder name, unknown method
    with (run / "metrics.jsonl").open("a") as f:  # resumed from step 10: steps logged again
        for step in (11, 12):
            f.write(json.dumps({"step": step, "loss": 9.0, "wall_time": 30.0 + step}) + "\n")
    data = read_run(run)
    assert (data.name, data.method) == ("r", "-")
    assert [r["step"] for r in data.train] == list(range(1, 13))
    assert data.train[-1]["loss"] == 9.0  # the resumed run's value wins
    assert data.final_loss == 9.0  # ceil(10% of 12) = 2 last losses, both 9.0
    assert data.wall_time == 42.0
    assert [e["eval_loss"] for e in data.evals] == [1.4]
    assert data.selection["selected"] == {"basic_arithmetic": 60.0, "chain_sum": 24.0, "gcd": 24.0}


def test_final_loss_rule():
    assert final_loss([]) is None
    assert final_loss([5.0]) == 5.0
    assert final_loss(list(range(10))) == 9.0  # last 1
    assert final_loss(list(range(11))) == 9.5  # ceil(1.1) = last 2
    assert final_loss(list(range(100))) == sum(range(90, 100)) / 10


def test_wilson_interval_against_known_values():
    from colm.report import wilson

    assert wilson(6, 20) == pytest.approx((0.1455, 0.5190), abs=1e-4)
    assert wilson(0, 5) == pytest.approx((0.0, 0.4345), abs=1e-4)  # 0 of 5 is not "0 +- 0"
    assert wilson(5, 5)[1] == pytest.approx(1.0)


def test_heldout_curves_and_before_after_with_intervals(runs, tmp_path):
    """heldout.jsonl (step 0 = the untrained model, then points during training, with
    standard errors) gives the held-out curves, the before/after plot and the table's
    untrained column; intervals are 1.96 standard errors."""
    colm, random = runs
    for run, end in ((colm, 1.0), (random, 1.2)):
        points = [
            {
                "step": 0,
                "wall_time": 0.0,
                "loss": {"basic_arithmetic": 2.0, "chain_sum": 2.5, "gcd": 1.5, "products": 3.0},
                "sources_out": ["products"],
                "se": {"basic_arithmetic": 0.05, "chain_sum": 0.05, "gcd": 0.1, "products": 0.1},
            },
            {
                "step": 15,
                "wall_time": 15.0,
                "loss": {"basic_arithmetic": end, "chain_sum": 2.0, "gcd": 1.0, "products": 2.5},
                "sources_out": ["products"],
                "se": {"basic_arithmetic": 0.05, "chain_sum": 0.05, "gcd": 0.1, "products": 0.1},
            },
        ]
        (run / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    ev = json.loads((colm / "eval.json").read_text())
    ev["loss_se"] = {s: 0.01 for s in ev["loss"]}
    ev["loss_examples"] = {s: 50 for s in ev["loss"]}
    (colm / "eval.json").write_text(json.dumps(ev))
    out = tmp_path / "out"
    text = make_report(list(runs), out).read_text()
    for name in ("heldout_vs_step", "heldout_vs_time", "heldout_before_after"):
        assert_png(out / f"{name}.png")
        assert f"]({name}.png)" in text
    loss = table_rows(text, "source")
    assert loss["chain_sum"]["untrained"] == f"2.5000 ± {1.96 * 0.05:.4f}"
    assert loss["chain_sum"]["n"] == "50"
    assert loss["chain_sum"]["colm"] == f"{ev['loss']['chain_sum']:.4f} ± {1.96 * 0.01:.4f}"
    assert loss["chain_sum"]["random-baseline"] == "1.6000"  # its eval.json has no errors
    assert loss["products (out)"]["untrained"] == f"3.0000 ± {1.96 * 0.1:.4f}"


@pytest.mark.parametrize(
    "selector, label",
    [
        ({"method": "random_big"}, "colm (random_big)"),
        ({"preset": "paper", "ratio": 0.5}, "colm (paper)"),
        ({"preset": "paper", "method": "match"}, "colm (match)"),
        ({"ratio": 0.5}, "colm"),  # the selection is not named: the default of its time
    ],
)
def test_colm_runs_name_their_selection(tmp_path, selector, label):
    run = make_run(tmp_path, "r", name="r", method="colm", steps=4)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "selector": selector}))
    assert read_run(run).method == label
    other = make_run(tmp_path, "b", name="b", method="random", steps=4)
    config = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**config, "selector": selector}))
    assert read_run(other).method == "random"  # the selector plays no part in a baseline
