"""Clustering the training set again after a warm-up (colm_cluster_after, data.cluster_after)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from colm import SelectorConfig
from colm.cli import main
from colm.data.pseudo_sources import PseudoSources
from colm.integrations import recluster
from tests.conftest import collate_rows, make_rows, make_tiny
from tests.data.test_pseudo_sources import SOURCES, unlabelled_file


def _trainer(tmp_path, data, steps=4, **kw):
    from transformers import TrainingArguments

    from colm.integrations.hf_trainer import CoLMTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=steps,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        logging_steps=1,
        **kw.pop("args", {}),
    )
    return CoLMTrainer(
        model=make_tiny("llama", lora=True),
        args=args,
        train_dataset=data,
        data_collator=collate_rows,
        colm_config=SelectorConfig(method="random_big", ratio=0.5),
        **kw,
    )


def _rows(n=24):
    rows = make_rows(n=n, max_len=10, seed=3)
    for i, r in enumerate(rows):
        r["source"] = ["a", "b", "c"][i % 3]
    return rows


def test_sources_switch_after_the_warm_up(tmp_path, monkeypatch):
    """At the end of step 2 the rows are relabelled with the new clustering and the
    selector starts afresh on the new sources: steps 1-2 select among the named sources,
    steps 3-4 among the new clusters only (a micro-batch the loader fetched ahead of the
    switch included)."""
    rows = _rows()
    new = [f"cluster_{i % 2}" for i in range(len(rows))]
    calls = []

    def fake(trainer):
        calls.append(trainer.state.global_step)
        return PseudoSources(labels=list(new), k=2, sizes={"cluster_0": 12, "cluster_1": 12})

    monkeypatch.setattr(recluster, "cluster_now", fake)
    trainer = _trainer(tmp_path, rows, colm_cluster_after=2)
    first = trainer.colm_selector
    logs = []
    trainer.add_callback(_Capture(logs))
    trainer.train()
    assert calls == [2]
    assert [r["source"] for r in trainer.train_dataset] == new
    assert trainer.colm_source_counts == {"cluster_0": 12, "cluster_1": 12}
    assert trainer.colm_selector is not first
    assert trainer.colm_selector.state_dict()["step"] == 2  # steps 3 and 4 only
    step, result = trainer.colm_warm_sources
    assert step == 2 and result.labels == new

    def sources(entry):
        return {k.split("/")[1] for k in entry if k.endswith("/in_batch")}

    by_step = {e["step"]: e["logs"] for e in logs if "loss" in e["logs"]}
    assert sources(by_step[1]) and sources(by_step[2])
    assert sources(by_step[1]) | sources(by_step[2]) <= {"a", "b", "c"}
    assert sources(by_step[3]) | sources(by_step[4]) == {"cluster_0", "cluster_1"}


class _Capture(TrainerCallback):
    def __init__(self, out):
        self.out = out

    def on_log(self, args, state, control, logs=None, **kw):
        self.out.append({"step": state.global_step, "logs": dict(logs or {})})


def test_bad_settings_are_refused(tmp_path):
    from datasets import Dataset

    rows = _rows(16)
    with pytest.raises(ValueError, match="train_dataset must be a list of dicts"):
        _trainer(tmp_path, Dataset.from_list(rows), colm_cluster_after=1)
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        _trainer(tmp_path, rows, colm_cluster_after=1, args={"dataloader_num_workers": 2})
    with pytest.raises(ValueError, match="not before the last step"):
        _trainer(tmp_path, rows, colm_cluster_after=4)
    with pytest.raises(ValueError, match="integer >= 1"):
        _trainer(tmp_path, rows, colm_cluster_after=0)
    with pytest.raises(ValueError, match="selects nothing"):
        _trainer(tmp_path, rows, colm_cluster_after=1, colm_method="full")


# -- colm train ------------------------------------------------------------------------


def _config(tmp_path, model_dir, steps=4):
    data, _ = unlabelled_file(tmp_path)
    cfg = {
        "model": {"name": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"path": str(data), "max_length": 96, "num_sources": 3, "cluster_after": 2},
        "train": {
            "steps": steps,
            "source_batch": 8,
            "micro_batches": 2,
            "save_steps": 1,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
        },
        "selector": {"method": "colm", "num_directions": 2},  # gradient features
        "eval": {"enabled": False},
    }
    path = tmp_path / "warm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _steps(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in lines if "loss" in x}


def test_colm_train_clusters_again_and_resumes_identically(
    tmp_path, tiny_model_dir, embed_counts, capsys
):
    """data.cluster_after=2: the data is embedded again with the model after step 2, the
    new clustering is written to pseudo_sources_warm.json and to every later checkpoint;
    a run stopped after step 3 and resumed restores it from the checkpoint (no model
    pass) and ends like the uninterrupted run: same selections, losses and adapter."""
    embedded = embed_counts
    cfg = _config(tmp_path, tiny_model_dir)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", str(cfg), f"output_dir={full}"]) == 0
    n = sum(SOURCES.values())
    assert embedded == [n, n]  # as loaded, then after the warm-up
    err = capsys.readouterr().err
    assert "clustered again after step 2" in err
    warm = json.loads((full / "pseudo_sources_warm.json").read_text())
    assert warm["step"] == 2 and warm["k"] == 3 and len(warm["labels"]) == n
    assert set(warm["first_words"]) == set(warm["sizes"])
    saved = json.loads((full / "checkpoints/checkpoint-4/colm_pseudo_sources.json").read_text())
    assert saved["labels"] == warm["labels"] and saved["step"] == 2
    assert torch.load(full / "selector.pt")["step"] == 2  # afresh after step 2
    from colm.report import make_report

    text = make_report([full], tmp_path / "report").read_text()
    assert "clustered again after step 2: k=3" in text

    embedded.clear()
    assert main(["train", str(cfg), f"output_dir={part}", "train.steps=3"]) == 0
    assert embedded == [n, n]
    embedded.clear()
    assert main(["train", "--resume", str(part), "train.steps=4"]) == 0
    assert embedded == []  # the assignments come from pseudo_sources.json and checkpoint-3
    a, b = _steps(full), _steps(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        sel_a = {k: v for k, v in a[step].items() if k.endswith(("/selected", "/in_batch"))}
        sel_b = {k: v for k, v in b[step].items() if k.endswith(("/selected", "/in_batch"))}
        assert sel_a == sel_b, step
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
    wa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.cluster_after=4", "data.cluster_after=4 is invalid"),
        ("train.method=full", "selects nothing"),
        ("data.path=null", "data.sources: auto"),  # the labelled built-in mixture
    ],
)
def test_colm_train_refuses_bad_cluster_after(tmp_path, tiny_model_dir, capsys, override, message):
    cfg = _config(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), f"output_dir={tmp_path / 'x'}", override]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cluster_after_under_torchrun_matches_one_process(tmp_path, tiny_model_dir):
    """2 processes cluster again after step 1 and agree (rank 0's labels are broadcast):
    the same clusterings, selections per cluster, losses and adapter as 1 process."""
    from tests.integrations.test_distributed import _cli, assert_same_cli_run

    extra = {"sources": "auto", "num_sources": 3, "cluster_after": 1}
    one = _cli(tmp_path, tiny_model_dir, "one", 1, data_extra=extra)
    two = _cli(tmp_path, tiny_model_dir, "two", 2, data_extra=extra)
    steps = assert_same_cli_run(one, two)
    ref = [
        x for x in map(json.loads, (one / "metrics.jsonl").read_text().splitlines()) if "loss" in x
    ]
    keys = {k for x in ref for k in x if k.startswith("colm/cluster_")}
    assert keys and all(x.get(k, 0) == y.get(k, 0) for x, y in zip(ref, steps) for k in keys)
    warm = [json.loads((run / "pseudo_sources_warm.json").read_text()) for run in (one, two)]
    assert warm[0]["step"] == warm[1]["step"] == 1
    assert warm[0]["labels"] == warm[1]["labels"]
