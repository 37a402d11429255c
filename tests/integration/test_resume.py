"""Kill-and-resume: a run killed with SIGKILL and resumed ends where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

STEPS = 6


def _config(tmp_path, model_dir, out):
    cfg = {
        "output_dir": str(out),
        "model": {"name": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "data": {
            "max_length": 96,
            "mixture": {
                "train": {"basic_arithmetic": 40, "chain_sum": 30, "gcd": 6, "lcm": 4},
                "test_per_source": 1,
                "ood": {"products": 1},
            },
        },
        "train": {"steps": STEPS, "source_batch": 8, "micro_batches": 2, "save_steps": 2},
        "selector": {"method": "colm", "num_directions": 2},
        "eval": {"enabled": False},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _colm(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "colm.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def _steps(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in lines if "loss" in x}


def _assert_same_adapter(run_a, run_b):
    wa = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run that the interrupted ones must reproduce."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "full"
    assert _colm("train", str(_config(tmp, tiny_model_dir, out))).returncode == 0
    return out


def test_sigkill_then_resume_continues_identically(tmp_path, tiny_model_dir, full):
    killed = tmp_path / "killed"
    r = _colm(
        "train",
        str(_config(tmp_path, tiny_model_dir, killed)),
        env={"COLM_FAULT_SIGKILL_AFTER_STEP": "4"},
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (killed / "adapter").exists()
    assert max(_steps(killed)) == 5  # step 5 ran and was logged, but not checkpointed
    r = _colm("train", "--resume", str(killed))
    assert r.returncode == 0, r.stderr[-2000:]

    a, b = _steps(full), _steps(killed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        sel_a = {k: v for k, v in a[step].items() if k.endswith("/selected")}
        sel_b = {k: v for k, v in b[step].items() if k.endswith("/selected")}
        assert sel_a == sel_b, step
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
    _assert_same_adapter(full, killed)
    sa, sb = torch.load(full / "selector.pt"), torch.load(killed / "selector.pt")
    assert sa["step"] == sb["step"] == STEPS
    assert torch.equal(sa["adam"]["m"], sb["adam"]["m"])


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, tiny_model_dir):
    out = tmp_path / "term"
    cfg = _config(tmp_path, tiny_model_dir, out)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "colm.cli",
            "train",
            str(cfg),
            "train.steps=400",
            "train.save_steps=1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    import time

    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    ckpts = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "colm_selector.pt").exists()
    step = int(ckpts[0].name.split("-")[1])
    assert 2 <= step < 400
    assert "colm train --resume" in err


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(
    tmp_path, tiny_model_dir, full
):
    crashed = tmp_path / "crashed"
    r = _colm(
        "train",
        str(_config(tmp_path, tiny_model_dir, crashed)),
        env={"COLM_FAULT_SIGKILL_IN_SAVE": "4"},
    )
    assert r.returncode == -signal.SIGKILL
    half = crashed / "checkpoints" / "checkpoint-4"
    assert half.exists() and not (half / "colm_complete").exists()  # the interrupted one
    r = _colm("train", "--resume", str(crashed))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint-2" in r.stderr  # resumed from the last complete checkpoint
    _assert_same_adapter(full, crashed)


class _Payload:
    """A pickle that runs code when loaded unsafely: it creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_resume_refuses_a_selector_state_that_would_run_code(tmp_path, tiny_model_dir):
    run = tmp_path / "planted"
    cfg = _config(tmp_path, tiny_model_dir, run)
    r = _colm("train", str(cfg), "train.steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    state = run / "checkpoints" / "checkpoint-2" / "colm_selector.pt"
    assert state.exists()
    # a genuine state is plain data: it loads with weights_only=True
    from colm.integrations.hf_trainer import load_selector_state

    assert load_selector_state(state)["step"] == 2
    marker = tmp_path / "code_ran"
    torch.save({"step": 2, "evil": _Payload(marker)}, state)
    r = _colm("train", "--resume", str(run), "train.steps=4")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not a selector state colm can read safely" in r.stderr
    assert not marker.exists()  # nothing ran
