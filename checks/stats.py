"""Small-sample statistics for refusal rates: Wilson intervals and the exact McNemar test.

Refusal evaluations use tens to hundreds of prompts, so normal-approximation intervals and
chi-square tests mislead; these are the exact / well-behaved versions.
"""

from __future__ import annotations

import math

from scipy.stats import binomtest, norm


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """(p, lo, hi): the proportion k/n and its Wilson score interval (95 % for z=1.96, scipy's); n=0 gives NaNs."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan, math.nan
    ci = binomtest(k, n).proportion_ci(confidence_level=2 * norm.cdf(z) - 1, method="wilson")
    return k / n, max(0.0, float(ci.low)), min(1.0, float(ci.high))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts b (yes->no) and c (no->yes)."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def rate_summary(flags: list[bool | None], z: float = 1.96) -> dict:
    """Rate of True among the decided flags (None = unknown, left out of n), with its Wilson interval."""
    decided = [f for f in flags if f is not None]
    k, n = sum(1 for f in decided if f), len(decided)
    p, lo, hi = wilson(k, n, z)
    return {"k": k, "n": n, "unknown": len(flags) - n, "rate": p, "lo": lo, "hi": hi}


def paired_change(before: list[bool | None], after: list[bool | None]) -> dict:
    """McNemar on prompts judged both times: b = refused before only, c = refused after only."""
    if len(before) != len(after):
        raise ValueError(f"paired_change: {len(before)} judgements before but {len(after)} after")
    pairs = [(x, y) for x, y in zip(before, after) if x is not None and y is not None]
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if y and not x)
    return {"n_pairs": len(pairs), "b": b, "c": c, "p": mcnemar_exact(b, c)}


def paired_difference_interval(both: int, first_only: int, second_only: int, neither: int, z: float = 1.96) -> tuple[float, float, float]:
    """(d, lo, hi): d = p1 - p2 for paired binary outcomes and Newcombe's hybrid score interval (method 10, 1998).

    ``first_only``: pairs a success in the first condition only (e.g. an item answered right before ablation, wrong after).
    Built from the Wilson intervals of both marginal proportions and their correlation (with Newcombe's correction: a
    positive ad - bc is lowered by n/2), so it stays inside [-1, 1] and behaves at 0 and 1 where the Wald interval does
    not; n = 0 gives NaNs.
    """
    a, b, c, d_ = both, first_only, second_only, neither
    n = a + b + c + d_
    if min(a, b, c, d_) < 0:
        raise ValueError(f"paired_difference_interval: counts must be >= 0, got {(a, b, c, d_)}")
    if n == 0:
        return math.nan, math.nan, math.nan
    p1, l1, u1 = wilson(a + b, n, z)
    p2, l2, u2 = wilson(a + c, n, z)
    denom = (a + b) * (c + d_) * (a + c) * (b + d_)
    cross = a * d_ - b * c
    cross = max(0.0, cross - n / 2) if cross > 0 else cross
    phi = cross / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return diff, max(-1.0, diff - dl), min(1.0, diff + du)
