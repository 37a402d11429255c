"""Exact per-example block gradients against a plain per-example autograd loop."""

import pytest
import torch

from colm.features import GradientFeatures, find_value_block
from colm.features.replay import per_example_loss_from_logits
from tests.conftest import make_batch, make_tiny


def reference_gradients(model, batch):
    """One example at a time, full model, torch.autograd.grad on the block's parameter."""
    block = find_value_block(model)
    param = block.parameter
    was = param.requires_grad
    param.requires_grad_(True)
    rows = []
    try:
        for i in range(batch["input_ids"].shape[0]):
            out = model(
                input_ids=batch["input_ids"][i : i + 1],
                attention_mask=batch["attention_mask"][i : i + 1],
            )
            loss = per_example_loss_from_logits(out.logits, batch["labels"][i : i + 1])[0]
            (g,) = torch.autograd.grad(loss, param)
            rows.append(block.view(g).reshape(-1))
    finally:
        param.requires_grad_(was)
    return torch.stack(rows)


@pytest.mark.parametrize("lora", [False, True])
def test_exact_features_match_per_example_autograd(arch, lora):
    model = make_tiny(arch, lora=lora)
    batch = make_batch(n=5, max_len=12, seed=4)
    feats = GradientFeatures(model, chunk_size=3).compute(
        batch["input_ids"], batch["attention_mask"], batch["labels"], kind="exact"
    )
    ref = reference_gradients(model, batch)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)
    assert ref.abs().sum() > 0


def test_exact_does_not_touch_parameter_grads():
    model = make_tiny("llama", lora=True)
    batch = make_batch(n=3)
    GradientFeatures(model).compute(
        batch["input_ids"], batch["attention_mask"], batch["labels"], kind="exact"
    )
    assert all(p.grad is None for p in model.parameters())
