"""Result types every check returns: Findings inside a CheckResult, JSON-serializable.

A Finding is one measured fact with its threshold and where it holds (layers, experts); a
CheckResult groups a check's findings with the plain data the report draws (matrices, curves).
Diagnosis (checks/diagnose.py) reads findings by ``code``; the report only renders.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

PASS, WARN, FAIL, SKIP, INFO = "pass", "warn", "fail", "skip", "info"
SEVERITY_ORDER = {INFO: 0, PASS: 0, SKIP: 0, WARN: 1, FAIL: 2}


@dataclass
class Finding:
    """One measured fact. ``code`` is stable (diagnosis keys on it); ``message`` is for people."""

    code: str  # e.g. "intended-untouched", "writer-left", "refusal-rate"
    severity: str  # info / warn / fail
    message: str
    value: float | None = None  # the number measured
    threshold: float | None = None  # what it was judged against
    layers: list[int] = field(default_factory=list)
    experts: list[list[int]] = field(default_factory=list)  # [layer, expert] pairs
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = jsonable(asdict(self))
        if isinstance(self.value, float) and not math.isfinite(self.value):  # JSON has no NaN: say it, never pass it off as "not measured"
            d["value_state"] = "nan" if math.isnan(self.value) else "inf" if self.value > 0 else "-inf"
        return d


@dataclass
class CheckResult:
    """A check's verdict, findings and data for the report."""

    name: str  # weights / projection / recovery / refusal / damage / routing / contribution / ...
    status: str  # pass / warn / fail / skip
    summary: str
    findings: list[Finding] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # matrices (lists of lists), curves, tables
    seconds: float | None = None

    def to_dict(self) -> dict:
        """JSON types; a NaN/Inf in ``data`` becomes null there and its path ("data.after.rate") is listed under
        ``nonfinite`` with what it was, so the gate reads a failed measurement, never "not measured" (checks/conditions.py)."""
        d = jsonable({"name": self.name, "status": self.status, "summary": self.summary,
                      "findings": [f.to_dict() for f in self.findings], "data": self.data, "seconds": self.seconds})
        bad = nonfinite_paths(self.data, "data")
        if bad:
            d["nonfinite"] = bad
        return d

    def worst(self) -> str:
        return max((f.severity for f in self.findings), key=lambda s: SEVERITY_ORDER[s], default=PASS)


MAX_NONFINITE_PATHS = 200  # enough to name every scalar a condition reads; long per-prompt lists are cut


def nonfinite_paths(x: Any, path: str, out: dict | None = None) -> dict[str, str]:
    """Dotted path -> "nan" / "inf" / "-inf" for every non-finite float under ``x`` (tensors and arrays included)."""
    out = {} if out is None else out
    if len(out) >= MAX_NONFINITE_PATHS:
        return out
    if isinstance(x, dict):
        for k, v in x.items():
            nonfinite_paths(v, f"{path}.{k}", out)
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            nonfinite_paths(v, f"{path}.{i}", out)
    elif hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        nonfinite_paths(x.tolist(), path, out)
    elif isinstance(x, float) and not math.isfinite(x):
        out[path] = "nan" if math.isnan(x) else "inf" if x > 0 else "-inf"
    return out


def jsonable(x: Any, digits: int | None = None) -> Any:
    """Plain JSON types: results' ``to_dict``, tensors/arrays to lists, NaN/Inf to None, tuples to lists, dict keys to str.

    The one serializer of results: with ``digits``, floats are rounded to that many significant digits (results.json:
    two runs that measured the same thing write the same bytes) and -0.0 becomes 0.0.
    """
    if hasattr(x, "to_dict") and callable(x.to_dict):  # CheckResult, Finding, Cause
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, digits) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return jsonable(x.tolist(), digits)
    if isinstance(x, float):
        if not math.isfinite(x):
            return None
        if digits is None:
            return x
        r = float(f"{x:.{digits}g}")
        return 0.0 if r == 0 else r
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if hasattr(x, "item"):
        return jsonable(x.item(), digits)
    return str(x)


def ranges(xs) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (None and non-integers dropped): how layers and experts are written for people."""
    xs = sorted({x for x in xs if isinstance(x, int) and not isinstance(x, bool)})
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}-{xs[j]}" if j > i else str(xs[i]))
        i = j + 1
    return ", ".join(out)

