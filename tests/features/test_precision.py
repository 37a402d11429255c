"""Selection numerics do not depend on the model's dtype (issue 12, item 1).

Zeroth-order features are central differences with eps = 1e-3, below the
resolution of bf16 weights and activations: replayed in bf16 they were noise
(correlation -0.02 with the exact g.z on SmolLM2-135M + LoRA). The replay runs
in fp32 for half-precision models; these tests hold it to the exact directional
derivative and to the features of the same weights in an fp32 model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from colm.features import GradientFeatures, check_replay, draw_directions
from colm.features import replay as replay_mod
from tests.conftest import make_batch, make_tiny

HALF = (torch.bfloat16, torch.float16)


def _args(n: int = 8, seed: int = 3):
    b = make_batch(n=n, max_len=12, seed=seed)
    return b["input_ids"], b["attention_mask"], b["labels"]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _zo_against_exact(model, q: int = 4) -> tuple[float, torch.Tensor]:
    """(correlation of zo coefficients with exact g.z, exact features)."""
    feats = GradientFeatures(model, chunk_size=8)
    args = _args()
    exact = feats.compute(*args, kind="exact")
    z = draw_directions(q, feats.numel, torch.Generator().manual_seed(0))
    coef = feats.compute(*args, kind="zo", directions=z, lifted=False)
    return _correlation(coef, exact @ z.T), exact


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_half_precision_features_match_fp32(arch, dtype, lora):
    """zo coefficients agree with the exact g.z, and exact features with those of
    the same weights in fp32."""
    model = make_tiny(arch, lora=lora, dtype=dtype)
    corr, exact = _zo_against_exact(model)
    assert corr >= 0.99, corr
    reference = GradientFeatures(copy.deepcopy(model).float(), chunk_size=8)
    assert reference.replay.dtype is None
    cos = F.cosine_similarity(exact, reference.compute(*_args(), kind="exact"), dim=1)
    assert cos.min() >= 0.99, cos


def test_fp32_models_replay_as_before_without_copies():
    model = make_tiny("llama", lora=True)
    feats = GradientFeatures(model)
    assert feats.replay.dtype is None
    assert feats.replay.parameter() is feats.block.parameter
    with feats.replay.upcast():
        assert feats.replay._state is None


def test_half_precision_copies_live_only_during_selection():
    model = make_tiny("llama", lora=True, dtype=torch.bfloat16)
    feats = GradientFeatures(model)
    assert feats.replay.dtype == torch.float32
    feats.compute(*_args(), kind="exact")
    assert feats.replay._state is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}


def test_features_ignore_an_active_autocast():
    """Selection called inside the user's bf16 autocast computes in fp32 all the same."""
    model = make_tiny("llama", lora=True)
    feats = GradientFeatures(model, chunk_size=8)
    z = draw_directions(2, feats.numel, torch.Generator().manual_seed(0))
    plain = feats.compute(*_args(), kind="zo", directions=z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = feats.compute(*_args(), kind="zo", directions=z)
    corr = _correlation(under, plain)
    assert corr >= 0.99, corr


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_check_replay_compares_in_the_models_own_precision(dtype):
    """check_replay verifies structure: the replay as the model runs it (half
    dtype, or the trunk's autocast) reproduces the model's losses."""
    model = make_tiny("llama", lora=True, dtype=dtype)
    feats = GradientFeatures(model)
    assert check_replay(feats.replay, *_args(4)) < 1e-2
    fp32 = GradientFeatures(make_tiny("llama", lora=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_replay(fp32.replay, *_args(4)) < 1e-2


def test_head_upcast_in_slabs_equals_one_slab(monkeypatch):
    """The half-precision LM head is upcast a few vocabulary rows at a time
    (forward and backward): same features as all rows at once."""
    model = make_tiny("gpt2", lora=True, dtype=torch.bfloat16)
    feats = GradientFeatures(model, chunk_size=8)
    whole = feats.compute(*_args(), kind="exact")
    # 97 rows of 32 fp32 numbers: slabs of 8 rows
    monkeypatch.setattr(replay_mod, "HEAD_SLAB_BYTES", 8 * 32 * 4)
    slabs = feats.compute(*_args(), kind="exact")
    torch.testing.assert_close(slabs, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_smollm2_lora_bf16_zo_agrees_with_exact():
    """The real SmolLM2-135M + LoRA loaded in bf16: 8 examples x 4 directions, zo
    coefficients against the exact g.z (was -0.02 before the fp32 replay), and
    exact features against the same weights in fp32."""
    from colm.models import add_lora, load_model

    model, _ = load_model(dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = add_lora(model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (8, 32), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100
    args = (ids, torch.ones_like(ids), labels)
    feats = GradientFeatures(model, chunk_size=8)
    exact = feats.compute(*args, kind="exact")
    z = draw_directions(4, feats.numel, torch.Generator().manual_seed(0))
    coef = feats.compute(*args, kind="zo", directions=z, lifted=False)
    corr = _correlation(coef, exact @ z.T)
    assert corr >= 0.99, corr
    reference = GradientFeatures(model.float(), chunk_size=8).compute(*args, kind="exact")
    cos = F.cosine_similarity(exact, reference, dim=1)
    assert cos.min() >= 0.99, cos
