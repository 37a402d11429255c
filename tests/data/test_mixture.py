"""The demo mixture: sizes, imbalance, determinism, held-out disjointness, format."""

from __future__ import annotations

import json

import pytest

from colm.data import load_records, source_counts
from colm.data.mixture import (
    ANSWER_PREFIX,
    MixtureSpec,
    SourceSpec,
    build_default_mixture,
    derive_seed,
)

SMALL_SPEC = MixtureSpec(
    train=[SourceSpec("chain_sum", 30), SourceSpec("gcd", 5), SourceSpec("gsm_symbolic", 8)],
    test_per_source=4,
    ood=[SourceSpec("products", 3, {"max_digits": 3})],
    seed=7,
)


@pytest.fixture(scope="module")
def mixture():
    return build_default_mixture()


def test_default_sizes_match_spec(mixture):
    spec = MixtureSpec()
    train, test_in, test_out = mixture
    assert source_counts(train) == {s.name: s.size for s in spec.train}
    assert source_counts(test_in) == {s.name: spec.test_per_source for s in spec.train}
    assert source_counts(test_out) == {s.name: s.size for s in spec.ood}
    assert 2000 <= len(train) <= 5000  # a CPU demo, not a benchmark


def test_default_is_imbalanced_like_mathinstruct(mixture):
    counts = source_counts(mixture.train)
    sizes = sorted(counts.values())
    assert sizes[-1] / sizes[0] >= 50
    mean = sum(sizes) / len(sizes)
    big = [s for s, n in counts.items() if n >= mean]
    small = [s for s, n in counts.items() if n < mean]
    # The paper's rule (below the mean size = small) splits it 4 big / 6 small.
    assert len(big) == 4 and len(small) == 6
    # Small sources are a minority a random batch of 128 easily misses.
    assert sum(counts[s] for s in small) / len(mixture.train) < 0.1


def test_build_is_deterministic(mixture):
    assert build_default_mixture(MixtureSpec()) == mixture


def test_seed_changes_the_data():
    a = build_default_mixture(SMALL_SPEC)
    b = build_default_mixture(MixtureSpec(**{**SMALL_SPEC.__dict__, "seed": 8}))
    assert [r["prompt"] for r in a.train] != [r["prompt"] for r in b.train]
    assert source_counts(a.train) == source_counts(b.train)


def test_adding_a_source_does_not_change_the_others():
    a = build_default_mixture(SMALL_SPEC)
    more = MixtureSpec(
        **{**SMALL_SPEC.__dict__, "train": [*SMALL_SPEC.train, SourceSpec("lcm", 3)]}
    )
    b = build_default_mixture(more)
    assert [r for r in b.train if r["source"] != "lcm"] == a.train


def test_held_out_is_disjoint_from_train(mixture):
    train, test_in, test_out = mixture
    train_ids = {r["entry_id"] for r in train}
    test_ids = [r["entry_id"] for r in test_in + test_out]
    assert len(set(test_ids)) == len(test_ids)
    assert not train_ids & set(test_ids)
    # Same question text never appears in train and test (chain_sum repeats questions).
    train_prompts = {r["prompt"] for r in train}
    assert not train_prompts & {r["prompt"] for r in test_in}
    assert len({r["prompt"] for r in test_in}) == len(test_in)
    # reasoning-gym seeds item idx with seed + idx: the seed ranges must not overlap.
    for source in {r["source"] for r in train}:
        tr = {r["task_seed"] + r["task_index"] for r in train if r["source"] == source}
        te = {r["task_seed"] + r["task_index"] for r in test_in if r["source"] == source}
        assert te and not tr & te, source


def test_ood_generators_are_not_trained_on(mixture):
    train_tasks = {r["task"] for r in mixture.train}
    ood_tasks = {r["task"] for r in mixture.test_out}
    assert len(ood_tasks) >= 3
    assert not train_tasks & ood_tasks


