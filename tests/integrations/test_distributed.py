"""Data-parallel selection: 2 processes (gloo, CPU) behave exactly as 1 process on
the same global source batches, and no batch makes a rank hang.

Each run is a real ``torch.distributed.run`` launch of tests/integrations/ddp_worker.py
with a timeout, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from colm.features.locate import BlockNotFoundError, find_value_block
from colm.integrations.hf_trainer import _refuse_sharded_parameters
from tests.conftest import make_tiny

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integrations" / "ddp_worker.py"
TIMEOUT = 300

pytestmark = pytest.mark.distributed


def launch(out: Path, processes: int, *args: str, expect_ok: bool = True, worker: Path = WORKER):
    """``worker`` under torchrun with ``processes`` processes; each rank's JSON result."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", str(worker), "--out", str(out), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{processes}-process run hung (no exit within {TIMEOUT} s): {e}")
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    return proc


def assert_same_run(one: dict, many: list[dict]) -> None:
    for rank in many:
        assert len(rank["steps"]) == len(one["steps"])
        for step, (a, b) in enumerate(zip(one["steps"], rank["steps"])):
            assert a["picked"] == b["picked"], f"step {step}: different coreset"
            assert a["weights"] == pytest.approx(b["weights"])
    assert many[0]["losses"] == pytest.approx(one["losses"], abs=1e-5)
    lora = many[0]["lora"]
    assert sorted(lora) == sorted(one["lora"])
    for name, values in one["lora"].items():
        diff = (torch.tensor(values) - torch.tensor(lora[name])).abs().max()
        assert float(diff) < 1e-5, name


def expected_comm_bytes(stats: dict, rank: int, world: int, q: int) -> int:
    """What a rank receives: the other ranks' feature coefficients (padded shares),
    their batch fingerprints and, off rank 0, the broadcast coreset."""
    rows = sum(
        c["in_batch"] for c in stats["sources"].values() if 0 < c["selected"] < c["in_batch"]
    )
    rows -= sum(c["kept"] for c in stats["sources"].values() if 0 < c["kept"] < c["in_batch"])
    gathered = (world - 1) * max(1, math.ceil(rows / world)) * q * 4 if rows else 0
    fingerprint = (world - 1) * 4 * 8
    broadcast = 0 if rank == 0 else 2 * stats["coreset"] * 8
    return gathered + fingerprint + broadcast


def test_trainer_two_processes_select_train_and_resume_as_one(tmp_path):
    args = ["--mode", "trainer", "--steps", "4", "--micro", "8", "--save-steps", "2"]
    one = launch(tmp_path / "one", 1, *args)[0]
    two = launch(tmp_path / "two", 2, *args)
    assert two[0]["world"] == 2
    assert_same_run(one, two)
    assert [s["stats"]["processes"] for s in two[0]["steps"]] == [2, 2, 2, 2]
    # bytes moved for selection: 2 floats (zo, q=2) per example, not the inputs
    for rank, result in enumerate(two):
        for step in result["steps"]:
            stats = step["stats"]
            assert stats["comm_bytes"] == expected_comm_bytes(stats, rank, 2, q=2)
            inputs = stats["source_batch"] * 4 * 8  # at least 4 int64 token ids per example
            assert stats["comm_bytes"] < inputs
    assert all(s["stats"]["comm_bytes"] == 0 for s in one["steps"])

    # resume from the step-2 checkpoint under 2 processes: the same last 2 steps
    ckpt = tmp_path / "two" / "trainer" / "checkpoint-2"
    assert (ckpt / "colm_selector.pt").exists() and (ckpt / "colm_complete").exists()
    again = tmp_path / "resumed" / "trainer" / "checkpoint-2"
    shutil.copytree(ckpt, again)
    resumed = launch(tmp_path / "resumed", 2, *args, "--resume", str(again))
    assert [s["picked"] for s in resumed[0]["steps"]] == [s["picked"] for s in two[0]["steps"][2:]]
    # the log history comes back from the checkpoint; the new steps' losses are the same
    assert resumed[0]["losses"] == pytest.approx(two[0]["losses"], abs=1e-5)
    for name, values in two[0]["lora"].items():
        diff = (torch.tensor(values) - torch.tensor(resumed[0]["lora"][name])).abs().max()
        assert float(diff) < 1e-5, name


