"""Tests for colm.sources: small-source rules and the proportional budget split."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colm.sources import allocate_budget, find_small_sources

NAMES = st.text(alphabet="abcdexyz", min_size=1, max_size=3)
COUNTS = st.dictionaries(NAMES, st.integers(0, 60), min_size=1, max_size=8)
POSITIVE_COUNTS = st.dictionaries(NAMES, st.integers(1, 60), min_size=1, max_size=8)


# --------------------------------------------------------------------------- allocate_budget


def _quota(counts: dict[str, int], budget: int, name: str) -> Fraction:
    total = sum(counts.values())
    return Fraction(min(budget, total) * counts[name], total) if total else Fraction(0)


@settings(deadline=None, max_examples=300)
@given(counts=COUNTS, budget=st.integers(0, 400))
def test_allocate_budget_invariants(counts: dict[str, int], budget: int) -> None:
    alloc = allocate_budget(counts, budget)
    assert list(alloc) == list(counts)  # every key, in the caller's order
    assert sum(alloc.values()) == min(budget, sum(counts.values()))
    for name, slots in alloc.items():
        assert isinstance(slots, int)
        assert 0 <= slots <= counts[name]
        q = _quota(counts, budget, name)
        assert math.floor(q) <= slots <= math.ceil(q)


@settings(deadline=None, max_examples=300)
@given(counts=COUNTS, budget=st.integers(0, 400))
def test_allocate_budget_is_largest_remainder_with_name_ties(
    counts: dict[str, int], budget: int
) -> None:
    alloc = allocate_budget(counts, budget)
    rounded_up = [n for n in counts if alloc[n] > math.floor(_quota(counts, budget, n))]
    passed_over = [
        n
        for n in counts
        if alloc[n] == math.floor(_quota(counts, budget, n)) and _quota(counts, budget, n) % 1 != 0
    ]
    for up in rounded_up:
        r_up = _quota(counts, budget, up) % 1
        for down in passed_over:
            r_down = _quota(counts, budget, down) % 1
            assert r_up > r_down or (r_up == r_down and up < down), (up, down)


@settings(deadline=None, max_examples=200)
@given(data=st.data(), counts=COUNTS, budget=st.integers(0, 400))
def test_allocate_budget_ignores_insertion_order(
    data: st.DataObject, counts: dict[str, int], budget: int
) -> None:
    order = data.draw(st.permutations(list(counts)))
    shuffled = {name: counts[name] for name in order}
    assert allocate_budget(shuffled, budget) == allocate_budget(counts, budget)
    assert allocate_budget(counts, budget) == allocate_budget(counts, budget)


@pytest.mark.parametrize(
    ("counts", "budget", "expected"),
    [
        ({"x": 10, "y": 30}, 8, {"x": 2, "y": 6}),
        # three-way exact tie: the spare slots go to names in ascending order
        ({"c": 1, "b": 1, "a": 1}, 2, {"c": 0, "b": 1, "a": 1}),
        ({"a": 1, "b": 2}, 1, {"a": 0, "b": 1}),
        # quotas 1.0, 1.5, 3.5: "big" and "mid" tie at .5 and "big" < "mid" by name
        ({"small": 2, "mid": 3, "big": 7}, 6, {"small": 1, "mid": 1, "big": 4}),
        ({"a": 3, "b": 4}, 100, {"a": 3, "b": 4}),  # budget above total
        ({"a": 3, "b": 4}, 0, {"a": 0, "b": 0}),
        ({"a": 0, "b": 0}, 5, {"a": 0, "b": 0}),
        ({"empty": 0, "full": 9}, 4, {"empty": 0, "full": 4}),
    ],
)
def test_allocate_budget_examples(
    counts: dict[str, int], budget: int, expected: dict[str, int]
) -> None:
    assert allocate_budget(counts, budget) == expected


def test_allocate_budget_uses_exact_arithmetic() -> None:
    # Both quotas are 0.5 in float64 ((2**60 +- 1) / 2**61 rounds to 0.5), so a
    # float implementation would fall back to the name tie-break and pick "a".
    # Exactly, "b" has the larger remainder.
    counts = {"a": 2**60 - 1, "b": 2**60 + 1}
    assert (2**60 - 1) / 2**61 == (2**60 + 1) / 2**61 == 0.5
    assert allocate_budget(counts, 1) == {"a": 0, "b": 1}


@pytest.mark.parametrize(
    ("counts", "budget", "error", "match"),
    [
        ({"a": 1}, -1, ValueError, "budget must be >= 0"),
        ({"a": 1}, 2.5, ValueError, "non-negative integer"),
        ({"a": 1}, True, ValueError, "non-negative integer"),
        ({}, 1, ValueError, "counts is empty"),
        ({"a": -2}, 1, ValueError, "source 'a' has a negative count"),
        ({"a": 1.5}, 1, ValueError, "source 'a' has count 1.5"),
        ({"a": True}, 1, ValueError, "non-negative integers"),
        ({3: 1}, 1, TypeError, "source names must be strings"),
        ([("a", 1)], 1, TypeError, "counts must be a mapping"),
    ],
)
def test_allocate_budget_errors(counts, budget, error, match) -> None:
    with pytest.raises(error, match=match):
        allocate_budget(counts, budget)


# --------------------------------------------------------------------------- find_small_sources


def test_below_mean_is_default_and_strict() -> None:
    counts = {"a": 10, "b": 20, "c": 90}  # mean 40
    assert find_small_sources(counts) == {"a", "b"}
    assert find_small_sources(counts, "below_mean") == {"a", "b"}
    assert find_small_sources({"a": 10, "b": 30}) == {"a"}  # mean 20
    assert find_small_sources({"a": 20, "b": 20}) == set()  # equal to the mean is not small
    assert find_small_sources({"only": 5}) == set()
    assert find_small_sources({"a": 0, "b": 0}) == set()


def test_below_mean_mathinstruct_like_mixture() -> None:
    # 4 big sources and 10 small ones, as in the paper's MathInstruct split.
    counts = {f"big{i}": 50_000 for i in range(4)} | {f"small{i}": 6_000 for i in range(10)}
    assert find_small_sources(counts) == {f"small{i}" for i in range(10)}


@pytest.mark.parametrize(
    ("c", "expected"),
    [(2, {"a", "b"}), (2.0, {"a", "b"}), (8, {"a"}), (0.5, {"a", "b", "c"}), (100, set())],
)
def test_fraction_rule(c: float, expected: set[str]) -> None:
    counts = {"a": 10, "b": 20, "c": 90}  # total 120
    assert find_small_sources(counts, c) == expected


def test_fraction_rule_is_strict() -> None:
    assert find_small_sources({"a": 30, "b": 90}, 4) == set()  # 30 == 120 / 4


@settings(deadline=None, max_examples=200)
@given(counts=COUNTS)
def test_fraction_rule_with_c_equal_to_number_of_sources_is_below_mean(
    counts: dict[str, int],
) -> None:
    assert find_small_sources(counts, len(counts)) == find_small_sources(counts, "below_mean")


@settings(deadline=None, max_examples=200)
@given(counts=POSITIVE_COUNTS, c=st.floats(0.1, 20))
def test_small_sources_are_a_prefix_by_size(counts: dict[str, int], c: float) -> None:
    for rule in ("below_mean", c):
        small = find_small_sources(counts, rule)
        for s in small:
            assert all(t in small for t in counts if counts[t] <= counts[s])


@pytest.mark.parametrize("names", [["a", "c"], ("a", "c"), {"a", "c"}, frozenset({"a", "c"})])
def test_explicit_names(names) -> None:
    counts = {"a": 10, "b": 20, "c": 90}
    assert find_small_sources(counts, names) == {"a", "c"}


def test_explicit_names_from_generator_and_empty_list() -> None:
    counts = {"a": 10, "b": 20}
    assert find_small_sources(counts, (n for n in ["b"])) == {"b"}
    assert find_small_sources(counts, []) == set()


def test_unknown_names_are_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        find_small_sources({"gsm8k": 1, "aqua": 2}, ["gsm8k", "mathqa", "camel"])
    msg = str(info.value)
    assert "'camel'" in msg and "'mathqa'" in msg
    assert "'aqua'" in msg and "'gsm8k'" in msg  # the known sources are listed


def test_plain_string_rule_is_not_split_into_characters() -> None:
    # "ab" is not "below_mean"; iterating it would wrongly select sources "a", "b".
    with pytest.raises(ValueError, match="unknown small-source rule 'ab'"):
        find_small_sources({"a": 1, "b": 5}, "ab")


@pytest.mark.parametrize(
    ("rule", "error", "match"),
    [
        ("mean", ValueError, "unknown small-source rule"),
        (0, ValueError, "finite number > 0"),
        (-1.5, ValueError, "finite number > 0"),
        (float("nan"), ValueError, "finite number > 0"),
        (float("inf"), ValueError, "finite number > 0"),
        (None, TypeError, "not supported"),
        (True, TypeError, "bool"),
        ({"a": 1}, TypeError, "not supported"),
        (b"a", TypeError, "not supported"),
        (["a", 3], TypeError, "must be strings"),
    ],
)
def test_bad_rules(rule, error, match) -> None:
    with pytest.raises(error, match=match):
        find_small_sources({"a": 1, "b": 5}, rule)


def test_find_small_sources_validates_counts() -> None:
    with pytest.raises(ValueError, match="counts is empty"):
        find_small_sources({})
    with pytest.raises(ValueError, match="negative count"):
        find_small_sources({"a": -1, "b": 3})
