"""benchmarks/bench_step.py and bench_quality.py: helpers, and their --quick modes end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # bench_quality imports bench_step
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step():
    return _load("bench_step")


@pytest.fixture(scope="module")
def quality():
    return _load("bench_quality")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------- helpers


def _result(method, batch, step_s, step_mb):
    return {
        "method": method,
        "source_batch": batch,
        "median": {"step_s": step_s},
        "memory": {"step_mb": step_mb},
    }


def test_ratios_against_targets(step):
    results = [
        _result("full", 32, 10.0, 1000.0),
        _result("accumulate", 32, 12.0, 600.0),
        _result("random", 32, 5.0, 500.0),
        _result("colm", 32, 8.0, 520.0),
    ]
    got = {r["ratio"]: r for r in step.ratios(results)}
    assert got["colm/full memory"]["value"] == pytest.approx(0.52)
    assert got["colm/full memory"]["met"]
    assert got["colm/random memory"]["value"] == pytest.approx(1.04)
    assert got["colm/full time"]["value"] == pytest.approx(0.8)
    assert got["colm/accumulate time"]["value"] == pytest.approx(8 / 12)
    assert all(r["met"] for r in got.values())
    missed = step.ratios([_result("full", 8, 1.0, 100.0), _result("colm", 8, 0.9, 90.0)])
    assert {r["ratio"]: r["met"] for r in missed} == {
        "colm/full memory": False,
        "colm/full time": False,
    }


def test_method_guard(step):
    for m in ("full", "accumulate", "random", "colm"):
        assert step.method_available(m) == (True, "")
    ok, why = step.method_available("match")
    assert ok or "match" in why
    assert step.method_available("nonsense")[0] is False


def test_peak_memory_grows_with_an_allocation(step):
    import torch

    mem = step.PeakMemory("cpu")
    mem.set_baseline()
    mem.reset()
    x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    assert mem.peak() > 40
    del x


def test_variants_parse_and_resolve(quality):
    assert quality.parse_variants("protocol") == quality.PROTOCOL
    everything = quality.parse_variants("all")
    assert everything[: len(quality.PROTOCOL)] == quality.PROTOCOL
    assert set(quality.ABLATIONS + quality.CANDIDATES) <= set(everything)
    assert quality.parse_variants("colm,accumulate,colm") == ["colm", "accumulate"]
    with pytest.raises(SystemExit):
        quality.parse_variants("colm,bogus")
    base = quality.resolved_config(quality.DEFAULT_CONFIG, [])
    # every variant is a valid configuration of colm train
    for name in everything:
        cfg = quality.resolved_config(quality.DEFAULT_CONFIG, quality.variant_overrides(name, base))
        assert cfg["train"]["method"] in ("full", "random", "colm", "accumulate")
    b2 = quality.resolved_config(
        quality.DEFAULT_CONFIG, quality.variant_overrides("random_b2", base)
    )
    assert b2["train"]["adam_beta2"] == pytest.approx(0.999 ** (8 / 16), abs=1e-6)
    paper = quality.resolved_config(quality.DEFAULT_CONFIG, quality.variant_overrides("colm", base))
    assert paper["selector"]["preset"] == "paper"


def test_interpolation_and_equal_time_analysis(quality, monkeypatch):
    assert quality.at([(0, 3.0), (10, 1.0)], 5) == pytest.approx(2.0)
    assert quality.at([(0, 3.0), (10, 1.0)], 11) is None
    base = {"point": {"loss_in": 3.0, "loss_out": 4.0}}

    def run(seed, losses, tps):
        heldout = [{"step": s, "loss_in": x, "loss_out": x + 1} for s, x in zip((2, 4), losses)]
        return {"seed": seed, "heldout": heldout, "steps": 4, "time_per_step_s": tps}

    variants = {
        # fast: 1 s per step; slow: 2 s per step, lower loss per step
        "fast": {"runs": [run(0, [2.0, 1.5], 1.0), run(1, [2.2, 1.7], 1.0)]},
        "slow": {"runs": [run(0, [1.8, 1.0], 2.0), run(1, [1.9, 1.1], 2.0)]},
    }
    monkeypatch.setattr(quality, "REFERENCES", ("fast",))
    an = quality.analyse(variants, base)
    assert an["time_budget_s"] == 4.0  # the fast variant's 4 steps
    # at 4 s the slow variant has made 2 steps
    assert variants["slow"]["runs"][0]["time_loss_in"] == pytest.approx(1.8)
    assert variants["fast"]["runs"][1]["time_loss_in"] == pytest.approx(1.7)
    eq_steps = an["comparisons"]["slow"]["fast"]["final_loss_in"]
    eq_time = an["comparisons"]["slow"]["fast"]["time_loss_in"]
    assert eq_steps["mean"] == pytest.approx(-0.55) and eq_steps["lower"] == 2
    # slow at 2 steps against fast at 4: 1.8 - 1.5 and 1.9 - 1.7
    assert eq_time["mean"] == pytest.approx(0.25) and eq_time["lower"] == 0
    assert eq_time["n"] == 2 and eq_time["lo"] < eq_time["mean"] < eq_time["hi"]
    # the side-by-side timing, where there is one, sets the time axis
    an2 = quality.analyse(variants, base, {"time_per_step_s": {"slow": 1.0}})
    assert an2["time_budget_s"] == 4.0 and variants["slow"]["time_source"] == "timing run"
    # ... and only it: a variant timed by its own runs alone (fast here) does not move the
    # equal-time point, however fast those runs were
    an3 = quality.analyse(variants, base, {"time_per_step_s": {"slow": 2.0}})
    assert an3["time_budget_s"] == 8.0 and variants["fast"]["time_source"] == "own runs"


# --------------------------------------------------------------------------- --quick runs


@pytest.mark.slow
def test_bench_step_quick(tmp_path, tiny_model_dir):
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_step.py"),
            "--quick",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("command", "date", "machine", "path", "tokens", "ratios"):
        assert key in data
    assert data["machine"]["torch_threads"] == 1
    methods = {r["method"]: r for r in data["methods"]}
    assert {"full", "accumulate", "random", "colm"} <= set(methods)
    for r in methods.values():
        assert all(_finite(v) for v in r["median"].values()), r["median"]
        assert _finite(r["memory"]["step_mb"]) and r["memory"]["step_mb"] > 0
        assert r["median"]["step_s"] > 0
    assert methods["colm"]["median"]["features_s"] > 0
    assert methods["colm"]["trained_examples"] == 4 and methods["full"]["trained_examples"] == 8
    assert methods["accumulate"]["micro_batch_rows"] == [2, 2, 2, 2]
    assert data["tokens"]["tokens_max"] == 64
    assert {r["ratio"] for r in data["ratios"] if not r["informational"]} == {
        "colm/full memory",
        "colm/random memory",
        "colm/full time",
        "colm/accumulate time",
    }
    assert {r["ratio"] for r in data["ratios"] if r["informational"]} == {
        "colm/full CPU time",
        "colm/accumulate CPU time",
    }
    assert all(_finite(r["value"]) for r in data["ratios"])
    assert "| colm/full memory | 8 |" in proc.stdout


@pytest.mark.slow
def test_bench_step_full_finetune_streamed_features(tmp_path, tiny_model_dir):
    """The --wide mode's path on the tiny model: full fine-tuning, exact features held
    whole and streamed, each run labelled, with its selection and training peaks."""
    out = tmp_path / "step.json"
    cmd = [
        sys.executable, str(BENCH / "bench_step.py"), "--quick", "--model", str(tiny_model_dir),
        "--full-finetune", "--feature", "exact", "--max-feature-mb", "none,0",
        "--methods", "random,colm", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["settings"]["lora"] is None and data["settings"]["feature"] == "exact"
    runs = {r["variant"]: r for r in data["methods"]}
    assert set(runs) == {
        "random",
        "colm (exact, features held)",
        "colm (exact, streamed past 0 MiB)",
    }
    assert runs["colm (exact, streamed past 0 MiB)"]["streamed"] is True
    assert runs["colm (exact, features held)"]["streamed"] is False
    for r in runs.values():
        assert r["memory"]["train_mb"] > 0 and _finite(r["memory"]["selection_mb"])
    assert "| colm (exact, streamed past 0 MiB) | 8 |" in proc.stdout


@pytest.mark.slow
def test_compare_script_runs_the_quality_protocol(tmp_path, tiny_model_dir):
    """scripts/compare.sh (the README's comparison command) on the tiny model."""
    env = {**_env(), "VARIANTS": "colm,random", "OUT": str(tmp_path)}
    cmd = ["bash", "scripts/compare.sh", "--quick", "--model", str(tiny_model_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "quality.json").read_text())
    assert set(data["variants"]) == {"colm", "random"}
    assert f"Open {tmp_path}/quality.md" in proc.stdout


@pytest.mark.slow
def test_bench_quality_quick(tmp_path, tiny_model_dir):
    cmd = [
        sys.executable,
        str(BENCH / "bench_quality.py"),
        "--quick",
        "--model",
        str(tiny_model_dir),
        "--variants",
        "full,random,random_big,colm,random_big_pseudo",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "quality.json").read_text())
    assert data["seeds"] == [0] and data["settings"]["steps"] == 4
    assert set(data["variants"]) == {"full", "random", "random_big", "colm", "random_big_pseudo"}
    for v in data["variants"].values():
        (run,) = v["runs"]
        assert [p["step"] for p in run["heldout"]] == [2, 4]  # eval.every=2 in --quick
        assert _finite(run["final_loss_in"]) and _finite(run["time_loss_in"])
        assert v["time_per_step_s"] > 0
    assert data["analysis"]["time_budget_s"] > 0
    assert set(data["analysis"]["comparisons"]["colm"]) == {"random_big", "random", "full"}
    assert {"random_big", "random"} <= set(data["analysis"]["comparisons"]["random_big_pseudo"])
    # the pseudo-source run clustered the mixture with its labels hidden, and says how well
    (pseudo,) = data["variants"]["random_big_pseudo"]["runs"]
    clusters = json.loads((tmp_path / "finished" / "random_big_pseudo-seed0.json").read_text())
    assert (
        clusters["pseudo_sources"]["k"] >= 2
        and -1 <= clusters["pseudo_sources"]["ari_vs_labels"] <= 1
    )
    assert clusters["pseudo_sources"]["embedding_s"] > 0
    assert "pseudo_sources" not in json.loads(
        (tmp_path / "finished" / "colm-seed0.json").read_text()
    )
    for png in ("heldout_vs_step.png", "heldout_vs_time.png", "heldout_per_source.png"):
        assert (tmp_path / png).stat().st_size > 0
    md = (tmp_path / "quality.md").read_text()
    assert md.startswith("## Held-out loss at equal steps and at equal wall time")
    assert "| colm |" in md
    records = sorted(p.name for p in (tmp_path / "finished").iterdir())
    assert records == sorted(["base.json"] + [f"{n}-seed0.json" for n in data["variants"]])
    # a second invocation reuses the finished runs, from the records alone
    import shutil

    shutil.rmtree(tmp_path / "runs")
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reused") == 5