@pytest.mark.slow
def test_trainer_optimizer_moments_two_processes_and_resume_as_one(tmp_path):
    """moments='optimizer': the features are normalised with the Trainer's AdamW state of
    the value block, which every rank holds identically (and a checkpoint restores)."""
    args = ["--mode", "trainer", "--steps", "4", "--micro", "8", "--save-steps", "2"]
    args += ["--moments", "optimizer", "--feature", "exact"]
    one = launch(tmp_path / "one", 1, *args)[0]
    two = launch(tmp_path / "two", 2, *args)
    assert_same_run(one, two)
    fresh = launch(tmp_path / "fresh", 1, *args[:-4], "--feature", "exact")[0]
    # the optimizer's moments change what is picked after the first step
    assert [s["picked"] for s in fresh["steps"][1:]] != [s["picked"] for s in one["steps"][1:]]
    ckpt = tmp_path / "two" / "trainer" / "checkpoint-2"
    again = tmp_path / "resumed" / "trainer" / "checkpoint-2"
    shutil.copytree(ckpt, again)
    resumed = launch(tmp_path / "resumed", 2, *args, "--resume", str(again))
    assert [s["picked"] for s in resumed[0]["steps"]] == [s["picked"] for s in two[0]["steps"][2:]]


@pytest.mark.slow
def test_trainer_cluster_weights_two_processes_as_one(tmp_path):
    """Weighted loss under DDP: each rank's share is normalised by the whole coreset's
    weighted token count."""
    args = ["--mode", "trainer", "--steps", "3", "--micro", "8", "--weights", "cluster"]
    one = launch(tmp_path / "one", 1, *args)[0]
    two = launch(tmp_path / "two", 2, *args)
    assert any(w != 1.0 for s in one["steps"] for w in s["weights"])
    assert_same_run(one, two)


@pytest.mark.slow
def test_loop_two_processes_exact_cluster_weights_as_one(tmp_path):
    args = ["--mode", "loop", "--steps", "3", "--feature", "exact", "--weights", "cluster"]
    one = launch(tmp_path / "one", 1, *args)[0]
    two = launch(tmp_path / "two", 2, *args)
    assert_same_run(one, two)
    assert any(w != 1.0 for s in one["steps"] for w in s["weights"])


def test_loop_two_processes_streamed_exact_features_as_one(tmp_path):
    """Streamed features (max_feature_mb=0): each rank streams its share of the rows and
    the per-source sums, finite flags and kept values are summed over the ranks; the
    warm moments' batch statistics too."""
    args = ["--mode", "loop", "--steps", "3", "--feature", "exact", "--max-feature-mb", "0"]
    args += ["--moments", "warm"]
    one = launch(tmp_path / "one", 1, *args)[0]
    two = launch(tmp_path / "two", 2, *args)
    assert_same_run(one, two)
    held = launch(tmp_path / "held", 1, *args[:-4], "--moments", "warm")[0]
    assert_same_run(held, two)  # and as the features held whole


def test_edge_batches_do_not_hang(tmp_path):
    """3 processes; even steps: small sources alone exceed the coreset; odd steps: only
    2 examples need features, so the third rank computes none."""
    three = launch(tmp_path, 3, "--mode", "loop", "--steps", "2", "--case", "edge",
                   "--coreset", "6")  # fmt: skip
    for result in three:
        assert [s["picked"] for s in result["steps"]] == [s["picked"] for s in three[0]["steps"]]
        overflow, few = result["steps"]
        assert overflow["stats"]["small_overflow"] == 6  # 12 small-source examples
        assert overflow["stats"]["sources"]["big1"]["selected"] == 0
        assert few["stats"]["sources"]["big1"]["selected"] == 1
        assert few["stats"]["small_overflow"] == 0


def test_coreset_not_divisible_by_processes_is_a_clear_error(tmp_path):
    proc = launch(tmp_path, 2, "--mode", "loop", "--steps", "1", "--coreset", "7",
                  expect_ok=False)  # fmt: skip
    assert proc.returncode != 0
    assert "cannot be split equally over 2 processes" in proc.stderr
    assert "multiple of 2" in proc.stderr


