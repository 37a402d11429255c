"""A non-finite training loss stops the run with a checkpoint of the last good state.

``COLM_FAULT_NAN_AT_STEP=k`` makes the training loss of step ``k`` NaN (train.py).
The run must stop at step ``k`` with a clear message and a non-zero exit, keep the
metrics of steps < k, and leave a checkpoint of the state after step ``k - 1`` that
equals the uninterrupted run's state there and that ``colm train --resume`` continues
from to the uninterrupted run's end.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from colm.cli import main

STEPS = 3


def _config(tmp_path, model_dir, out, save_steps):
    cfg = {
        "output_dir": str(out),
        "model": {"name": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "data": {
            "max_length": 96,
            "mixture": {
                "train": {"basic_arithmetic": 24, "chain_sum": 16, "gcd": 4, "lcm": 4},
                "test_per_source": 1,
                "ood": {"products": 1},
            },
        },
        "train": {"steps": STEPS, "source_batch": 8, "micro_batches": 2, "save_steps": save_steps},
        "eval": {"enabled": False},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """The run without faults, saving every step (the last two checkpoints are kept)."""
    tmp = tmp_path_factory.mktemp("clean")
    out = tmp / "clean"
    assert main(["train", str(_config(tmp, tiny_model_dir, out, save_steps=1))]) == 0
    return out


def test_nan_loss_stops_with_the_last_good_state(
    tmp_path, tiny_model_dir, uninterrupted, monkeypatch, capsys
):
    bad = 3  # no periodic checkpoint-2 (save_steps=3): the guard writes it
    out = tmp_path / "nan"
    cfg = _config(tmp_path, tiny_model_dir, out, save_steps=3)
    monkeypatch.setenv("COLM_FAULT_NAN_AT_STEP", str(bad))
    assert main(["train", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert "colm: error: training stopped at step 3" in err
    assert "non-finite" in err and "lower train.lr" in err
    assert "data of step 3" in err and "fp32" in err
    ckpt = out / "checkpoints" / f"checkpoint-{bad - 1}"
    assert str(ckpt) in err and f"colm train --resume {out}" in err
    assert (ckpt / "colm_complete").exists() and (ckpt / "colm_selector.pt").exists()
    assert not (out / "adapter").exists()

    # metrics of the steps before the bad one are kept, and equal the clean run's
    clean = _losses(uninterrupted)
    kept = _losses(out)
    assert sorted(kept) == list(range(1, bad))
    for step, loss in kept.items():
        assert loss == pytest.approx(clean[step], rel=1e-5)

    # the checkpoint is the state after step bad-1: parameters, optimizer, selector
    ref = uninterrupted / "checkpoints" / f"checkpoint-{bad - 1}"
    weights = _adapter(ckpt)
    assert all(torch.isfinite(w).all() for w in weights.values())
    _assert_same(weights, _adapter(ref))
    opt, opt_ref = (torch.load(p / "optimizer.pt", weights_only=False) for p in (ckpt, ref))
    for i, s in opt_ref["state"].items():
        torch.testing.assert_close(opt["state"][i]["exp_avg"], s["exp_avg"])
    sel, sel_ref = (torch.load(p / "colm_selector.pt", weights_only=False) for p in (ckpt, ref))
    assert sel["step"] == sel_ref["step"] == bad - 1
    assert torch.equal(sel["generator"], sel_ref["generator"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == bad - 1

    # resuming from it (fault gone) ends where the uninterrupted run ends
    monkeypatch.delenv("COLM_FAULT_NAN_AT_STEP")
    assert main(["train", "--resume", str(out)]) == 0
    assert f"resuming from {ckpt}" in capsys.readouterr().err
    _assert_same(_adapter(out / "adapter"), _adapter(uninterrupted / "adapter"))
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(clean[step], rel=1e-5)


def test_nan_right_after_a_periodic_checkpoint_reuses_it(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    out = tmp_path / "nan2"
    cfg = _config(tmp_path, tiny_model_dir, out, save_steps=1)
    monkeypatch.setenv("COLM_FAULT_NAN_AT_STEP", "2")
    assert main(["train", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert "training stopped at step 2" in err and "checkpoint-1" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert sorted(_losses(out)) == [1]
    weights = _adapter(out / "checkpoints" / "checkpoint-1")
    assert all(torch.isfinite(w).all() for w in weights.values())
