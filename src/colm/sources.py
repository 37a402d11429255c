"""Source statistics: which sources are small, and how to split a budget.

CoLM keeps every source-batch example of a *small* source (a source whose size
in the whole training set is small) and selects medoids only for the big ones.
The slots left for big sources are split across them in proportion to how many
of their examples are in the source batch.

All arithmetic here is on integers and :class:`fractions.Fraction`, so results
never depend on float rounding and are the same on every rank and machine.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from fractions import Fraction

__all__ = ["SmallSourceRule", "allocate_budget", "find_small_sources"]

#: ``"below_mean"``, a number ``c > 0`` (small when ``count < total / c``), or
#: an explicit collection of source names.
SmallSourceRule = str | float | int | Iterable[str]

_RULE_HELP = (
    "use 'below_mean' (count below the mean source size), a number c > 0 "
    "(count below total / c), or a list of source names"
)


def _validate_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Return ``counts`` as a plain dict of ``str -> int``, or raise a helpful error."""
    if not isinstance(counts, Mapping):
        raise TypeError(
            f"counts must be a mapping of source name -> number of examples, "
            f"got {type(counts).__name__}; e.g. {{'gsm8k': 7473, 'aqua': 97467}}"
        )
    if len(counts) == 0:
        raise ValueError(
            "counts is empty; pass at least one source, e.g. {'gsm8k': 7473, 'aqua': 97467}"
        )
    out: dict[str, int] = {}
    for name, count in counts.items():
        if not isinstance(name, str):
            raise TypeError(
                f"source names must be strings, got {name!r} ({type(name).__name__}); "
                f"convert the keys with str()"
            )
        # bool is an Integral but a count of True is almost certainly a bug.
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise ValueError(
                f"source {name!r} has count {count!r} ({type(count).__name__}); "
                f"counts must be non-negative integers (numbers of examples)"
            )
        if count < 0:
            raise ValueError(
                f"source {name!r} has a negative count ({count}); "
                f"counts must be non-negative numbers of examples"
            )
        out[name] = int(count)
    return out


def find_small_sources(counts: Mapping[str, int], rule: SmallSourceRule = "below_mean") -> set[str]:
    """Return the names of the *small* sources, whose examples CoLM keeps whole.

    Args:
        counts: source name -> number of examples of that source in the whole
            training set (not in one batch).
        rule: how to decide which sources are small:

            * ``"below_mean"`` (the paper's rule): ``count < mean count``.
            * a number ``c > 0``: ``count < total / c``, where ``total`` is the
              sum of all counts. ``c == len(counts)`` is the same as
              ``"below_mean"``.
            * an explicit list/tuple/set of source names: exactly those sources
              (every name must be a key of ``counts``).

    Returns:
        The set of small source names (possibly empty).

    Raises:
        ValueError: invalid counts, an unknown rule string, a non-positive or
            non-finite number, or names that are not in ``counts``.
        TypeError: a rule of an unsupported type (e.g. ``None`` or ``True``).
    """
    counts = _validate_counts(counts)
    total = sum(counts.values())

    if isinstance(rule, str):
        if rule != "below_mean":
            raise ValueError(f"unknown small-source rule {rule!r}; {_RULE_HELP}")
        n = len(counts)
        # count < total / n, multiplied through by n to stay in integers.
        return {name for name, c in counts.items() if c * n < total}

    if isinstance(rule, bool):
        raise TypeError(f"small-source rule must not be a bool (got {rule!r}); {_RULE_HELP}")

    if isinstance(rule, numbers.Real):
        if not math.isfinite(rule) or rule <= 0:
            raise ValueError(
                f"small-source rule c={rule!r} must be a finite number > 0 "
                f"(a source is small when count < total / c)"
            )
        # Fraction(float) is exact, so the comparison has no rounding error
        # (float() first: Fraction rejects e.g. numpy.float32).
        c = Fraction(rule) if isinstance(rule, numbers.Rational) else Fraction(float(rule))
        return {name for name, n_ex in counts.items() if n_ex * c < total}

    if isinstance(rule, (bytes, bytearray, Mapping)) or not isinstance(rule, Iterable):
        raise TypeError(
            f"small-source rule of type {type(rule).__name__} is not supported; {_RULE_HELP}"
        )

    names = list(rule)
    bad_types = [name for name in names if not isinstance(name, str)]
    if bad_types:
        raise TypeError(f"small-source names must be strings, got {bad_types!r}")
    unknown = sorted(set(names) - counts.keys())
    if unknown:
        raise ValueError(f"unknown small source(s) {unknown}; known sources are {sorted(counts)}")
    return set(names)


def allocate_budget(counts: Mapping[str, int], budget: int) -> dict[str, int]:
    """Split ``budget`` slots across sources in proportion to ``counts``.

    Uses largest-remainder (Hamilton) rounding: every source first gets the
    floor of its exact quota ``min(budget, total) * count / total``, and the
    slots left over go one each to the sources with the largest remainders,
    ties broken by source name in ascending order. The result therefore does
    not depend on the order of ``counts``.

    Args:
        counts: source name -> number of examples available (e.g. how many of
            the source batch's examples come from that source).
        budget: number of slots to fill, ``>= 0``.

    Returns:
        source name -> number of slots, with every key of ``counts`` present
        (in the same order), each value ``<= counts[name]`` and within one of
        the exact quota, and the values summing to ``min(budget, sum(counts))``.

    Raises:
        ValueError: invalid counts, or a negative or non-integer budget.
    """
    counts = _validate_counts(counts)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")

    total = sum(counts.values())
    target = min(int(budget), total)
    if target == 0:
        return dict.fromkeys(counts, 0)

    # quota = target * count / total = floor + rem / total, all in integers.
    floors: dict[str, int] = {}
    rems: dict[str, int] = {}
    for name, count in counts.items():
        floors[name], rems[name] = divmod(target * count, total)

    left = target - sum(floors.values())
    # A source with rem > 0 has floor < quota <= count, so floor + 1 <= count;
    # and more than `left` sources have rem > 0, so only those get a slot.
    order = sorted(counts, key=lambda name: (-rems[name], name))
    for name in order[:left]:
        floors[name] += 1
    return floors