def test_record_format(mixture):
    for split, records in zip(("train", "test_in", "test_out"), mixture):
        for r in records:
            assert r["split"] == split
            assert r["source"] == r["task"]
            assert r["prompt"] and r["prompt"] == r["prompt"].strip()
            *solution, last = r["completion"].split("\n")
            assert last == ANSWER_PREFIX + r["answer"]
            assert "####" not in r["completion"]
            json.loads(r["task_config"])
    gsm = [r for r in mixture.train if r["source"] == "gsm_symbolic"]
    # gsm_symbolic ships worked solutions: they precede the answer line.
    assert all(r["completion"].count("\n") >= 1 for r in gsm)
    others = [r for r in mixture.train if r["source"] != "gsm_symbolic"]
    assert all(r["completion"] == ANSWER_PREFIX + r["answer"] for r in others)


def test_records_survive_json_and_arrow(mixture):
    import datasets

    sample = mixture.train[::50] + mixture.test_out[:5]
    assert json.loads(json.dumps(sample)) == sample
    ds = datasets.Dataset.from_list(sample)
    assert ds.to_list() == sample
    loaded = load_records(ds)
    assert [(r["source"], r["prompt"], r["completion"]) for r in loaded] == [
        (r["source"], r["prompt"], r["completion"]) for r in sample
    ]


def test_generator_config_is_applied_and_stored():
    _, _, test_out = build_default_mixture(SMALL_SPEC)
    assert all(json.loads(r["task_config"]) == {"max_digits": 3} for r in test_out)
    for r in test_out:
        # "Solve the following multiplication: 967 * 921. Give only ..."
        a, b = (int(x) for x in r["prompt"].split(":")[1].split(".")[0].split("*"))
        assert a < 1000 and b < 1000


def test_derive_seed_is_stable():
    # Pinned: changing it silently changes every mixture.
    assert derive_seed(0, "gcd") == derive_seed(0, "gcd")
    assert derive_seed(0, "gcd") != derive_seed(1, "gcd")
    assert derive_seed(0, "gcd") != derive_seed(0, "lcm")
    assert 0 <= derive_seed(123, "chain_sum") < 2**31


def test_spec_dict_round_trip():
    spec = MixtureSpec.from_dict(
        {"train": {"gcd": 10, "lcm": 5}, "ood": [{"name": "products", "size": 2}], "seed": 3}
    )
    assert [(s.name, s.size) for s in spec.train] == [("gcd", 10), ("lcm", 5)]
    assert MixtureSpec.from_dict(spec.to_dict()) == spec
    assert MixtureSpec.from_dict({}) == MixtureSpec()


@pytest.mark.parametrize(
    "spec, match",
    [
        (MixtureSpec(train=[SourceSpec("no_such_generator", 5)], ood=[]), "not a reasoning-gym"),
        (MixtureSpec(train=[SourceSpec("gcd", 0)], ood=[]), "size 0"),
        (MixtureSpec(train=[SourceSpec("gcd", 3), SourceSpec("gcd", 4)], ood=[]), "more than once"),
        (MixtureSpec(train=[SourceSpec("gcd", 3)], ood=[SourceSpec("gcd", 3)]), "out-of-domain"),
        (MixtureSpec(train=[], ood=[]), "no training sources"),
        (MixtureSpec(train=[SourceSpec("gcd", 3, {"seed": 1})], ood=[]), r"config sets \['seed'\]"),
        (MixtureSpec(train=[SourceSpec("gcd", 3, {"nope": 1})], ood=[]), "rejects config"),
        (MixtureSpec(train=[SourceSpec("gcd", 3, {"min_value": -5})], ood=[]), "rejects config"),
    ],
)
def test_bad_specs_are_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        build_default_mixture(spec)


def test_unknown_spec_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown mixture keys"):
        MixtureSpec.from_dict({"trian": {"gcd": 3}})


def test_too_few_distinct_held_out_questions_is_an_error():
    # count_bits with numbers in [1, 2] has two distinct questions.
    spec = MixtureSpec(
        train=[SourceSpec("gcd", 3)],
        test_per_source=0,
        ood=[SourceSpec("count_bits", 5, {"min_n": 1, "max_n": 2})],
    )
    with pytest.raises(ValueError, match="distinct held-out questions"):
        build_default_mixture(spec)