def test_run_order(quality):
    order = quality.run_order([("colm", [0, 1]), ("no_adam", [0]), ("full", [0, 1, 1])])
    # seed-major in the order given, duplicates dropped: an interrupted run leaves whole seeds
    assert order == [("colm", 0), ("no_adam", 0), ("full", 0), ("colm", 1), ("full", 1)]


def test_finished_records_survive_new_settings_at_their_defaults(quality):
    """A record made before a setting existed is reused while that setting is at its
    default (what the record's run used), and not once it is changed."""
    stored = {"model": {"name": "m"}, "data": {"max_length": 128}}
    defaults = {
        "model": {"name": "x", "dtype": "fp32"},
        "data": {"max_length": 256, "sources": "column"},
    }
    same = {
        "model": {"name": "m", "dtype": "fp32"},
        "data": {"max_length": 128, "sources": "column"},
    }
    assert quality.same_config(stored, same, defaults)
    assert not quality.same_config(
        stored, {**same, "data": {"max_length": 128, "sources": "auto"}}, defaults
    )
    assert not quality.same_config(
        stored, {**same, "data": {"max_length": 64, "sources": "column"}}, defaults
    )
    assert not quality.same_config({**stored, "gone": 1}, same, defaults)  # a removed setting
    # the committed records match today's configuration of their variant
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rec = json.loads((root / "benchmarks/results/quality/finished/full-seed0.json").read_text())
    cfg = root / "configs" / "bench_quality.yaml"
    ov = ["train.method=full", "name=full", "output_dir=x", "train.seed=0"]
    want = quality._key(quality.resolved_config(cfg, ov))
    assert quality.same_config(rec["config"], want, quality._key(quality._defaults()))
