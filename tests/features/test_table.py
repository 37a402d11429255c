"""Streamed features (bounded memory for wide blocks) against the features held whole."""

import pytest
import torch

from colm import CoresetSelector, SelectorConfig
from colm.features import Moments
from colm.features.table import DenseFeatures, StreamedFeatures
from colm.integrations.loop import coreset_step
from tests.conftest import make_batch, make_tiny
from tests.test_selector import COUNTS, mixed_sources


def _tables(g: torch.Tensor, chunk: int):
    """The same rows, held whole and streamed in chunks (recording the widest chunk)."""
    widest = [0]

    def chunks(positions=None):
        order = torch.arange(g.shape[0]) if positions is None else torch.tensor(positions)
        for part in order.split(chunk):
            widest[0] = max(widest[0], len(part))
            yield part, g[part].clone()

    return DenseFeatures(g), StreamedFeatures(chunks, g.shape[0], g.shape[1]), widest


@pytest.mark.parametrize("adam", [True, False])
def test_streamed_table_answers_as_the_dense_one(adam):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(11, 300, generator=gen) * torch.rand(300, generator=gen)
    g[4, 17] = float("nan")  # a non-finite row is excluded by both
    dense, streamed, widest = _tables(g, chunk=3)
    moments = None
    if adam:
        m = torch.randn(300, generator=gen) * 0.1
        moments = Moments(m, m * m + 0.01, 0.9, 0.999, 1e-8, 3)
    groups = [[0, 2, 4, 6, 8], [1, 3, 5], [7, 9, 10]]
    a = dense.source_features(groups, moments, h=40)
    b = streamed.source_features(groups, moments, h=40)
    assert streamed.passes == 2 and widest[0] == 3
    for (pa, fa), (pb, fb) in zip(a, b):
        assert pa.tolist() == pb.tolist()
        assert fa.shape == fb.shape == (len(pa), 40)
        torch.testing.assert_close(fa, fb, rtol=1e-6, atol=1e-7)
    assert 4 not in a[0][0].tolist()
    assert dense.finite.tolist() == streamed.finite.tolist()
    for x, y in zip(dense.means([0, 5, 9]), streamed.means([0, 5, 9])):
        torch.testing.assert_close(x, y)
    assert streamed.passes == 3  # the means pass over the 3 rows only
    ma, mb = dense.batch_moments(0.9, 0.99, 1e-8), streamed.batch_moments(0.9, 0.99, 1e-8)
    torch.testing.assert_close(ma.m, mb.m)
    torch.testing.assert_close(ma.v, mb.v)


def test_streamed_table_width_is_capped_by_the_block():
    g = torch.randn(5, 8)
    dense, streamed, _ = _tables(g, chunk=2)
    a = dense.source_features([[0, 1, 2, 3, 4]], None, h=100)
    b = streamed.source_features([[0, 1, 2, 3, 4]], None, h=100)
    assert a[0][1].shape == b[0][1].shape == (5, 8)
    torch.testing.assert_close(a[0][1], b[0][1])


@pytest.fixture(scope="module")
def full_model():
    """Full fine-tuning: no LoRA, the block is the value projection's weight itself."""
    return make_tiny("llama", lora=False)


def _run(model, feature, moments, method, max_feature_mb, steps=3):
    """``steps`` coreset steps of the plain loop (the optimizer's moments are real)."""
    torch.manual_seed(0)
    m = make_tiny("llama", lora=False)
    m.load_state_dict(model.state_dict())
    m.train()
    cfg = SelectorConfig(
        ratio=0.5,
        feature=feature,
        num_directions=3,
        moments=moments,
        method=method,
        topk_dims=50,
        chunk_size=2,
        max_feature_mb=max_feature_mb,
        check_replay=False,
        seed=1,
    )
    sel = CoresetSelector(cfg, COUNTS)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    picks, stats = [], []
    for step in range(steps):
        batch = make_batch(n=17, max_len=10, seed=20 + step, sources=mixed_sources(17, step))
        out = coreset_step(m, opt, sel, batch, micro_batches=1)
        picks.append(out.selection.indices.tolist())
        stats.append(out.selection.stats)
    return picks, stats, sel, m


@pytest.mark.parametrize(
    "feature,moments,method",
    [
        ("exact", "fresh", "colm"),
        ("exact", "warm", "colm"),
        ("exact", "optimizer", "match"),
        ("zo", "fresh", "colm"),
        ("zo", "warm", "match"),
    ],
)
def test_streamed_selection_equals_held_selection(full_model, feature, moments, method):
    """Full fine-tuning of the value projection's weight: streaming the features
    (max_feature_mb=0) picks the same coresets and trains to the same weights as
    holding them whole, with the passes the streamed path documents."""
    held = _run(full_model, feature, moments, method, None)
    streamed = _run(full_model, feature, moments, method, 0)
    assert held[0] == streamed[0]
    assert not any(s["streamed"] for s in held[1])
    assert all(s["streamed"] for s in streamed[1])
    if moments != "optimizer":
        torch.testing.assert_close(held[2].normalizer.m, streamed[2].normalizer.m)
        torch.testing.assert_close(held[2].normalizer.v, streamed[2].normalizer.v)
    for (name, a), b in zip(held[3].named_parameters(), streamed[3].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # sums + kept values (+ the selected rows' means for the selector's own moments;
    # + the batch statistics at the first step of a warm start, and of the optimizer's
    # moments before the optimizer has any)
    base = 2 + (moments != "optimizer")
    assert streamed[1][0]["feature_passes"] == base + (moments != "fresh")
    assert streamed[1][1]["feature_passes"] == base
    assert held[1][1]["feature_passes"] == 0


def test_streaming_starts_past_the_budget(full_model):
    """The value projection of the tiny Llama is 16 x 32 = 512 numbers (2 KiB a row):
    17 rows stream under a budget of 0.01 MiB and are held whole under 1 MiB."""
    d = full_model.model.layers[-1].self_attn.v_proj.weight.numel()
    small = _run(full_model, "exact", "fresh", "colm", 1.0, steps=1)[1][0]
    tight = _run(full_model, "exact", "fresh", "colm", 0.01, steps=1)[1][0]
    rows = sum(c["in_batch"] for c in small["sources"].values() if c["kept"] == 0)
    assert rows * d * 4 > 0.01 * 2**20
    assert not small["streamed"] and tight["streamed"]


@pytest.mark.parametrize("bad", [-1, "big", True])
def test_max_feature_mb_validation(bad):
    with pytest.raises(ValueError, match="max_feature_mb"):
        SelectorConfig(max_feature_mb=bad)
