"""Training set-ups users run (issue 12): mixed precision and half-precision
models under the Trainer, and gradient checkpointing, reentrant or not."""

from __future__ import annotations

import json
import math

import pytest
import torch

from colm import CoresetSelector, SelectorConfig
from colm.features import GradientFeatures
from colm.features.replay import LastBlockReplay
from colm.integrations.hf_trainer import CoLMTrainer
from colm.integrations.loop import coreset_step
from tests.conftest import collate_rows, make_batch, make_tiny
from tests.integrations.test_hf_trainer import (
    COUNTS,
    _args,
    _dataset,
    _lora_params,
    _no_dropout,
    _train,
)

# -- mixed precision -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "flag"),
    [
        (torch.float32, "bf16"),  # AMP: fp32 weights, bf16 autocast
        (torch.bfloat16, "bf16"),  # a model loaded in bf16
        (torch.float16, "fp16"),  # fp16 model, fp32 LoRA, fp16 loss scaling
    ],
    ids=["fp32-model-bf16-amp", "bf16-model", "fp16-model-fp16-amp"],
)
def test_trainer_trains_in_mixed_precision(tmp_path, monkeypatch, dtype, flag):
    """Two steps with selection (and the replay check, run in the trunk's own
    precision) on each set-up; losses finite, LoRA weights moved."""
    autocast_seen = []
    capture = LastBlockReplay.capture

    def spy(self, *a, **kw):
        cap = capture(self, *a, **kw)
        autocast_seen.append(cap.autocast)
        return cap

    monkeypatch.setattr(LastBlockReplay, "capture", spy)
    model = _no_dropout(make_tiny("llama", lora=True, seed=1, dtype=dtype))
    before = _lora_params(model)
    trainer = CoLMTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, learning_rate=1e-2, **{flag: True}),
        train_dataset=_dataset(),
        data_collator=collate_rows,
        colm_config=SelectorConfig(method="colm", ratio=0.5, check_replay=True),
        source_counts=COUNTS,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert trainer.colm_selector.step == 2
    selected = [h for h in trainer.state.log_history if "colm/coreset" in h]
    assert [h["colm/coreset"] for h in selected] == [4, 4]
    after = _lora_params(model)
    assert all(p.dtype == torch.float32 for p in after.values())  # PEFT's fp32 adapters
    assert max((after[k] - before[k]).abs().max() for k in after) > 0
    if dtype == torch.float32:  # the Trainer's AMP wraps the forward in autocast
        assert autocast_seen[0] == ("cpu", torch.bfloat16)


# -- gradient checkpointing -----------------------------------------------------------


