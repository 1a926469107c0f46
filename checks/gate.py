"""The CI gate: the conditions a gate file switches on, judged against a run's results. Fails closed.

Pure: takes the thresholds as a dict and the results as a dict; audit/ reads the files. Every
threshold is a Condition defined beside its check (``CONDITIONS`` in checks/refusal_eval.py,
checks/weights.py, checks/contribution.py, checks/capability.py); this module only collects and evaluates them.

Every switched-on condition ends passed, failed, not applicable (with why) or not measured (with why):
- a condition that does not apply to these inputs says why and neither passes nor fails (``forbid_unintended``
  without a stated intent); a gate that lists it under ``required`` makes it apply whatever the inputs, and then
  it fails closed when it cannot be measured;
- a condition that applies but whose number could not be measured fails, with the reason, unless the gate lists
  it under ``optional`` (then it is reported as skipped);
- a NaN or infinite value is its own state ("non-finite") and fails, optional or not;
- a check whose status is ``fail`` fails the gate unless the gate lists it under ``waive``.
"""

from __future__ import annotations

from checks import capability, contribution, refusal_eval, weights
from checks.errors import AuditError
from checks.layout import TARGETS

CONDITIONS = {c.name: c for c in (*refusal_eval.CONDITIONS, *weights.CONDITIONS, *contribution.CONDITIONS, *capability.CONDITIONS)}
CHECKS = ("weights", "projection", "recovery", "routing", "contribution", "refusal", "damage", "capability", "conversion")  # conversion: only with --against


class GateConfig:
    """Limits per condition (None / () / False: off), plus ``optional`` and ``required`` conditions and ``waive``d checks.

    ``GateConfig(max_kl=0.5)`` overrides one limit; unknown names raise AuditError.
    """

    def __init__(self, optional=(), waive=(), required=(), source: str = "gate config", **limits):
        unknown = sorted(set(limits) - set(CONDITIONS))
        if unknown:
            raise AuditError(f"{source}: unknown gate key(s) {unknown}; known: {sorted([*CONDITIONS, 'optional', 'required', 'waive'])}")
        self.limits = {name: limits.get(name, c.default) for name, c in CONDITIONS.items()}
        for k, v in self.limits.items():
            self.limits[k] = _validate(k, v, source)
        self.optional = _names(optional, "optional", sorted(CONDITIONS), source)
        self.required = _names(required, "required", sorted(CONDITIONS), source)
        both = sorted(self.optional & self.required)
        if both:
            raise AuditError(f"{source}: {both} listed under both optional and required; a threshold is one or the other")
        off = sorted(n for n in self.required if not _on(self.limits[n]))
        if off:
            raise AuditError(f"{source}: required lists {off}, which this gate switches off; give each a limit (e.g. forbid_unintended: true)")
        self.waive = _names(waive, "waive", list(CHECKS), source)
        self.source = source

    def __getattr__(self, name):
        limits = self.__dict__.get("limits", {})
        if name in limits:
            return limits[name]
        raise AttributeError(name)

    def with_limits(self, **limits) -> GateConfig:
        """The same gate with some limits replaced (validated as a gate file's are)."""
        return GateConfig(optional=self.optional, waive=self.waive, required=self.required, source=self.source,
                          **{**{k: v for k, v in self.limits.items()}, **limits})

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "gate config") -> GateConfig:
        d = dict(d or {})
        return cls(optional=d.pop("optional", ()), waive=d.pop("waive", ()), required=d.pop("required", ()), source=source, **d)


def _validate(name: str, v, source: str):
    if name == "must_ablate":
        if v is None:
            return ()
        if not isinstance(v, (list, tuple)) or any(t not in TARGETS for t in v):
            raise AuditError(f"{source}: must_ablate must list target groups from {list(TARGETS)}; got {v!r}")
        return tuple(v)
    if name == "forbid_unintended":
        if not isinstance(v, bool):
            raise AuditError(f"{source}: forbid_unintended must be true or false; got {v!r}")
        return v
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v):
        raise AuditError(f"{source}: {name} must be a number (or null to switch it off); got {v!r}")
    return v


def _names(v, key: str, known: list[str], source: str) -> frozenset[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple, set, frozenset)) or any(x not in known for x in v):
        raise AuditError(f"{source}: {key} must list names from {known}; got {v!r}")
    return frozenset(v)


def _on(limit) -> bool:
    return limit is not None and limit is not False and limit != ()


def evaluate_gate(results: dict, gate: GateConfig, source: str = "defaults") -> dict:
    """Every switched-on condition and every check's status against ``results``; see the module docstring."""
    checks = results.get("checks", {}) or {}
    rows = []
    for name, cond in CONDITIONS.items():
        limit = gate.limits[name]
        if not _on(limit):
            continue
        row = cond.judge(checks.get(cond.check), limit, required=name in gate.required)
        if row["state"] == "not-measured" and name in gate.optional:
            row = {**row, "state": "skipped", "passed": None, "message": row["message"] + " (optional in this gate: skipped)"}
        rows.append(row)
    for name in CHECKS:
        cr = checks.get(name)
        if not isinstance(cr, dict) or cr.get("status") != "fail":
            continue
        waived = name in gate.waive
        rows.append({"name": f"check:{name}", "check": name, "value": "fail", "limit": "not fail", "op": "status",
                     "state": "waived" if waived else "fail", "passed": None if waived else False,
                     "message": f"the {name} check failed: {cr.get('summary', '')}"[:400] + (" (waived by the gate)" if waived else "")})
    passed = all(r["passed"] is not False for r in rows)
    return {"passed": passed, "source": source, "thresholds": rows}