def test_ranks_with_different_batches_are_a_clear_error(tmp_path):
    proc = launch(tmp_path, 2, "--mode", "loop", "--steps", "1", "--case", "mismatch",
                  expect_ok=False)  # fmt: skip
    assert proc.returncode != 0
    assert "ranks [1] were given a different source batch than rank 0" in proc.stderr


def test_fsdp_is_refused_deepspeed_is_not():
    fsdp = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False)
    with pytest.raises(ValueError, match="does not support FSDP"):
        _refuse_sharded_parameters(fsdp)

    def deepspeed(stage):
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))
        return SimpleNamespace(
            is_fsdp_enabled=False,
            is_deepspeed_enabled=True,
            accelerator=SimpleNamespace(state=state),
        )

    for stage in (1, 2, 3):  # ZeRO-3: the replay's modules are gathered (colm.sharding)
        _refuse_sharded_parameters(deepspeed(stage))


def test_an_fsdp1_value_block_is_refused_by_the_locator():
    model = make_tiny("llama", lora=True)
    block = find_value_block(model)
    block.parameter._is_flat_param = True  # what FSDP1 marks its flat parameters with
    with pytest.raises(BlockNotFoundError, match="sharded across processes by FSDP1"):
        find_value_block(model)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(
    tmp_path: Path,
    model_dir: Path,
    name: str,
    processes: int,
    launcher: str = "torchrun",
    deepspeed: Path | None = None,
    env_extra: dict | None = None,
    eval_cfg: dict | None = None,
    data_extra: dict | None = None,
) -> Path:
    import yaml

    run = tmp_path / name
    cfg = {
        "name": name,
        "output_dir": str(run),
        "model": {"name": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {
            "max_length": 96,
            "mixture": {
                "train": {"basic_arithmetic": 40, "chain_sum": 30, "gcd": 6, "lcm": 4},
                "test_per_source": 2,
                "ood": {"products": 2},
            },
            **(data_extra or {}),
        },
        "train": {
            "steps": 3,
            "source_batch": 8,
            "micro_batches": 2,
            "save_steps": 2,
            "deepspeed": str(deepspeed) if deepspeed else None,
        },  # fmt: skip
        "selector": {"method": "colm", "num_directions": 2},
        "eval": eval_cfg or {"enabled": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if launcher == "torchrun":
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "colm.cli", "train", str(path),
        ]  # fmt: skip
    else:  # the README's accelerate line; on a CPU the Trainer's use_cpu makes it gloo
        cmd = [
            sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
            "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "colm.cli", "train", str(path),
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.update(env_extra or {})
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"colm train on {processes} processes hung: {e}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.mark.parametrize(
    "launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)]
)
def test_colm_train_cli_under_torchrun_matches_one_process(tmp_path, tiny_model_dir, launcher):
    """`torchrun --nproc_per_node 2 -m colm.cli train CONFIG` (and the README's
    `accelerate launch --multi_gpu --num_processes 2 -m colm.cli train CONFIG`):
    train.source_batch is the global batch; rank 0 alone writes the run files; the result
    equals 1 process."""
    one = _cli(tmp_path, tiny_model_dir, "one", 1)
    two = _cli(tmp_path, tiny_model_dir, "two", 2, launcher)
    assert_same_cli_run(one, two)


def assert_same_cli_run(one: Path, two: Path) -> list[dict]:
    """A 2-process `colm train` run (``two``) against the 1-process one: one metrics line
    per step, the same losses and selections, the same (whole, non-empty) adapter, and
    the step-2 checkpoint complete. Returns the 2-process run's step lines."""
    from safetensors.torch import load_file

    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]  # one line per step
    assert [x["colm/processes"] for x in steps] == [2, 2, 2]
    for key in ("loss", "colm/basic_arithmetic/selected", "colm/gcd/kept"):
        assert [x.get(key, 0) for x in steps] == pytest.approx(
            [x.get(key, 0) for x in ref if "loss" in x], abs=1e-5
        )
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].numel() > 0, name
        assert float((a[name] - b[name]).abs().max()) < 1e-5, name
    assert (two / "checkpoints" / "checkpoint-2" / "colm_complete").exists()
    return steps
