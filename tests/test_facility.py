"""Tests for colm.facility against plain-Python twins and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from colm.facility import (
    FacilityLocationResult,
    _greedy_device,
    _greedy_lazy,
    _greedy_small,
    facility_location,
    pairwise_distances,
)

# --------------------------------------------------------------------------- slow twins


def ref_greedy(sim: list[list[float]], k: int) -> tuple[list[int], list[float]]:
    """Obviously-correct greedy: loops over candidates, ties to the lowest index."""
    n = len(sim)
    best = [0.0] * n
    picks: list[int] = []
    gains: list[float] = []
    for _ in range(min(k, n)):
        pick, pick_gain = -1, -math.inf
        for j in range(n):
            if j in picks:
                continue
            gain = sum(max(sim[i][j] - best[i], 0.0) for i in range(n))
            if gain > pick_gain:  # strict: an equal gain later never wins
                pick, pick_gain = j, gain
        picks.append(pick)
        gains.append(pick_gain)
        best = [max(best[i], sim[i][pick]) for i in range(n)]
    return picks, gains


def ref_objective(sim: list[list[float]], chosen: list[int]) -> float:
    if not chosen:
        return 0.0
    return sum(max(row[s] for s in chosen) for row in sim)


def brute_force_best(sim: list[list[float]], k: int) -> float:
    n = len(sim)
    return max(ref_objective(sim, list(c)) for c in itertools.combinations(range(n), min(k, n)))


def ref_weights(sim: list[list[float]], picks: list[int]) -> list[int]:
    """Each point joins its most similar pick; ties go to the earliest pick."""
    weights = [0] * len(picks)
    if not picks:
        return weights
    for row in sim:
        nearest = 0
        for t, s in enumerate(picks):
            if row[s] > row[picks[nearest]]:
                nearest = t
        weights[nearest] += 1
    return weights


def ref_similarity(x: list[list[float]], metric: str) -> list[list[float]]:
    def dist(a: list[float], b: list[float]) -> float:
        if metric == "l1":
            return sum(abs(u - v) for u, v in zip(a, b))
        if metric == "l2":
            return math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))
        na = math.sqrt(sum(u * u for u in a))
        nb = math.sqrt(sum(v * v for v in b))
        if na == 0 or nb == 0:
            return 0.0 if na == nb else 1.0
        return 1.0 - sum(u * v for u, v in zip(a, b)) / (na * nb)

    d = [[dist(a, b) for b in x] for a in x]
    c = max(max(row) for row in d)
    return [[c - v for v in row] for row in d]


def check_against_twins(
    sim_t: torch.Tensor, result: FacilityLocationResult, k: int, exact: bool = True
) -> None:
    """The fast result matches the twins on the very same similarity matrix.

    ``exact``: the similarities are small integers, so every sum is exact and
    gains must agree bit for bit; otherwise summation order may move the last bit.
    """
    sim = sim_t.tolist()
    n = len(sim)
    picks, gains = ref_greedy(sim, k)
    assert result.indices.tolist() == picks
    if exact:
        assert result.gains.tolist() == gains
    else:
        assert result.gains.tolist() == pytest.approx(gains, rel=1e-12, abs=1e-12)
    assert result.weights.tolist() == ref_weights(sim, picks)
    assert sum(result.weights.tolist()) == (n if picks else 0)
    g = result.gains.tolist()
    assert all(a >= b for a, b in zip(g, g[1:]))
    assert result.objective == pytest.approx(ref_objective(sim, picks), abs=1e-9)
    if 0 < k < n:
        opt = brute_force_best(sim, k)
        assert opt >= result.objective - 1e-9
        assert result.objective >= (1 - 1 / math.e) * opt - 1e-9


def similarity_of(x: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    d = pairwise_distances(x, metric)
    return d.max() - d


# --------------------------------------------------------------------------- greedy vs twins

# Small-integer coordinates: L1 distances and all gain sums are exact in float,
# so ties (duplicates, equal gains) are real ties and must go to the lowest index.
INT_FEATURES = st.integers(1, 9).flatmap(
    lambda n: st.integers(1, 3).flatmap(
        lambda d: st.lists(
            st.lists(st.integers(-2, 2), min_size=d, max_size=d), min_size=n, max_size=n
        )
    )
)


@settings(deadline=None, max_examples=150)
@given(
    rows=INT_FEATURES, k=st.integers(0, 10), dtype=st.sampled_from([torch.float32, torch.float64])
)
def test_greedy_matches_reference_on_integer_features(rows, k, dtype) -> None:
    x = torch.tensor(rows, dtype=dtype)
    result = facility_location(x, k)
    check_against_twins(similarity_of(x), result, k)
    # and the similarity itself is the plain C - L1 distance
    assert similarity_of(x).tolist() == ref_similarity(rows, "l1")


@settings(deadline=None, max_examples=100)
@given(rows=INT_FEATURES, k=st.integers(1, 10))
def test_sync_free_device_loop_matches_cpu_loop(rows, k) -> None:
    # The accelerator loop (masks, tensor indices, no host syncs) runs on CPU
    # too; it must agree with the CPU loop, including zero-gain tail picks.
    sim = similarity_of(torch.tensor(rows, dtype=torch.float64))
    k = min(k, len(rows))
    cand = sim.T.contiguous()
    cpu = _greedy_lazy(cand, k)
    dev = _greedy_device(cand, k)
    small = _greedy_small(cand, k)  # the CPU path for a few points
    for a, b, c in zip(cpu, dev, small):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_greedy_matches_reference_on_random_features(seed: int, metric: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 2 + seed % 8
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    sim = similarity_of(x, metric)
    ref = torch.tensor(ref_similarity(x.tolist(), metric), dtype=torch.float64)
    torch.testing.assert_close(sim, ref, atol=1e-12, rtol=0)
    for k in range(n + 2):
        result = facility_location(x, k, metric)
        check_against_twins(sim, result, k, exact=False)


def test_adversarial_duplicates_and_ties() -> None:
    # Two copies of each of three points, listed so that the tie-breaking order
    # matters: the later copy of a point must never be picked before the earlier.
    x = torch.tensor([[0.0], [5.0], [0.0], [9.0], [5.0], [9.0]])
    for k in range(7):
        result = facility_location(x, k)
        check_against_twins(similarity_of(x), result, k)
    full = facility_location(x, 6)
    # After one copy of each point is chosen, every gain is 0: the duplicates
    # follow in index order.
    assert full.gains[3:].tolist() == [0.0, 0.0, 0.0]
    assert full.indices[3:].tolist() == [2, 4, 5]
    assert full.weights[:3].sum() == 6


def test_golden_six_points_1d() -> None:
    # Points 0, 1, 2, 10, 11, 20 on a line; C = 20, sim = 20 - |x_i - x_j|.
    # Step 1: gain(j) = 120 - sum_i |x_i - x_j|; distance sums are
    #   38 for x=2 and x=10 (a tie: 82), 40 for x=1 and x=11, ... -> pick index 2, gain 82.
    #   best = [18, 19, 20, 12, 11, 2].
    # Step 2: x=11 adds 7 (pt 10) + 9 (pt 11) + 9 (pt 20) = 25; x=10 adds 24; x=20 adds 18
    #   -> pick index 4, gain 25. best = [18, 19, 20, 19, 20, 11].
    # Step 3: x=20 adds 9, x=0 and x=1 add 2, x=10 adds 1 -> pick index 5, gain 9.
    # F = 82 + 25 + 9 = 116. Clusters: {0, 1, 2} -> 2, {10, 11} -> 11, {20} -> 20.
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    result = facility_location(x, 3)
    assert result.indices.tolist() == [2, 4, 5]
    assert result.gains.tolist() == [82.0, 25.0, 9.0]
    assert result.weights.tolist() == [3, 2, 1]
    assert result.objective == 116.0


def test_gains_non_increasing_and_weights_sum_on_larger_input() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 40, generator=gen)
    result = facility_location(x, 48)
    g = result.gains
    assert bool((g[1:] <= g[:-1]).all())
    assert int(result.weights.sum()) == 96
    assert len(set(result.indices.tolist())) == 48
    assert result.objective == pytest.approx(float(g.double().sum()), rel=1e-5)


def test_torch_argmax_returns_first_maximum() -> None:
    # The greedy's tie rule relies on this documented behaviour.
    assert int(torch.argmax(torch.tensor([1.0, 3.0, 3.0, 2.0]))) == 1
    big = torch.zeros(200_000)
    big[[123_456, 7_000, 150_000]] = 1.0
    assert int(torch.argmax(big)) == 7_000
    assert int(torch.argmax(torch.zeros(100_000))) == 0
    rows = torch.tensor([[0.0, 2.0, 2.0], [5.0, 5.0, 1.0]])
    assert torch.argmax(rows, dim=1).tolist() == [1, 0]
    # ... and so does torch.max(dim=...), used by the CPU greedy.
    assert int(torch.max(torch.tensor([1.0, 3.0, 3.0, 2.0]), dim=0).indices) == 1
    assert int(torch.max(big, dim=0).indices) == 7_000
    assert torch.max(rows, dim=1).indices.tolist() == [1, 0]


# --------------------------------------------------------------------------- distances


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_distances_match_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(33, 17, generator=gen).to(dtype)
    xd = x.double()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(
        pairwise_distances(x, "l1").double(), torch.cdist(xd, xd, p=1), atol=tol, rtol=0
    )
    euclid = torch.cdist(xd, xd, p=2, compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(pairwise_distances(x, "l2").double(), euclid, atol=tol, rtol=0)
    cos = 1 - F.cosine_similarity(xd[:, None, :], xd[None, :, :], dim=-1)
    cos.fill_diagonal_(0.0)
    torch.testing.assert_close(pairwise_distances(x, "cosine").double(), cos, atol=tol, rtol=0)
    for metric in ("l1", "l2", "cosine"):
        d = pairwise_distances(x, metric)
        assert d.dtype == dtype
        assert torch.equal(d, d.T)
        assert bool((d.diagonal() == 0).all())


def test_cosine_zero_vectors_have_no_nan() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    d = pairwise_distances(x, "cosine")
    assert not bool(d.isnan().any())
    assert d[0, 2] == 0 and d[2, 0] == 0  # two zero rows are the same point
    assert d[0, 1] == 1 and d[1, 2] == 1  # a zero row is orthogonal to the rest
    assert d[1, 3] == 0  # parallel rows: exactly 0
    assert d[1, 4] == pytest.approx(1.0)
    # (No twin comparison here: orthogonal pairs sit within an ulp of the zero
    # rows' distance 1, so gains tie up to summation order.)
    result = facility_location(x, 5, "cosine")
    assert sorted(result.indices.tolist()) == [0, 1, 2, 3, 4]
    assert not bool(result.gains.isnan().any())
    assert int(result.weights.sum()) == 5


def test_identical_rows_have_exactly_zero_distance_for_every_metric() -> None:
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(1, 2560, generator=gen)
    x = row.repeat(4, 1)
    for metric in ("l1", "l2", "cosine"):
        assert bool((pairwise_distances(x, metric) == 0).all()), metric


# --------------------------------------------------------------------------- similarity=


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_similarity_path_equals_feature_path(metric: str) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 6, generator=gen)
    from_features = facility_location(x, 7, metric)
    from_sim = facility_location(None, 7, similarity=similarity_of(x, metric))
    assert torch.equal(from_features.indices, from_sim.indices)
    assert torch.equal(from_features.gains, from_sim.gains)
    assert torch.equal(from_features.weights, from_sim.weights)
    assert from_features.objective == from_sim.objective


def test_similarity_may_be_asymmetric() -> None:
    # sim[i, s]: how well s represents i. Point 0 is served well by anyone.
    sim = torch.tensor([[3.0, 3.0, 3.0], [0.0, 3.0, 0.0], [0.0, 1.0, 3.0]])
    result = facility_location(None, 3, similarity=sim)
    check_against_twins(sim, result, 3)
    assert result.indices.tolist()[0] == 1  # gain 7 beats 3 (index 0) and 6 (index 2)


# --------------------------------------------------------------------------- edge cases


def test_k_at_least_n_returns_everything_in_greedy_order() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    for k in (6, 7, 100):
        result = facility_location(x, k)
        assert sorted(result.indices.tolist()) == list(range(6))
        assert result.indices[:3].tolist() == [2, 4, 5]
        assert result.weights.tolist() == [1] * 6
        assert result.objective == 6 * 20.0  # every point is its own medoid: C each


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k_zero(dtype: torch.dtype) -> None:
    result = facility_location(torch.randn(5, 3, dtype=dtype), 0)
    assert result.indices.shape == (0,) and result.indices.dtype == torch.long
    assert result.gains.shape == (0,) and result.gains.dtype == dtype
    assert result.weights.shape == (0,) and result.weights.dtype == torch.long
    assert result.objective == 0.0


def test_single_point() -> None:
    result = facility_location(torch.tensor([[1.0, -2.0]]), 3)
    assert result.indices.tolist() == [0]
    assert result.gains.tolist() == [0.0]  # C = 0 when there is nothing to compare
    assert result.weights.tolist() == [1]
    assert result.objective == 0.0


def test_no_points() -> None:
    result = facility_location(torch.empty(0, 4), 2)
    assert result.indices.numel() == 0 and result.weights.numel() == 0
    assert result.objective == 0.0


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_all_points_identical(metric: str) -> None:
    x = torch.full((7, 3), 0.25)
    result = facility_location(x, 4, metric)
    assert result.indices.tolist() == [0, 1, 2, 3]
    assert result.gains.tolist() == [0.0] * 4
    assert result.weights.tolist() == [7, 0, 0, 0]  # everything ties to the first pick
    assert result.objective == 0.0


def test_result_is_frozen() -> None:
    result = facility_location(torch.randn(4, 2), 2)
    with pytest.raises(AttributeError):
        result.objective = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_result_keeps_device_and_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(10, 4, dtype=dtype)
    result = facility_location(x, 3)
    assert result.gains.dtype == dtype
    assert result.indices.dtype == torch.long and result.weights.dtype == torch.long
    for t in (result.indices, result.gains, result.weights):
        assert t.device == x.device
    assert pairwise_distances(x).dtype == dtype
    assert isinstance(result.objective, float)


def test_half_precision_is_computed_in_float32() -> None:
    x = torch.randint(-3, 4, (9, 5)).to(torch.bfloat16)
    result = facility_location(x, 4)
    assert result.gains.dtype == torch.bfloat16
    assert pairwise_distances(x).dtype == torch.float32
    reference = facility_location(x.float(), 4)
    assert torch.equal(result.indices, reference.indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_cuda_matches_cpu(metric: str) -> None:
    x = torch.randint(-3, 4, (50, 8)).double()
    cpu = facility_location(x, 20, metric)
    gpu = facility_location(x.cuda(), 20, metric)
    assert gpu.indices.device.type == "cuda" and gpu.gains.device.type == "cuda"
    assert gpu.gains.dtype == torch.float64
    if metric == "l1":  # integer data: exact on both devices
        assert torch.equal(gpu.indices.cpu(), cpu.indices)
        assert torch.equal(gpu.weights.cpu(), cpu.weights)
    torch.testing.assert_close(gpu.gains.cpu(), cpu.gains)


# --------------------------------------------------------------------------- errors


def test_nan_row_is_named() -> None:
    x = torch.randn(20, 4)
    x[17, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^features row 17 contains NaN or inf; "):
        facility_location(x, 3)


def test_several_bad_rows_are_named() -> None:
    x = torch.randn(30, 4)
    x[3, 0] = float("inf")
    x[25, 1] = float("-inf")
    x[12, 3] = float("nan")
    with pytest.raises(ValueError, match=r"features rows 3, 12, 25 contain NaN or inf"):
        pairwise_distances(x)


def test_huge_but_finite_features_are_not_called_nan() -> None:
    # The sum of these rows overflows float32, so the fast finiteness check
    # fails; the exact check must then find no bad row and let them through.
    x = torch.tensor([[3e38, 3e38], [3e38, 3e38], [3e38, 3e38]])
    result = facility_location(x, 2)
    assert result.indices.tolist() == [0, 1]


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_overflowing_distances_are_reported(metric: str) -> None:
    x = torch.tensor([[3e38, 3e38], [-3e38, 3e38], [1.0, 2.0]])
    with pytest.raises(ValueError, match=f"{metric} distances overflow torch.float32"):
        facility_location(x, 2, metric)
    assert facility_location(x.double(), 2, metric).indices.numel() == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"features": torch.randn(4, 2), "k": -1}, ValueError, "k must be >= 0"),
        ({"features": torch.randn(4, 2), "k": 1.5}, TypeError, "k must be an int"),
        ({"features": torch.randn(4, 2), "k": True}, TypeError, "k must be an int"),
        ({"features": torch.randn(4), "k": 1}, ValueError, "must be 2-D"),
        ({"features": torch.randn(2, 3, 4), "k": 1}, ValueError, "must be 2-D"),
        ({"features": torch.ones(4, 2, dtype=torch.long), "k": 1}, ValueError, "floating-point"),
        ({"features": [[1.0, 2.0]], "k": 1}, TypeError, "torch.Tensor"),
        ({"features": torch.randn(4, 2), "k": 1, "metric": "l3"}, ValueError, "unknown metric"),
        (
            {"features": None, "k": 1, "metric": "L1", "similarity": torch.ones(2, 2)},
            ValueError,
            "unknown metric",
        ),
        ({"features": None, "k": 1}, ValueError, "exactly one of"),
        (
            {"features": torch.randn(4, 2), "k": 1, "similarity": torch.ones(4, 4)},
            ValueError,
            "exactly one of",
        ),
        ({"features": None, "k": 1, "similarity": torch.ones(4, 3)}, ValueError, "square"),
        ({"features": None, "k": 1, "similarity": torch.ones(4)}, ValueError, "square"),
        (
            {"features": None, "k": 1, "similarity": torch.ones(2, 2, dtype=torch.int32)},
            ValueError,
            "floating-point",
        ),
        (
            {"features": None, "k": 1, "similarity": torch.tensor([[1.0, 0.0], [0.0, -1.0]])},
            ValueError,
            "negative",
        ),
        (
            {"features": None, "k": 1, "similarity": torch.tensor([[1.0, 0.0], [math.inf, 1.0]])},
            ValueError,
            "similarity row 1 contains NaN or inf",
        ),
    ],
)
def test_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        facility_location(**kwargs)


@pytest.mark.parametrize(
    "n, metric", [(16, "l1"), (48, "cosine"), (64, "l1"), (300, "l1"), (200, "cosine")]
)
def test_lazy_greedy_equals_plain_greedy_at_coreset_sizes(n: int, metric: str) -> None:
    # the CPU fast paths (lazy greedy; every gain recomputed, for a few points) against
    # the plain vectorised greedy, float32, with near-ties as real features make them
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 256, generator=gen) * torch.rand(n, 1, generator=gen)
    sim = similarity_of(x, metric)
    cand = sim.T.contiguous()
    plain = _greedy_device(cand, n // 2)
    for fast in (_greedy_lazy(cand, n // 2), _greedy_small(cand, n // 2)):
        assert torch.equal(fast[0], plain[0])
        assert torch.allclose(fast[1], plain[1], rtol=1e-5)
        assert torch.allclose(fast[2], plain[2])
