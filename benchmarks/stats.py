"""Statistics shared by the benchmarks: paired differences with a 95% confidence
interval, and the one-sided sign test against chance."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def paired_ci(diffs: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean of paired differences with a two-sided t confidence interval.

    ``lower`` counts the pairs with a negative difference. With one pair there is no
    interval (``lo``/``hi`` are None)."""
    from scipy import stats

    d = [float(x) for x in diffs if x is not None and math.isfinite(x)]
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None, "sd": None, "lower": 0}
    mean = statistics.fmean(d)
    out: dict[str, float | int | None] = {"n": n, "mean": mean, "lower": sum(x < 0 for x in d)}
    if n < 2:
        return {**out, "lo": None, "hi": None, "sd": None}
    sd = statistics.stdev(d)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {**out, "lo": mean - half, "hi": mean + half, "sd": sd}


def excludes_zero(ci: dict) -> bool:
    """Whether a paired interval lies wholly on one side of zero."""
    lo, hi = ci.get("lo"), ci.get("hi")
    return lo is not None and hi is not None and (hi < 0 or lo > 0)


def sign_test_below(values: Sequence[float], chance: float = 50.0) -> dict[str, float | int]:
    """One-sided sign test that ``values`` (percentiles: lower is better) lie below
    ``chance`` more often than a coin would put them there. Ties with chance are
    dropped, as the sign test does."""
    from scipy import stats

    below = sum(v < chance for v in values)
    above = sum(v > chance for v in values)
    n = below + above
    p = stats.binomtest(below, n, 0.5, alternative="greater").pvalue if n else 1.0
    return {"n": len(values), "below": below, "above": above, "p": float(p)}


def fmt_ci(ci: dict, digits: int = 3) -> str:
    """``-0.012 [-0.020, -0.004] (5/5 lower)`` (no interval for one pair)."""
    if not ci or ci.get("mean") is None:
        return "-"
    text = f"{ci['mean']:+.{digits}f}"
    if ci.get("lo") is not None:
        text += f" [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}]"
    return text + f" ({ci['lower']}/{ci['n']} lower)"
