"""Adam normalisation and sparsification against plain reference formulas."""

import copy

import pytest
import torch

from colm.features import AdamNormalizer, Moments, adam_features, optimizer_moments, top_dims


def reference_adam(g_steps, selected_steps, b1=0.9, b2=0.999, eps=1e-8):
    """Plain per-example, per-coordinate loops over steps (METHOD.md, step 4)."""
    D = len(g_steps[0][0])
    m, v = [0.0] * D, [0.0] * D
    outs = []
    for t, (g, sel) in enumerate(zip(g_steps, selected_steps), start=1):
        f, ms, vs = [], [], []
        for row in g:
            mi = [b1 * m[d] + (1 - b1) * row[d] for d in range(D)]
            vi = [b2 * v[d] + (1 - b2) * row[d] ** 2 for d in range(D)]
            f.append(
                [(mi[d] / (1 - b1**t)) / ((vi[d] / (1 - b2**t)) ** 0.5 + eps) for d in range(D)]
            )
            ms.append(mi)
            vs.append(vi)
        outs.append(f)
        m = [sum(ms[i][d] for i in sel) / len(sel) for d in range(D)]
        v = [sum(vs[i][d] for i in sel) / len(sel) for d in range(D)]
    return outs, m, v


def test_adam_normalizer_matches_reference_over_steps():
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(4)]
    selected = [[0, 2], [1], [3, 4, 0], [2, 3]]
    ref_f, ref_m, ref_v = reference_adam([s.tolist() for s in steps], selected)
    norm = AdamNormalizer()
    for g, sel, rf in zip(steps, selected, ref_f):
        f = norm.normalize(g.float())
        torch.testing.assert_close(f, torch.tensor(rf, dtype=torch.float32), rtol=1e-4, atol=1e-5)
        norm.update(g.float()[sel])
    torch.testing.assert_close(norm.m, torch.tensor(ref_m, dtype=torch.float32))
    torch.testing.assert_close(norm.v, torch.tensor(ref_v, dtype=torch.float32))
    assert norm.step == 4


def test_normalizer_state_round_trip_and_size_check():
    a = AdamNormalizer()
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    a.normalize(g)
    a.update(g[:2])
    b = AdamNormalizer()
    b.load_state_dict(a.state_dict())
    g2 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.normalize(g2), b.normalize(g2))
    try:
        b.normalize(torch.randn(3, 5))
    except ValueError as e:
        assert "value block changed" in str(e)
    else:
        raise AssertionError("size mismatch not detected")


def test_top_dims_picks_largest_abs_mean():
    f = torch.tensor([[1.0, -5.0, 0.1, 3.0], [1.0, -4.0, -0.1, -2.0]])
    # means: 1, -4.5, 0, 0.5 -> |.| ranks: 1, 0, 3, 2
    assert top_dims(f, 2).tolist() == [0, 1]
    assert top_dims(f, 3).tolist() == [0, 1, 3]
    assert top_dims(f, 99).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- moment sources


def reference_features(g, m, v, b1=0.9, b2=0.999, eps=1e-8, t=None):
    """Plain per-example, per-coordinate Adam update of one gradient row each."""
    out = []
    for row in g:
        f = []
        for d, x in enumerate(row):
            mi, vi = b1 * m[d] + (1 - b1) * x, b2 * v[d] + (1 - b2) * x * x
            if t is not None:
                mi, vi = mi / (1 - b1**t), vi / (1 - b2**t)
            f.append(mi / (vi**0.5 + eps))
        out.append(f)
    return torch.tensor(out, dtype=torch.float32)


