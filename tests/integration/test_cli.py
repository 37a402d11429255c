"""CLI end to end on a tiny model: train -> eval -> report, and config errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from colm.cli import main


def _config(tmp_path, model_dir, method="colm"):
    cfg = {
        "name": method,
        "output_dir": str(tmp_path / method),
        "model": {"name": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {
            "max_length": 96,
            "mixture": {
                "train": {"basic_arithmetic": 40, "chain_sum": 30, "gcd": 6, "lcm": 4},
                "test_per_source": 2,
                "ood": {"products": 2},
            },
        },
        "train": {
            "method": method,
            "steps": 3,
            "source_batch": 8,
            "micro_batches": 2,
            "save_steps": 2,
        },
        "eval": {"max_new_tokens": 4, "batch_size": 8},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_eval_report(tmp_path, tiny_model_dir, capsys):
    runs = []
    for method in ("colm", "random"):
        cfg = _config(tmp_path, tiny_model_dir, method)
        assert main(["train", str(cfg), "train.steps=2"]) == 0
        run = tmp_path / method
        runs.append(run)
        for name in (
            "config.yaml",
            "metrics.jsonl",
            "eval.json",
            "memory.json",
            "selector.pt",
            "adapter/adapter_config.json",
            "checkpoints/checkpoint-2/colm_selector.pt",
        ):
            assert (run / name).exists(), name
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [x["step"] for x in lines if "loss" in x]
        assert steps == [1, 2]  # the override took effect
        assert all(
            sum(v for k, v in x.items() if k.endswith("/selected")) == 4
            for x in lines
            if "loss" in x
        )
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 2
    ev = json.loads((runs[0] / "eval.json").read_text())
    assert set(ev["loss"]) == {"basic_arithmetic", "chain_sum", "gcd", "lcm", "products"}
    (runs[0] / "eval.json").unlink()
    assert main(["eval", str(runs[0])]) == 0  # re-evaluates from the saved adapter
    ev2 = json.loads((runs[0] / "eval.json").read_text())
    assert ev2["loss"] == pytest.approx(ev["loss"], rel=1e-4)
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "colm" in text and "random" in text
    for png in (
        "loss_vs_step.png",
        "loss_vs_time.png",
        "accuracy_per_task.png",
        "selected_share.png",
    ):
        assert (out / png).stat().st_size > 1000, png


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.method=fancy", "train.method='fancy' is invalid"),
        ("selector.ratio=0", "SelectorConfig.ratio=0"),
        ("selector.feature=second", "SelectorConfig.feature='second'"),
        ("train.source_batch=7", "train.source_batch=7 is invalid"),
        ("data.path=/no/such.jsonl", "data.path='/no/such.jsonl' is invalid"),
        ("train.bogus=1", "unknown key(s) ['bogus'] in train."),
        ("selector.nope=1", "valid keys"),
    ],
)
def test_config_errors_before_loading_anything(tmp_path, override, message, capsys):
    cfg = _config(tmp_path, "/nonexistent-model")
    assert main(["train", str(cfg), override]) == 2
    assert message in capsys.readouterr().err


def test_train_on_user_jsonl(tmp_path, tiny_model_dir):
    rows = [
        {"src": s, "prompt": f"Say {i}.", "completion": f"{i}"}
        for i, s in enumerate(["web"] * 12 + ["code"] * 10 + ["math"] * 3)
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _config(tmp_path, tiny_model_dir)
    out = tmp_path / "user"
    args = [
        "train",
        str(cfg),
        f"output_dir={out}",
        f"data.path={data}",
        f"data.test_path={data}",
        "data.source_column=src",
        "train.steps=2",
    ]
    assert main(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k.split("/")[1] for x in lines for k in x if k.endswith("/in_batch")}
    assert logged <= {"web", "code", "math"} and logged
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["loss"]) == {"web", "code", "math"}
    assert not ev["accuracy_in"]  # no answer checkers for user data


def test_missing_source_column_falls_back_to_pseudo_sources(tmp_path, tiny_model_dir, capsys):
    """Data without the default source column trains on pseudo-sources, with a notice
    (tests/data/test_pseudo_sources.py checks the clusters)."""
    data = tmp_path / "nosrc.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    cfg = _config(tmp_path, tiny_model_dir)
    args = ["train", str(cfg), f"data.path={data}", f"output_dir={tmp_path / 'x'}"]
    assert main([*args, "train.steps=1", "eval.enabled=false"]) == 0
    err = capsys.readouterr().err
    assert "has no 'source' column: using pseudo-sources" in err
    assert (tmp_path / "x" / "pseudo_sources.json").exists()


def test_heldout_curve_during_training(tmp_path, tiny_model_dir):
    """eval.every / eval.at_start: held-out loss per source at steps 0, 2, 4 in heldout.jsonl;
    the step-2 point is the loss of the step-2 checkpoint, the last one eval.json's; the
    constant schedule and adam_beta2 reach the Trainer."""
    from peft import PeftModel

    from colm.config import load_config
    from colm.evaluate import heldout_loss
    from colm.models import load_model
    from colm.train import _limited, load_data

    cfg = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "curve"
    overrides = [
        f"output_dir={run}",
        "train.steps=4",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0.25",
        "train.adam_beta2=0.99",
        "eval.every=2",
        "eval.at_start=true",
        "eval.generate=false",
    ]
    assert main(["train", str(cfg), *overrides]) == 0
    points = [json.loads(x) for x in (run / "heldout.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 2, 4]
    walls = [p["wall_time"] for p in points]
    assert walls == sorted(walls)
    ev = json.loads((run / "eval.json").read_text())
    assert points[-1]["loss"] == pytest.approx(ev["loss"])
    assert not ev["accuracy_in"]  # eval.generate=false
    assert points[0]["sources_out"] == ["products"]
    assert points[0]["loss_out"] == pytest.approx(points[0]["loss"]["products"])

    rc = load_config(run / "config.yaml")
    _, test_in, test_out = load_data(rc)
    test_in, test_out = _limited(rc, test_in, test_out)
    base, tok = load_model(str(tiny_model_dir))
    before = heldout_loss(base, tok, test_in, max_length=96)
    assert points[0]["loss"]["basic_arithmetic"] == pytest.approx(before["basic_arithmetic"])
    at2 = PeftModel.from_pretrained(base, str(run / "checkpoints" / "checkpoint-2"))
    mid = heldout_loss(at2, tok, test_in, max_length=96)
    assert points[1]["loss"]["chain_sum"] == pytest.approx(mid["chain_sum"], rel=1e-5)
    assert points[1]["loss"]["chain_sum"] != pytest.approx(points[0]["loss"]["chain_sum"])

    lrs = [
        x["learning_rate"]
        for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "learning_rate" in x
    ]
    assert lrs[1:] == pytest.approx([lrs[-1]] * 3)  # warm-up of 1 step, then constant
    optim = torch.load(run / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert optim["param_groups"][0]["betas"][1] == pytest.approx(0.99)


def test_select_shows_the_picks_per_source(tiny_model_dir, capsys):
    args = ["select", "--model", str(tiny_model_dir), "--batch", "16", "--steps", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "basic_arithmetic" in out and "source batch 16, coreset 8" in out
    assert "cluster_" not in out
    assert "selection: method=random_big (no features)" in out  # the default
    assert "features 0.00 s" in out
    # the paper's selection computes features; feature settings without it are refused
    assert main([*args, "--method", "colm", "--feature", "exact"]) == 0
    out = capsys.readouterr().out
    assert "selection: method=colm, feature=exact" in out
    assert main([*args, "--feature", "exact"]) == 2
    assert "feature='exact' is invalid with method='random_big'" in capsys.readouterr().err


def test_select_with_pseudo_sources_hides_the_labels_and_names_clusters(tiny_model_dir, capsys):
    """--pseudo-sources clusters a pool with its labels hidden: the clusters replace the
    sources in the budgets and the table, each shown with its typical example and the
    hidden source it holds most of."""
    args = ["select", "--model", str(tiny_model_dir), "--batch", "16", "--steps", "1"]
    assert main([*args, "--pseudo-sources", "--pool", "48", "--num-sources", "3"]) == 0
    out = capsys.readouterr().out
    assert "embedding 48 examples with their source labels hidden" in out
    assert "k = 3 (given); adjusted Rand index against the hidden labels:" in out
    table = out.split("step 0:")[1].split("picked in the last step")[0]
    names = {line.split()[0] for line in table.splitlines()[2:] if line.strip()}
    assert names and names <= {"cluster_0", "cluster_1", "cluster_2"}
    sizes = [
        int(line.split()[1]) for line in out.splitlines() if line.strip().startswith("cluster_")
    ][:3]
    assert sum(sizes) == 48
