"""The Trainer / SFTTrainer mixin trains exactly what it should."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from colm import SelectorConfig
from colm.integrations import batching
from colm.integrations.hf_trainer import CoLMTrainer
from tests.conftest import collate_rows, make_rows, make_tiny, tiny_lm_for

SOURCES = ["big1"] * 10 + ["big2"] * 8 + ["small"] * 2
COUNTS = {"big1": 10, "big2": 8, "small": 2}


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _dataset(n=16, seed=0):
    return make_rows(n=n, max_len=10, min_len=4, seed=seed, sources=SOURCES[:n])


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        dataloader_drop_last=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(tmp_path, method, weights="uniform", steps=1, spy_selection=None, **kw):
    model = _no_dropout(make_tiny("llama", lora=True, seed=1))
    start = copy.deepcopy(model)
    cfg = SelectorConfig(method="colm", ratio=0.5, weights=weights, check_replay=False)
    trainer = CoLMTrainer(
        model=model,
        args=_args(tmp_path, max_steps=steps, **kw),
        train_dataset=_dataset(),
        data_collator=collate_rows,
        colm_config=cfg,
        colm_method=method,
        source_counts=COUNTS,
    )
    seen = {"batches": [], "micro": 0, "selections": []}
    orig_get = trainer.get_batch_samples

    def get(it, n, device):
        raw = []

        def tap():
            for b in it:
                raw.append(b)
                yield b

        samples, items = orig_get(tap(), n, device)
        seen["batches"].append((raw, samples, items))
        return samples, items

    trainer.get_batch_samples = get
    if trainer.colm_selector is not None:
        real = trainer.colm_selector.select

        def sel(model, batch, **kw):
            s = real(model, batch, **kw)
            seen["selections"].append((batch, s))
            return s

        trainer.colm_selector.select = sel
    orig_step = trainer.training_step

    def step(*a, **k):
        seen["micro"] += 1
        return orig_step(*a, **k)

    trainer.training_step = step
    trainer.train()
    return start, model, trainer, seen


def _manual_update(start, batch, lr=0.5, weights=None):
    """One SGD step on ``batch`` with the loss Trainer uses: token sum / token count."""
    model = copy.deepcopy(start)
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    target = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none"
    ).sum(1)
    count = (target != -100).sum(1).float()
    w = torch.ones(len(ce)) if weights is None else weights
    loss = (ce * w).sum() / (count * w).sum()
    loss.backward()
    return {n: (p - lr * p.grad).detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("weights", ["uniform", "cluster"])
def test_step_trains_exactly_the_selected_examples(tmp_path, weights):
    start, model, trainer, seen = _train(tmp_path, "colm", weights=weights)
    assert seen["micro"] == 2  # micro-batches per optimizer step unchanged
    ((batch, sel),) = seen["selections"]
    assert len(sel.indices) == 4
    chosen = {k: (v[sel.indices] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    expected = _manual_update(start, chosen, weights=sel.weights if weights == "cluster" else None)
    got = _lora_params(model)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4)
    raw, samples, items = seen["batches"][0]
    assert len(samples) == 2 and all("source" not in s for s in samples)
    assert sum(len(s["input_ids"]) for s in samples) == 4
    if weights == "uniform":
        assert int(items) == int(batching.label_tokens(chosen).sum())
    assert any(k.startswith("colm/") for h in trainer.state.log_history for k in h)


def test_full_and_accumulate_equal_the_whole_source_batch(tmp_path):
    s1, full, _, seen_full = _train(tmp_path / "f", "full")
    s2, acc, tr, seen_acc = _train(tmp_path / "a", "accumulate")
    raw, _, _ = seen_full["batches"][0]
    whole = batching.merge(raw)
    expected = _manual_update(s1, whole)
    for n, p in _lora_params(full).items():
        torch.testing.assert_close(p, expected[n], atol=1e-5, rtol=1e-4)
    for n, p in _lora_params(acc).items():
        torch.testing.assert_close(p, expected[n], atol=1e-5, rtol=1e-4)
    assert tr._colm_sub_batch == 2  # coreset 4 over 2 micro-batches


def test_random_trains_a_random_subset_of_coreset_size(tmp_path):
    start, model, _, seen = _train(tmp_path, "random")
    ((batch, sel),) = seen["selections"]
    assert len(sel.indices) == 4
    chosen = {k: (v[sel.indices] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    expected = _manual_update(start, chosen)
    for n, p in _lora_params(model).items():
        torch.testing.assert_close(p, expected[n], atol=1e-5, rtol=1e-4)


def test_same_data_order_for_all_methods(tmp_path):
    orders = []
    for m in ("colm", "random", "full"):
        _, _, _, seen = _train(tmp_path / m, m, steps=2)
        orders.append([b["input_ids"].tolist() for raw, _, _ in seen["batches"] for b in raw])
    assert orders[0] == orders[1] == orders[2]


def test_packing_is_refused(tmp_path):
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), packing=True, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="packing=True merges several examples"):
        CoLMTrainer(
            model=make_tiny("llama", lora=True),
            args=args,
            train_dataset=_dataset(),
            data_collator=collate_rows,
            source_counts=COUNTS,
        )


def test_sft_trainer_selects_and_trains(tmp_path, chat_tokenizer):
    import datasets
    from trl import SFTConfig

    from colm.integrations.hf_trainer import CoLMSFTTrainer
    from colm.models import add_lora

    model = add_lora(tiny_lm_for(chat_tokenizer), r=4)
    rows = [
        {"prompt": f"What is {i} + {i}?", "completion": f"Answer: {2 * i}", "source": s}
        for i, s in enumerate(SOURCES[:16])
    ]
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        max_length=64,
        seed=0,
    )
    trainer = CoLMSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=chat_tokenizer,
        colm_config=SelectorConfig(method="colm", ratio=0.5, check_replay=False),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.colm_source_counts == {"big1": 10, "big2": 6}  # counted from the dataset
    assert trainer.colm_selector.step == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(
        h["colm/big1/selected"] + h["colm/big2/selected"] + h.get("colm/small/selected", 0) == 4
        for h in logged
    )
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
