"""Early validation: every config value is checked before the model is loaded, and the
ConfigError names the key, the value and what would be valid. One test per rule."""

from __future__ import annotations

import json

import pytest
import yaml

import colm.models
import colm.train
from colm.config import ConfigError, load_config
from colm.train import run_training


@pytest.fixture
def data_file(tmp_path):
    rows = [
        {"source": s, "prompt": f"Say {i}.", "completion": f"{i}"}
        for i, s in enumerate(["web"] * 12 + ["code"] * 10 + ["math"] * 3)
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def model_loads(monkeypatch):
    """Records (and fails) every attempt to load the model."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the config error was raised")

    monkeypatch.setattr(colm.models, "load_model", fail)
    monkeypatch.setattr(colm.train, "build_model", fail)
    return calls


def _config(tmp_path, data_file, model="/nonexistent-model"):
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": str(model), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"path": str(data_file), "max_length": 96},
        "train": {"steps": 2, "source_batch": 8, "micro_batches": 2},
        "eval": {"enabled": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _error(tmp_path, data_file, model_loads, *overrides, model="/nonexistent-model") -> str:
    """The ConfigError message of a run with ``overrides``; the model must not be loaded."""
    with pytest.raises(ConfigError) as info:
        run_training(load_config(_config(tmp_path, data_file, model), list(overrides)))
    assert model_loads == []
    return str(info.value)


# -- the selector -------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, shown", [(0, "0"), (1.5, "1.5"), (-0.5, "-0.5"), ("half", "'half'")]
)
def test_selector_ratio_outside_0_1(tmp_path, data_file, model_loads, ratio, shown):
    msg = _error(tmp_path, data_file, model_loads, f"selector.ratio={ratio}")
    assert "selector.ratio" in msg and f"={shown} is invalid" in msg and "(0, 1]" in msg


def test_coreset_size_larger_than_source_batch(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "selector.size=9")
    assert "selector.size=9 is invalid" in msg and "<= train.source_batch (8)" in msg


def test_unknown_feature_kind(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "selector.feature=second")
    assert "selector.feature" in msg and "feature='second' is invalid" in msg
    assert "('zo', 'exact')" in msg


def test_unknown_metric(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "selector.metric=l3")
    assert "selector.metric" in msg and "metric='l3' is invalid" in msg
    assert "('l1', 'l2', 'cosine')" in msg


@pytest.mark.parametrize("h", [0, -4])
def test_topk_dims_not_positive(tmp_path, data_file, model_loads, h):
    msg = _error(tmp_path, data_file, model_loads, f"selector.topk_dims={h}")
    assert "selector.topk_dims" in msg and f"topk_dims={h} is invalid" in msg
    assert "an integer >= 1" in msg


def test_small_source_rule_number_not_positive(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "selector.small_sources=-2")
    assert "selector.small_sources=-2 is invalid" in msg and "a number c > 0" in msg


def test_small_source_not_in_the_data(tmp_path, data_file, model_loads):
    # needs the data: checked right after loading it, before the model
    msg = _error(tmp_path, data_file, model_loads, "selector.small_sources=[math, maths]")
    assert "selector.small_sources=['math', 'maths'] is invalid" in msg
    assert "['code', 'math', 'web']" in msg and "not in the data: ['maths']" in msg


# -- the model ----------------------------------------------------------------------


def test_lora_targets_without_the_value_projection(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "model.lora.targets=[q_proj, k_proj]")
    assert "model.lora.targets=['q_proj', 'k_proj'] is invalid" in msg
    for name in ("v_proj", "c_attn", "qkv_proj", "query_key_value", "Wqkv", "value"):
        assert repr(name) in msg


@pytest.mark.parametrize("method", ["colm", "match"])
def test_lora_not_on_the_last_blocks_value_projection(
    tmp_path, data_file, tiny_model_dir, monkeypatch, method
):
    # passes the config check (a v_proj target) but adapts layer 0 only: found once the
    # model is built, before anything is tokenized or trained
    targets = "model.layers.0.self_attn.v_proj"
    with pytest.raises(ConfigError) as info:
        run_training(
            load_config(
                _config(tmp_path, data_file, tiny_model_dir),
                [f"model.lora.targets=[{targets}]", f"selector.method={method}"],
            )
        )
    msg = str(info.value)
    assert f"model.lora.targets=['{targets}'] is invalid" in msg
    assert "value projection of the last transformer block" in msg
    assert "model.layers.1.self_attn.v_proj" in msg  # what the locator wanted
    run = tmp_path / "run"
    assert not (run / "data_report.json").exists() and not (run / "checkpoints").exists()


def test_random_big_needs_no_feature_block(tmp_path, data_file, tiny_model_dir):
    # the default selection (random_big) computes no gradient features, so LoRA anywhere
    # is fine: the block check that refuses the same model for colm/match lets it pass
    cfg = load_config(
        _config(tmp_path, data_file, tiny_model_dir),
        ["model.lora.targets=[model.layers.0.self_attn.v_proj]"],
    )
    assert cfg.selector_config().method == "random_big"
    model, _ = colm.train.build_model(cfg)
    colm.train.check_feature_block(cfg, model)  # no error
    cfg.selector["method"] = "colm"
    with pytest.raises(ConfigError, match="value projection of the last"):
        colm.train.check_feature_block(cfg, model)


# -- the data -----------------------------------------------------------------------


def test_source_column_absent_from_the_data(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "data.source_column=origin")
    assert "data.source_column='origin' is invalid" in msg
    assert "['completion', 'prompt', 'source']" in msg and str(data_file) in msg


def test_overflow_not_truncate_or_drop(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "data.overflow=wrap")
    assert "data.overflow='wrap' is invalid" in msg and "'truncate' or 'drop'" in msg


# -- training -----------------------------------------------------------------------


def test_unknown_train_method(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "train.method=fancy")
    assert "train.method='fancy' is invalid" in msg
    assert "('colm', 'random', 'full', 'accumulate')" in msg


@pytest.mark.parametrize("value", [0, -3])
def test_train_steps_not_positive(tmp_path, data_file, model_loads, value):
    msg = _error(tmp_path, data_file, model_loads, f"train.steps={value}")
    assert f"train.steps={value} is invalid" in msg and "an integer >= 1" in msg


@pytest.mark.parametrize("value", [0, -8])
def test_source_batch_not_positive(tmp_path, data_file, model_loads, value):
    msg = _error(tmp_path, data_file, model_loads, f"train.source_batch={value}")
    assert f"train.source_batch={value} is invalid" in msg and "an integer >= 1" in msg


@pytest.mark.parametrize("value", [0, -2])
def test_micro_batches_not_positive(tmp_path, data_file, model_loads, value):
    msg = _error(tmp_path, data_file, model_loads, f"train.micro_batches={value}")
    assert f"train.micro_batches={value} is invalid" in msg and "an integer >= 1" in msg


def test_micro_batches_more_than_source_batch(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "train.micro_batches=16")
    assert "train.micro_batches=16 is invalid" in msg
    assert "at most train.source_batch (8)" in msg


@pytest.mark.parametrize("value, shown", [(0, "0"), (-0.001, "-0.001"), (".nan", "nan")])
def test_lr_not_positive(tmp_path, data_file, model_loads, value, shown):
    msg = _error(tmp_path, data_file, model_loads, f"train.lr={value}")
    assert f"train.lr={shown} is invalid" in msg and "a number > 0" in msg


def test_deepspeed_config_missing_or_unreadable(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, f"train.deepspeed={tmp_path / 'nope.json'}")
    assert "train.deepspeed=" in msg and "the path of a DeepSpeed JSON config file" in msg
    broken = tmp_path / "ds.json"
    broken.write_text("{stage: 3")
    msg = _error(tmp_path, data_file, model_loads, f"train.deepspeed={broken}")
    assert "a readable JSON file" in msg
    broken.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    msg = _error(tmp_path, data_file, model_loads, f"train.deepspeed={broken}")
    assert "zero_optimization.stage is 0-3" in msg


def test_checks_also_run_for_a_config_built_in_code(tmp_path, data_file, model_loads):
    cfg = load_config(_config(tmp_path, data_file))
    cfg.train.lr = -1.0  # never went through load_config's validation
    with pytest.raises(ConfigError, match=r"train\.lr=-1\.0 is invalid"):
        run_training(cfg)
    assert model_loads == []


def test_paper_preset_is_one_switch_away():
    from pathlib import Path

    from colm import SelectorConfig
    from colm.config import load_config
    from colm.selector import PRESETS

    root = Path(__file__).resolve().parents[1]
    paper = load_config(root / "configs" / "paper.yaml").selector_config()
    assert paper == SelectorConfig.preset("paper", ratio=0.5, seed=0)
    for key, value in PRESETS["paper"].items():
        assert getattr(paper, key) == value
    # the paper's settings, spelled out (METHOD.md)
    assert (paper.method, paper.feature, paper.num_directions, paper.moments) == (
        "colm",
        "zo",
        1,
        "fresh",
    )
    assert (paper.topk_dims, paper.metric, paper.weights, paper.per_source) == (
        2560,
        "l1",
        "uniform",
        True,
    )
    # a preset takes overrides, and a bad name is a clear error
    assert SelectorConfig.preset("paper", feature="exact").feature == "exact"
    with pytest.raises(ValueError, match="preset='nope' is invalid"):
        SelectorConfig.preset("nope")
    with pytest.raises(ConfigError, match="selector.preset"):
        load_config(root / "configs" / "paper.yaml", ["selector.preset=nope"]).selector_config()


@pytest.mark.parametrize("value", ["fp64", "float16", 16])
def test_model_dtype_unknown(tmp_path, data_file, model_loads, value):
    msg = _error(tmp_path, data_file, model_loads, f"model.dtype={value}")
    assert f"model.dtype={value!r} is invalid" in msg and "['fp32', 'bf16', 'fp16']" in msg


def test_model_dtype_fp16_refused_for_full_fine_tuning(tmp_path, data_file, model_loads):
    msg = _error(tmp_path, data_file, model_loads, "model.dtype=fp16", "model.lora=null")
    assert "model.dtype='fp16' is invalid" in msg
    assert "'bf16' or 'fp32' for full fine-tuning" in msg and "with LoRA" in msg
