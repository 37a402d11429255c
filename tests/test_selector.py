"""CoresetSelector end to end on tiny models."""

import pytest
import torch

from colm import CoresetSelector, SelectorConfig, allocate_budget, facility_location
from colm.features import AdamNormalizer, GradientFeatures, ReplayMismatchError, top_dims
from tests.conftest import make_batch, make_tiny

COUNTS = {"big1": 1000, "big2": 800, "big3": 600, "small1": 30, "small2": 10}
# mean = 488 -> small1, small2 are small


def mixed_sources(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = ["big1"] * 6 + ["big2"] * 5 + ["big3"] * 3 + ["small1"] * 2 + ["small2"]
    order = torch.randperm(len(names), generator=g).tolist()
    return [names[i % len(names)] for i in order][:n]


def make_selector(**kw):
    kw.setdefault("check_replay", False)
    kw.setdefault("method", "colm")
    return CoresetSelector(SelectorConfig(**kw), COUNTS)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", lora=True)


@pytest.fixture(scope="module")
def batch():
    return make_batch(n=17, max_len=10, seed=7, sources=mixed_sources(17))


def test_small_sources_kept_and_budget_followed(model, batch):
    sel = make_selector(ratio=0.5).select(model, batch)
    src = batch["source"]
    picked = sel.indices.tolist()
    assert len(picked) == 9  # round(0.5 * 17) = 9 (half up)
    small = [i for i, s in enumerate(src) if s.startswith("small")]
    assert set(small) <= set(picked)
    in_batch = {s: src.count(s) for s in ("big1", "big2", "big3")}
    expected = allocate_budget(in_batch, 9 - len(small))
    for s, k in expected.items():
        assert sum(src[i] == s for i in picked) == k
        assert sel.stats["sources"][s] == {"in_batch": in_batch[s], "kept": 0, "selected": k}
    assert sel.stats["sources"]["small1"]["kept"] == src.count("small1")
    assert picked == sorted(set(picked))
    assert torch.equal(sel.weights, torch.ones(9))
    assert sel.stats["time_features"] > 0


@pytest.mark.parametrize("feature", ["zo", "exact"])
def test_same_seed_same_selection_and_state_round_trip(model, batch, feature):
    a = make_selector(feature=feature, num_directions=2, seed=3)
    b = make_selector(feature=feature, num_directions=2, seed=3)
    for _ in range(2):
        assert torch.equal(a.select(model, batch).indices, b.select(model, batch).indices)
    state = a.state_dict()
    cont = [a.select(model, batch) for _ in range(3)]
    c = make_selector(feature=feature, num_directions=2, seed=99)
    c.load_state_dict(state)
    resumed = [c.select(model, batch) for _ in range(3)]
    for x, y in zip(cont, resumed):
        assert torch.equal(x.indices, y.indices)
        assert torch.equal(x.weights, y.weights)
    assert torch.equal(a.normalizer.m, c.normalizer.m)
    assert a.step == c.step == 5


def test_zo_selection_changes_over_steps_and_seeds(model, batch):
    a = make_selector(seed=0)
    picks = {tuple(a.select(model, batch).indices.tolist()) for _ in range(6)}
    assert len(picks) > 1  # fresh directions + moments make later steps differ
    other = {tuple(make_selector(seed=s).select(model, batch).indices.tolist()) for s in range(6)}
    assert len(other) > 1


def test_medoids_are_facility_location_on_normalised_sparsified_features(model, batch):
    """Slow twin of one step with exact features: normalise, sparsify, greedy."""
    sel = make_selector(feature="exact", topk_dims=7, metric="l1")
    got = sel.select(model, batch)
    src = batch["source"]
    big = [i for i, s in enumerate(src) if s.startswith("big")]
    feats = GradientFeatures(model).compute(
        batch["input_ids"][big], batch["attention_mask"][big], batch["labels"][big], "exact"
    )
    f = AdamNormalizer().normalize(feats)
    small = [i for i, s in enumerate(src) if s.startswith("small")]
    budget = allocate_budget({s: src.count(s) for s in ("big1", "big2", "big3")}, 9 - len(small))
    expected = set(small)
    chosen_g = []
    for s in ("big1", "big2", "big3"):
        rows = [r for r, i in enumerate(big) if src[i] == s]
        fs = f[rows]
        fs = fs[:, top_dims(fs, 7)]
        picks = facility_location(fs, budget[s], metric="l1").indices.tolist()
        expected |= {big[rows[p]] for p in picks}
        chosen_g += [feats[rows[p]] for p in picks]
    assert set(got.indices.tolist()) == expected
    # moments: mean of m_i over selected examples, m starting at 0
    mean_g = torch.stack(chosen_g).mean(0)
    torch.testing.assert_close(sel.normalizer.m, 0.1 * mean_g, atol=1e-6, rtol=1e-4)
    assert sel.normalizer.step == 1


@pytest.mark.parametrize("weights", ["uniform", "cluster"])
def test_match_method_is_gradient_matching_on_the_same_features(model, batch, weights):
    """Slow twin of one method="match" step: the same features as colm, then
    gradient_match per big source (fitted weights with weights="cluster")."""
    from colm.matching import gradient_match

    sel = make_selector(method="match", feature="exact", topk_dims=7, weights=weights)
    got = sel.select(model, batch)
    src = batch["source"]
    big = [i for i, s in enumerate(src) if s.startswith("big")]
    feats = GradientFeatures(model).compute(
        batch["input_ids"][big], batch["attention_mask"][big], batch["labels"][big], "exact"
    )
    f = AdamNormalizer().normalize(feats)
    small = [i for i, s in enumerate(src) if s.startswith("small")]
    budget = allocate_budget({s: src.count(s) for s in ("big1", "big2", "big3")}, 9 - len(small))
    expected = {i: 1.0 for i in small}
    for s in ("big1", "big2", "big3"):
        rows = [r for r, i in enumerate(big) if src[i] == s]
        fs = f[rows]
        fs = fs[:, top_dims(fs, 7)]
        m = gradient_match(fs, budget[s], weights="fit" if weights == "cluster" else "uniform")
        for p, w in zip(m.indices.tolist(), m.weights.tolist()):
            expected[big[rows[p]]] = w if weights == "cluster" else 1.0
    assert got.indices.tolist() == sorted(expected)
    torch.testing.assert_close(got.weights, torch.tensor([expected[i] for i in sorted(expected)]))
    fl = make_selector(feature="exact", topk_dims=7, weights=weights).select(model, batch)
    # not facility location in disguise
    assert got.indices.tolist() != fl.indices.tolist() or not torch.equal(got.weights, fl.weights)


def test_random_big_keeps_small_sources_and_budgets_without_features(model, batch, monkeypatch):
    def no_features(self, *args, **kwargs):
        raise AssertionError("random_big must not compute features")

    colm = make_selector().select(model, batch)
    monkeypatch.setattr(GradientFeatures, "compute", no_features)
    picks = set()
    for seed in range(4):
        sel = make_selector(method="random_big", seed=seed).select(model, batch)
        assert sel.stats["sources"] == colm.stats["sources"]  # same kept / per-source counts
        assert torch.equal(sel.weights, torch.ones(len(sel.indices)))
        picks.add(tuple(sel.indices.tolist()))
    assert len(picks) > 1  # random within the sources


def test_small_sources_over_budget_random_subset_recorded(model):
    srcs = ["small1"] * 6 + ["small2"] * 4 + ["big1"] * 2
    batch = make_batch(n=12, sources=srcs, seed=3)
    sel = make_selector(size=4).select(model, batch)
    assert len(sel.indices) == 4
    assert all(srcs[i].startswith("small") for i in sel.indices.tolist())
    assert sel.stats["small_overflow"] == 6
    again = make_selector(size=4).select(model, batch)
    assert torch.equal(sel.indices, again.indices)


def test_cluster_weights_are_cluster_sizes(model, batch):
    sel = make_selector(weights="cluster").select(model, batch)
    src = batch["source"]
    for s in ("big1", "big2", "big3"):
        w = sum(float(w) for i, w in zip(sel.indices.tolist(), sel.weights) if src[i] == s)
        assert w == src.count(s)
    for i, w in zip(sel.indices.tolist(), sel.weights):
        if src[i].startswith("small"):
            assert w == 1.0


def test_joint_selection_ablation(model, batch):
    sel = make_selector(per_source=False).select(model, batch)
    src = batch["source"]
    assert len(sel.indices) == 9
    assert {i for i, s in enumerate(src) if s.startswith("small")} <= set(sel.indices.tolist())


def test_random_method_needs_no_model_and_is_uniform_subset(batch):
    a = make_selector(method="random", seed=1)
    s1 = a.select(None, batch)
    assert len(s1.indices) == 9 and len(set(s1.indices.tolist())) == 9
    b = make_selector(method="random", seed=1)
    assert torch.equal(b.select(None, batch).indices, s1.indices)
    # uniform: every position is picked about half of the time
    counts = torch.zeros(17)
    for _ in range(400):
        counts[a.select(None, batch).indices] += 1
    assert counts.min() > 400 * 9 / 17 * 0.75 and counts.max() < 400 * 9 / 17 * 1.25


def test_model_state_untouched(batch):
    model = make_tiny("gpt2", lora=True)
    model.train()
    frozen = model.base_model.model.transformer.wte
    frozen.eval()  # a submodule in its own mode must keep it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_selector(feature="exact").select(model, batch)
    make_selector(feature="zo").select(model, batch)
    assert model.training and not frozen.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None


def test_bad_batches_are_clear_errors(model, batch):
    sel = make_selector()
    bad = dict(batch, source=["nope"] + batch["source"][1:])
    with pytest.raises(ValueError, match=r"sources \['nope'\] that are not in source_counts"):
        sel.select(model, bad)
    with pytest.raises(KeyError, match="no 'source' entry"):
        sel.select(model, {k: v for k, v in batch.items() if k != "source"})
    with pytest.raises(ValueError, match="larger than the source batch"):
        make_selector(size=40).select(model, batch)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"ratio": 0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"feature": "fo"}, "feature"),
        ({"metric": "l3"}, "metric"),
        ({"topk_dims": 0}, "topk_dims"),
        ({"method": "x"}, "method"),
        ({"num_directions": 0}, "num_directions"),
        ({"eps": -1.0}, "eps"),
        ({"small_sources": "all"}, "small_sources"),
        ({"weights": "w"}, "weights"),
    ],
)
def test_config_validation_names_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"SelectorConfig\.{key}="):
        SelectorConfig(**kw)