def test_adam_features_match_plain_formula_with_and_without_bias_correction():
    gen = torch.Generator().manual_seed(3)
    g, m, v = (
        torch.randn(4, 6, generator=gen),
        torch.randn(6, generator=gen),
        torch.rand(6, generator=gen),
    )
    for t in (None, 1, 7):
        got = adam_features(g, Moments(m, v, 0.9, 0.999, 1e-8, t))
        want = reference_features(g.tolist(), m.tolist(), v.tolist(), t=t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_warm_start_keeps_the_geometry_that_fresh_moments_collapse_to_signs():
    # zo with one direction: every feature of a step is c_i * z (rank one)
    gen = torch.Generator().manual_seed(0)
    z, c = torch.randn(50, generator=gen), torch.randn(8, generator=gen)
    g = c[:, None] * z[None, :]
    fresh = AdamNormalizer().normalize(g)
    assert len({tuple(r) for r in fresh.sign().tolist()}) <= 2
    assert torch.allclose(fresh.abs(), torch.ones_like(fresh), atol=1e-4)  # signs only
    warm = AdamNormalizer(warm=True).normalize(g)
    m, v = g.mean(0), (g * g).mean(0)
    torch.testing.assert_close(warm, reference_features(g.tolist(), m.tolist(), v.tolist()))
    # distances between warm features order the examples as their coefficients do
    d_warm = torch.cdist(warm, warm, p=1)[0]
    d_coef = (c - c[0]).abs()
    assert torch.equal(d_warm.argsort(), d_coef.argsort())


def test_warm_update_starts_from_the_whole_batch_statistics():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64).float()
    norm = AdamNormalizer(warm=True)
    norm.normalize(g)
    norm.update(g[[1, 4]])
    m0, v0 = g.mean(0), (g * g).mean(0)
    torch.testing.assert_close(norm.m, 0.9 * m0 + 0.1 * g[[1, 4]].mean(0))
    torch.testing.assert_close(norm.v, 0.999 * v0 + 0.001 * (g[[1, 4]] ** 2).mean(0))
    # later steps: no bias correction (the moments never started from zero)
    g2 = torch.randn(3, 5, generator=gen)
    want = reference_features(g2.tolist(), norm.m.tolist(), norm.v.tolist(), t=None)
    torch.testing.assert_close(norm.normalize(g2), want)
    fresh_state = AdamNormalizer().state_dict()
    with pytest.raises(ValueError, match="moments the state was saved with"):
        AdamNormalizer(warm=True).load_state_dict(fresh_state)


def _adam_step_update(opt_state_from, param, grad, lr=1.0):
    """What torch's AdamW would change ``param`` by with gradient ``grad`` (the twin)."""
    p = torch.nn.Parameter(param.detach().clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
    opt.load_state_dict(copy.deepcopy(opt_state_from))  # it may share the state's tensors
    opt.param_groups[0]["lr"] = lr  # load_state_dict brings the saved learning rate
    p.grad = grad.clone()
    before = p.detach().clone()
    opt.step()
    return (before - p.detach()) / lr


def test_optimizer_moments_give_the_update_adam_would_make():
    from colm.features import find_value_block
    from tests.conftest import make_tiny

    model = make_tiny("llama", lora=True)
    block = find_value_block(model)
    opt = torch.optim.AdamW([block.parameter], lr=1e-3, weight_decay=0.0)
    assert optimizer_moments(opt, block) is None  # no step yet
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        block.parameter.grad = torch.randn(block.parameter.shape, generator=gen)
        opt.step()
    mom = optimizer_moments(opt, block)
    assert mom.step == 4 and (mom.beta1, mom.beta2) == (0.9, 0.999)
    g = torch.randn(3, block.numel, generator=gen)
    f = adam_features(g, mom)
    for i in range(3):
        want = _adam_step_update(opt.state_dict(), block.parameter, g[i].reshape(block.shape))
        torch.testing.assert_close(f[i], want.reshape(-1), rtol=1e-4, atol=1e-6)


def test_optimizer_moments_refuse_what_they_cannot_read():
    from colm.features import find_value_block
    from tests.conftest import make_tiny

    model = make_tiny("llama", lora=True)
    block = find_value_block(model)
    other = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="does not train the value block"):
        optimizer_moments(torch.optim.AdamW([other]), block)
    sgd = torch.optim.SGD([block.parameter], lr=0.1, momentum=0.9)
    block.parameter.grad = torch.ones_like(block.parameter)
    sgd.step()
    with pytest.raises(ValueError, match="Adam-family"):
        optimizer_moments(sgd, block)

    class DeepSpeedZeroOptimizer:  # partitions its state: nothing per parameter
        state: dict = {}
        param_groups: list = []

    with pytest.raises(ValueError, match="ZeRO"):
        optimizer_moments(DeepSpeedZeroOptimizer(), block)
