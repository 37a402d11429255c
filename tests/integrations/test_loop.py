"""The plain-loop helper takes one optimizer step on exactly the coreset."""

import copy

import pytest
import torch
from torch import nn

from colm import CoresetSelector, SelectorConfig
from colm.integrations.loop import coreset_step
from tests.conftest import make_batch, make_tiny

COUNTS = {"a": 100, "b": 80, "s": 5}


@pytest.mark.parametrize("weights", ["uniform", "cluster"])
@pytest.mark.parametrize("micro", [1, 3])
def test_coreset_step_equals_manual_step_on_selection(weights, micro):
    model = make_tiny("llama", lora=True)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    start = copy.deepcopy(model)
    batch = make_batch(n=12, sources=["a"] * 6 + ["b"] * 5 + ["s"], seed=9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    selector = CoresetSelector(
        SelectorConfig(method="colm", weights=weights, check_replay=False), COUNTS
    )
    out = coreset_step(model, opt, selector, batch, micro_batches=micro)
    idx, w = out.selection.indices, out.selection.weights
    assert len(idx) == 6 and 11 in idx.tolist()  # the small source's example is kept

    ref = copy.deepcopy(start)
    ref.train()
    logits = ref(
        input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx]
    ).logits
    target = batch["labels"][idx][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none"
    ).sum(1)
    loss = (ce * w).sum() / ((target != -100).sum(1) * w).sum()
    loss.backward()
    torch.testing.assert_close(torch.tensor(out.loss), loss.detach(), atol=1e-5, rtol=1e-5)
    got = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(
                got[n].detach(), (p - 0.5 * p.grad).detach(), atol=1e-5, rtol=1e-4
            )


@pytest.mark.parametrize("feature", ["zo", "exact"])
def test_optimizer_moments_come_from_the_optimizer_that_trains(feature, monkeypatch):
    """moments='optimizer': before the first step the batch's statistics stand in (the
    same coreset as a warm-started selector); afterwards the features are normalised
    with the optimizer's own Adam state of the value block."""
    import colm.features.table as table_module  # where selection normalises its features
    from colm.features import adam_features, find_value_block, optimizer_moments

    model = make_tiny("llama", lora=True)
    batch = make_batch(n=12, sources=["a"] * 6 + ["b"] * 5 + ["s"], seed=9)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kw = dict(feature=feature, num_directions=3, check_replay=False, seed=4)
    selector = CoresetSelector(SelectorConfig(method="colm", moments="optimizer", **kw), COUNTS)
    warm = CoresetSelector(SelectorConfig(method="colm", moments="warm", **kw), COUNTS)
    with pytest.raises(ValueError, match="optimizer=optimizer"):
        selector.select(model, batch)
    selector = CoresetSelector(SelectorConfig(method="colm", moments="optimizer", **kw), COUNTS)
    first = selector.select(model, batch, optimizer=opt)
    assert torch.equal(first.indices, warm.select(model, batch).indices)
    assert selector.normalizer.m is None  # the selector keeps no moments of its own

    seen = []
    real = table_module.adam_features

    def spy(g, moments):
        seen.append(moments)
        return real(g, moments)

    monkeypatch.setattr(table_module, "adam_features", spy)
    for _ in range(2):
        coreset_step(model, opt, selector, batch)
    block = find_value_block(model)
    want = optimizer_moments(opt, block)
    assert seen[-1].step == want.step - 1 == 2  # read before the second optimizer step
    assert seen[-1].m.shape == (block.numel,)
    assert adam_features is real
