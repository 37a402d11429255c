"""Replaying the last block reproduces the full model's per-example losses."""

import pytest
import torch

from colm.features import GradientFeatures, LastBlockReplay, find_value_block, full_model_losses
from tests.conftest import make_batch, make_tiny


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_replay_loss_equals_full_model(arch, lora, padding_side):
    model = make_tiny(arch, lora=lora)
    replay = LastBlockReplay(model, find_value_block(model))
    batch = make_batch(n=6, max_len=14, min_len=3, seed=1, padding_side=padding_side)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        ref = full_model_losses(model, ids, am, labels)
        got = replay.losses(replay.capture(ids, am), labels)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_per_example_loss_is_mean_over_label_tokens_not_padded_width(arch):
    """Each example's replayed loss equals Hugging Face's own loss on that example
    alone, unpadded (mean over its label tokens)."""
    model = make_tiny(arch, lora=True)
    replay = LastBlockReplay(model, find_value_block(model))
    batch = make_batch(n=5, max_len=14, min_len=3, seed=2)
    with torch.no_grad():
        got = replay.losses(
            replay.capture(batch["input_ids"], batch["attention_mask"]), batch["labels"]
        )
        for i in range(5):
            keep = batch["attention_mask"][i].bool()
            hf = model(
                input_ids=batch["input_ids"][i, keep][None], labels=batch["labels"][i, keep][None]
            ).loss
            torch.testing.assert_close(got[i], hf, atol=1e-5, rtol=1e-5)


def test_override_changes_only_what_it_should():
    model = make_tiny("llama", lora=True)
    block = find_value_block(model)
    replay = LastBlockReplay(model, block)
    batch = make_batch(n=4)
    cap = replay.capture(batch["input_ids"], batch["attention_mask"])
    before = block.parameter.detach().clone()
    with torch.no_grad():
        base = replay.losses(cap, batch["labels"])
        moved = replay.losses(
            cap, batch["labels"], {block.param_name: block.perturbed(torch.ones(block.shape))}
        )
        again = replay.losses(cap, batch["labels"])
    assert not torch.allclose(base, moved)
    assert torch.equal(base, again)  # capture is reusable, nothing drifted
    assert torch.equal(block.parameter, before)


@pytest.mark.parametrize("kind", ["zo", "exact"])
def test_chunking_does_not_change_features(kind):
    # float64: a zo coefficient is a difference of two losses over 2 * eps, which lifts
    # fp32 rounding (which BLAS blocking, and so the chunk size, can change) to ~1e-4;
    # in float64 any difference left is the chunking's own
    model = make_tiny("gpt2", lora=True).double()
    batch = make_batch(n=7, max_len=12, seed=3)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    whole = GradientFeatures(model, chunk_size=100)
    dirs = torch.randn(3, whole.numel, generator=torch.Generator().manual_seed(0))
    a = whole.compute(*args, kind=kind, directions=dirs)
    b = GradientFeatures(model, chunk_size=2).compute(*args, kind=kind, directions=dirs)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert a.shape == (7, whole.numel)


def test_capture_stops_before_the_last_block():
    """The trunk pass must not run the last block or the LM head."""
    model = make_tiny("llama")
    block = find_value_block(model)
    calls = []
    h1 = block.layer.register_forward_hook(lambda *a: calls.append("layer"))
    h2 = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("head"))
    try:
        batch = make_batch(n=2)
        LastBlockReplay(model, block).capture(batch["input_ids"], batch["attention_mask"])
    finally:
        h1.remove()
        h2.remove()
    assert calls == []
