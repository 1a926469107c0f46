"""Conditions: the thresholds a CI gate can hold a check's result to, each defined once, beside its check.

A check produces a result (checks/findings.CheckResult); a Condition reads one number from that
result and judges it against a limit (the deepchecks pattern). Each check module declares its
``CONDITIONS``; checks/gate.py collects them and evaluates the ones a gate file switches on.

A condition's reader returns ``Measured``: the value, or why there is none. Every condition a gate switches on
ends in one state: ``pass``, ``fail``, ``not-applicable`` (its ``applies`` says why: e.g. no intent was stated, so
nothing can be unintended; a gate that lists it under ``required`` makes it apply whatever the inputs),
``not-measured`` (it applies but has no value: fails, with the reason, unless the gate marks it optional) or
``non-finite`` (NaN or infinite: a failed measurement, never "not measured" and never 0). JSON has no NaN, so a
check's ``to_dict()`` records where its data held one (``nonfinite``: path -> "nan" / "inf" / "-inf") and
``value_at`` restores it for the readers: a NaN fails the gate through the same path a results.json takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Measured:
    """What a condition read: ``value`` (None when it could not be measured) and ``reason`` when it could not."""

    value: Any = None
    reason: str | None = None


@dataclass(frozen=True)
class Condition:
    """One gate threshold: ``name`` (the gate key), the check it reads, how it compares, its default limit."""

    name: str
    check: str
    op: str  # "<=", ">=", "subset" (value must contain every listed item), "none" (value must be 0 when switched on)
    default: Any  # None / () / False: off unless a gate file switches it on
    text: str  # what is measured, for people
    read: Callable[[dict], Measured]  # the check's result dict (CheckResult.to_dict()) -> Measured
    applies: Callable[[dict], str | None] | None = None  # the check's result dict -> why the condition does not apply (None: it applies)

    def judge(self, result: dict | None, limit: Any, required: bool = False) -> dict:
        """This condition against ``limit`` on the check's result dict; a gate row (see checks/gate.py).

        ``required``: the gate says it applies whatever the inputs (then "does not apply" reads as "not measured").
        """
        row = {"name": self.name, "check": self.check, "limit": limit, "op": self.op, "value": None, "required": required}
        if result is None:
            return {**row, "state": "not-measured", "passed": False, "message": f"{self.text}: not measured ({self.check} check did not run)"}
        why_not = self.applies(result) if self.applies is not None else None
        if why_not and not required:
            return {**row, "state": "not-applicable", "passed": None, "reason": why_not, "message": f"{self.text}: not applicable: {why_not}"}
        m = self.read(result)
        v = m.value
        if v is None:
            return {**row, "state": "not-measured", "passed": False, "message": f"{self.text}: not measurable: {m.reason or 'no value'}"}
        if isinstance(v, float) and not math.isfinite(v):
            return {**row, "state": "non-finite", "passed": False, "message": f"{self.text}: {v} (not a finite number: the measurement broke)"}
        if self.op == "subset":
            missing = [t for t in limit if t not in v]
            ok = not missing
            msg = f"{self.text}: every required one modified" if ok else f"{self.text}: not modified: {', '.join(missing)}"
        elif self.op == "none":
            ok = v == 0
            msg = f"{self.text}: none" if ok else f"{self.text}: {v}"
        else:
            ok = v <= limit if self.op == "<=" else v >= limit
            msg = f"{self.text}: {v:.4g} {self.op} {limit:g}" if ok else f"{self.text}: {v:.4g}, limit {self.op} {limit:g}"
        return {**row, "value": v, "state": "pass" if ok else "fail", "passed": bool(ok), "message": msg}


def finite(x) -> Any:
    """``x`` as a float, keeping NaN/Inf (a result dict may hold the strings JSON gives them)."""
    if isinstance(x, str) and x.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(x)
    return x


def value_at(result: dict, *path) -> Any:
    """The value at ``path`` (keys) in a check's result dict, with the NaN/Inf its ``to_dict()`` recorded restored."""
    state = (result.get("nonfinite") or {}).get(".".join(map(str, path)))
    if state is not None:
        return float(state)
    x: Any = result
    for p in path:
        x = x.get(p) if isinstance(x, dict) else None
    return finite(x)
