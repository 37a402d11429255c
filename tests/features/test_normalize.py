"""Adam normalisation and sparsification against plain reference formulas."""

import torch

from colm.features import AdamNormalizer, top_dims


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