def _checkpointed(reentrant: bool | None):
    model = _no_dropout(make_tiny("llama", lora=True, seed=1))
    if reentrant is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
        if reentrant:  # reentrant checkpoints need an input that requires grad (PEFT docs)
            model.enable_input_require_grads()
    return model.train()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_coreset_step_equals_plain_step(reentrant):
    batch = make_batch(n=8, max_len=12, seed=2, sources=["a"] * 4 + ["b"] * 4)
    results = []
    for setting in (None, reentrant):
        model = _checkpointed(setting)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == (
            setting is not None
        )
        before = _lora_params(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        sel = CoresetSelector(
            SelectorConfig(method="colm", ratio=0.5, small_sources=[]), {"a": 100, "b": 100}
        )
        out = coreset_step(model, opt, sel, batch, micro_batches=2)
        results.append((out, _lora_params(model), before))
    (plain, w_plain, w0), (ckpt, w_ckpt, _) = results
    assert ckpt.selection.indices.tolist() == plain.selection.indices.tolist()
    assert ckpt.loss == pytest.approx(plain.loss, abs=1e-5)
    assert max((w_plain[k] - w0[k]).abs().max() for k in w0) > 1e-3  # the step moved them
    for k in w_plain:
        torch.testing.assert_close(w_ckpt[k], w_plain[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("kind", ["exact", "zo"])
def test_features_of_a_checkpointed_model_in_training_mode(reentrant, kind):
    """Called directly, outside the selector (which switches to eval mode), on a
    model training with checkpointing: the capture still stops at the last block
    and the replay runs it unchecked (a reentrant checkpoint would cut the exact
    features' graph)."""
    b = make_batch(n=6, seed=4)
    args = (b["input_ids"], b["attention_mask"], b["labels"])
    reference = GradientFeatures(_checkpointed(None))
    z = torch.randn(2, reference.numel, generator=torch.Generator().manual_seed(0))
    plain = reference.compute(*args, kind=kind, directions=z)
    model = _checkpointed(reentrant)
    got = GradientFeatures(model).compute(*args, kind=kind, directions=z)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    assert model.training


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_trainer_with_gradient_checkpointing_equals_without(tmp_path, reentrant):
    start, plain, _, seen_plain = _train(tmp_path / "plain", "colm")
    _, ckpt, _, seen = _train(
        tmp_path / "ckpt",
        "colm",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    picked = [s.indices.tolist() for _, s in seen["selections"]]
    assert picked == [s.indices.tolist() for _, s in seen_plain["selections"]]
    w0, w_plain, w_ckpt = _lora_params(start), _lora_params(plain), _lora_params(ckpt)
    assert max((w_plain[k] - w0[k]).abs().max() for k in w0) > 1e-3
    for k in w_plain:
        torch.testing.assert_close(w_ckpt[k], w_plain[k], rtol=0, atol=1e-5)


# -- colm train: model.dtype ------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_colm_train_loads_and_trains_in_model_dtype(tmp_path, monkeypatch, tiny_model_dir, dtype):
    """model.dtype loads the weights in that dtype and turns on the Trainer's mixed
    precision of the same kind (fp16: with loss scaling); LoRA trains in fp32."""
    import colm.train
    from colm.config import load_config

    seen = {}
    build, install = colm.train.build_model, colm.train.install_console

    def spy_build(cfg):
        model, tokenizer = build(cfg)
        seen["dtypes"] = {p.dtype for p in model.parameters()}
        seen["trained"] = {p.dtype for p in model.parameters() if p.requires_grad}
        return model, tokenizer

    def spy_install(trainer):
        seen["args"] = (trainer.args.bf16, trainer.args.fp16)
        return install(trainer)

    monkeypatch.setattr(colm.train, "build_model", spy_build)
    monkeypatch.setattr(colm.train, "install_console", spy_install)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            f"model.name={tiny_model_dir}",
            f"model.dtype={dtype}",
            "model.lora={r: 4, alpha: 8, dropout: 0.0}",
            "data.max_length=96",
            "data.mixture={train: {basic_arithmetic: 20, chain_sum: 16, lcm: 4}, "
            "test_per_source: 1, ood: {}}",
            "train.steps=2",
            "train.source_batch=8",
            "eval.enabled=false",
        ],
    )
    colm.train.run_training(cfg)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert seen["dtypes"] == {half, torch.float32} and seen["trained"] == {torch.float32}
    assert seen["args"] == (dtype == "bf16", dtype == "fp16")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(x["colm/coreset"] == 4 for x in lines if "loss" in x)


# -- the real model (slow twins) ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_smollm2_checkpointed_coreset_step_equals_plain_step(reentrant):
    """SmolLM2-135M + LoRA (fp32): one coreset step with gradient checkpointing
    equals the step without, to 1e-5."""
    from colm.models import add_lora, load_model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (8, 24), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "source": ["a"] * 4 + ["b"] * 4,
    }
    results = []
    for setting in (None, reentrant):
        model, _ = load_model()
        torch.manual_seed(0)
        model = _no_dropout(add_lora(model))
        if setting is not None:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": setting}
            )
            if setting:
                model.enable_input_require_grads()
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        sel = CoresetSelector(
            SelectorConfig(method="colm", ratio=0.5, small_sources=[]), {"a": 100, "b": 100}
        )
        out = coreset_step(model, opt, sel, batch, micro_batches=2)
        results.append((out.selection.indices.tolist(), out.loss, _lora_params(model)))
    (idx_plain, loss_plain, w_plain), (idx, loss, w) = results
    assert idx == idx_plain and loss == pytest.approx(loss_plain, abs=1e-5)
    for k in w_plain:
        torch.testing.assert_close(w[k], w_plain[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_colm_train_in_bf16(tmp_path):
    """``colm train model.dtype=bf16`` on the packaged SmolLM2: two steps, finite losses."""
    from colm.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "configs/default.yaml",
            f"output_dir={out}",
            "model.dtype=bf16",
            "train.steps=2",
            "train.source_batch=8",
            "data.max_length=128",
            "eval.enabled=false",
            "eval.every=0",
            "eval.at_start=false",
            "data.mixture={train: {basic_arithmetic: 60, chain_sum: 40, gcd: 8, lcm: 6}, "
            "test_per_source: 2, ood: {products: 2}}",
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
