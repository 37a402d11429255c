"""benchmarks/bench_step.py and bench_quality.py: helpers, and their --quick modes end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
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
    assert quality.parse_variants("default") == ["full", "random", "colm"]
    everything = quality.parse_variants("all")
    assert everything[:3] == ["full", "random", "colm"]
    assert set(quality.ABLATIONS) <= set(everything) and "accumulate" not in everything
    assert quality.parse_variants("colm,accumulate,colm") == ["colm", "accumulate"]
    with pytest.raises(SystemExit):
        quality.parse_variants("colm,bogus")
    # every runnable variant is a valid configuration of colm train
    for name in everything + ["accumulate"]:
        ok, why = quality.variant_available(name)
        if not ok:
            assert name == "small_random_big" and "random_big" in why
            continue
        cfg = quality.resolved_config(quality.DEFAULT_CONFIG, quality.VARIANTS[name][0])
        assert cfg["train"]["method"] in ("full", "random", "colm", "accumulate")
    cfg = quality.resolved_config(quality.DEFAULT_CONFIG, quality.VARIANTS["no_small"][0])
    assert cfg["selector"]["small_sources"] == []


def test_aggregate_and_bands(quality):
    runs = [
        {
            "loss_in": 1.0,
            "loss_out": 2.0,
            "heldout_loss": {"a": 1.0, "b": 3.0},
            "curve": [(1, 2.0, 1.0), (2, 1.0, 2.0)],
        },
        {
            "loss_in": 3.0,
            "loss_out": None,
            "heldout_loss": {"a": 2.0},
            "curve": [(1, 4.0, 3.0), (2, 3.0, 4.0), (3, 1.0, 5.0)],
        },
    ]
    agg = quality.aggregate(runs)
    assert agg["loss_in"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert agg["loss_out"] == {"mean": 2.0, "std": 0.0, "n": 1}
    assert agg["heldout_loss"]["b"]["n"] == 1
    assert agg["acc_in"]["mean"] is None
    steps, mean, std, wall = quality._band([r["curve"] for r in runs], window=1)
    assert steps == [1, 2]  # only steps every seed has
    assert mean == [3.0, 2.0] and wall == [2.0, 3.0]
    assert std[0] == pytest.approx(math.sqrt(2))


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
def test_bench_quality_quick(tmp_path, tiny_model_dir):
    cmd = [
        sys.executable,
        str(BENCH / "bench_quality.py"),
        "--quick",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "quality.json").read_text())
    assert data["seeds"] == [0] and data["settings"]["steps"] == 2
    assert set(data["variants"]) == {"full", "random", "colm"}
    for v in data["variants"].values():
        assert len(v["runs"]) == 1
        agg = v["aggregate"]
        assert _finite(agg["loss_in"]["mean"]) and _finite(agg["loss_out"]["mean"])
        assert _finite(agg["acc_in"]["mean"])
        assert all(_finite(s["mean"]) for s in agg["heldout_loss"].values())
        assert [s for s, _, _ in v["runs"][0]["curve"]] == [1, 2]
    for png in ("loss_vs_step.png", "loss_vs_time.png", "heldout_loss.png"):
        assert (tmp_path / png).stat().st_size > 0
    md = (tmp_path / "quality.md").read_text()
    assert md.startswith("## Quality at equal steps") and "| colm |" in md
    # a second invocation reuses the finished runs
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reused") == 3


def test_run_order_and_paired_differences(quality):
    order = quality.run_order([("colm", [0, 1]), ("no_adam", [0]), ("full", [0, 1, 1])])
    # full/random/colm first and seed-major, then the ablations; duplicates dropped
    assert order == [("colm", 0), ("full", 0), ("colm", 1), ("full", 1), ("no_adam", 0)]
    runs = [{"seed": 0, "loss_in": 1.0}, {"seed": 1, "loss_in": 2.5}, {"seed": 2, "loss_in": 9.0}]
    ref = [{"seed": 0, "loss_in": 2.0}, {"seed": 1, "loss_in": 2.0}, {"seed": 3, "loss_in": 0.0}]
    d = quality.paired(runs, ref, "loss_in")
    assert d["n"] == 2 and d["lower"] == 1  # seeds 2 and 3 have no pair
    assert d["mean"] == pytest.approx(-0.25)
    assert d["std"] == pytest.approx(statistics.stdev([-1.0, 0.5]))
