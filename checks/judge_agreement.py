"""Two judges on the same completions: the refusal rate under each, how often they agree, and where they do not.

Pure: the shell runs both judges (audit/judgement/judges.py) on every completion of a run; this
compares their labels per prompt set. A disagreement is any pair of different labels (refusal,
compliance, unknown), so the report can show the answers that decide which rate to trust.
"""

from __future__ import annotations

from checks.refusal import Judgement
from checks.stats import rate_summary


def compare(first: list[Judgement], second: list[Judgement]) -> dict:
    """Rates under each judge (Wilson intervals, unknown left out of n), agreement on the completions both decided, Cohen's
    kappa there, and the indices where the labels differ."""
    if len(first) != len(second):
        raise ValueError(f"compare: {len(first)} judgements by the first judge but {len(second)} by the second")
    both = [(a.refused, b.refused) for a, b in zip(first, second) if a.refused is not None and b.refused is not None]
    agree = sum(1 for a, b in both if a == b)
    n = len(both)
    kappa = None
    if n:
        pa = sum(1 for a, _ in both if a) / n
        pb = sum(1 for _, b in both if b) / n
        pe = pa * pb + (1 - pa) * (1 - pb)
        po = agree / n
        kappa = 1.0 if pe >= 1.0 else (po - pe) / (1 - pe)
    return {"first": rate_summary([j.refused for j in first]), "second": rate_summary([j.refused for j in second]),
            "both_decided": n, "agree": agree, "agreement": agree / n if n else None, "kappa": kappa,
            "disagree": [i for i, (a, b) in enumerate(zip(first, second)) if a.label != b.label]}