def test_replay_check_catches_an_unreproduced_head(batch):
    model = make_tiny("llama", lora=True)
    model.config.final_logit_softcapping = 0.01  # Llama ignores it; the replay would not
    sel = CoresetSelector(SelectorConfig(method="colm"), COUNTS)
    with pytest.raises(ReplayMismatchError, match="does not reproduce"):
        sel.select(model, batch)


def test_nonfinite_loss_example_is_excluded_and_moments_stay_finite(batch):
    model = make_tiny("llama", lora=True)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())  # untie: poison the input only
    with torch.no_grad():
        emb.weight[96] = float("nan")  # a poisoned token, used by one big-source example only
    src = batch["source"]
    victim = next(i for i, s in enumerate(src) if s == "big1")
    poisoned = dict(batch, input_ids=batch["input_ids"].clone())
    poisoned["input_ids"][poisoned["input_ids"] == 96] = 95
    poisoned["input_ids"][victim, 0] = 96
    sel = make_selector()
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        first = sel.select(model, poisoned)
    assert first.stats["nonfinite"] == 1
    assert victim not in first.indices.tolist()
    assert torch.isfinite(sel.normalizer.m).all() and torch.isfinite(sel.normalizer.v).all()
    second = sel.select(model, poisoned)  # warned once only; still excluded
    assert victim not in second.indices.tolist()


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"),
    ],
)
@pytest.mark.parametrize("feature", ["zo", "exact"])
def test_out_of_memory_in_selection_names_the_setting(model, batch, monkeypatch, error, feature):
    from colm import SelectionOutOfMemoryError

    def boom(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(GradientFeatures, "compute", boom)
    sel = CoresetSelector(
        SelectorConfig(method="colm", ratio=0.5, feature=feature, chunk_size=3), COUNTS
    )
    with pytest.raises(SelectionOutOfMemoryError, match=r"lower the selector's chunk_size \(now 3"):
        sel.select(model, batch)
    if feature == "exact":
        with pytest.raises(SelectionOutOfMemoryError, match="feature='zo'"):
            sel.select(model, batch)


def test_other_runtime_errors_in_selection_are_not_called_out_of_memory(model, batch, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(GradientFeatures, "compute", boom)
    sel = CoresetSelector(SelectorConfig(method="colm", ratio=0.5), COUNTS)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sel.select(model, batch)
