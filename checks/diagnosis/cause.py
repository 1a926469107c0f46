"""A cause: a stable id, the evidence that names it (each item citing the measurement it comes from), and its fixes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Where a cause's evidence may come from: a check of the run, what reached the weights, or the simulator's bypass test.
SOURCES = ("weights", "projection", "recovery", "routing", "contribution", "refusal", "damage", "reached", "directions", "bypass")


def cite(source: str, text: str) -> dict:
    """One item of evidence: what was measured, and by which measurement (one of SOURCES)."""
    if source not in SOURCES:
        raise ValueError(f"evidence source {source!r} is none of {SOURCES}")
    return {"source": source, "text": text}


@dataclass
class Cause:
    id: str
    confidence: float
    summary: str
    evidence: list[dict] = field(default_factory=list)  # cite(...) items; never empty on a cause the diagnosis emits
    numbers: dict = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    experts: list[list[int]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    fix: dict = field(default_factory=dict)  # {"summary", "patch": {...}, "candidates": [...]}; audit renders config_yaml
    explains_refusal: bool = True  # False for soundness problems (unintended edits, damage)
    simulated: dict | None = None
    search: list[dict] = field(default_factory=list)  # the candidates tried, in order, with what each gave
    applied: dict | None = None
    demoted: bool = False
    demoted_reason: str | None = None
    title: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confidence"] = round(self.confidence, 3)
        d["confidence_label"] = confidence_label(self.confidence)
        return d


def confidence_label(c: float) -> str:
    return "high" if c >= 0.67 else "medium" if c >= 0.34 else "low"


def pct(x) -> str:
    """A rate for people: '12%', or 'not measured' (never 'nan%')."""
    return "not measured" if x is None or x != x else f"{x:.0%}"
