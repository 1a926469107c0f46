"""What the diagnosis concludes, in one record: not needed, a cause (proven or named on its evidence), or unexplained.

"Unexplained" is an answer, not a gap: when the gate failed and no cause is left standing (none named, or every one
demoted because its simulated fix did not remove refusal), the record says so, lists what was measured (the failed
thresholds), which fixes were simulated and what each did (the bypass test per index, every cause's candidates), and
what to try next. No cause id is ever invented to fill the slot. When the cause left standing is a soundness problem
(damage, an unintended edit) and refusal also failed, that cause is a fact but not why refusal stayed: the record
names it and marks the refusal part unexplained (``refusal_unexplained``), with the same tried/next lists.
"""

from __future__ import annotations

from checks.diagnosis.cause import Cause, pct


REFUSAL_THRESHOLDS = frozenset({"max_refusal_after", "min_drop", "check:refusal"})


def _tried(causes: list[Cause], bypass: dict | None) -> list[dict]:
    rows = []
    for idx, v in sorted((bypass or {}).items(), key=lambda kv: int(kv[0])):
        rows.append({"what": f"every residual writer at every layer, direction of index {idx} (bypass test)",
                     "refusal_rate": v.get("rate"), "kl": v.get("kl"), "method": v.get("method")})
    for c in causes:
        for r in c.search:
            if "refusal_rate" in r:
                rows.append({"what": f"{c.id}: {r.get('label')}", "refusal_rate": r.get("refusal_rate"), "kl": r.get("kl"),
                             "method": "generation" if r.get("generation") else "first-token estimate", "note": r.get("note")})
    return rows


def _next(failed: set[str], bypass: dict | None, simulated: bool, target: float) -> list[str]:
    out = []
    working = sorted((int(k) for k, v in (bypass or {}).items() if v.get("rate") is not None and v["rate"] <= target))
    if failed & REFUSAL_THRESHOLDS:
        if working:
            out.append(f"ablating every residual writer at every layer with the direction of index {working[0]} removes refusal in the simulation: "
                       f"re-ablate with components [embed, attn_out, mlp_down, experts_down, shared_down], every layer, measurement {working[0]}")
        elif bypass:
            out.append("no measured direction removes refusal even with every writer of every layer ablated: refusal may not ride on one "
                       "direction at these indices, or these prompts do not elicit it; measure directions on prompts the base refuses "
                       "(--harmful) and read the judged answers in the report")
        elif not simulated:
            out.append("run without --no-simulate: the candidate fixes are then simulated and the bypass test bounds what any ablation can do")
    if failed & {"max_unknown", "check:refusal"}:
        out.append("many answers were undecided: read them in the report; raise --max-new-tokens or pass another --judge")
    if failed & {"forbid_unintended", "must_ablate", "check:weights"}:
        out.append("the weights do not match what the gate asks of them: see the weights check's findings (and pass --config with the "
                   "ablation's YAML where it states an intent)")
    if failed & {"max_kl", "max_degenerate", "max_over_refusal", "check:damage"}:
        out.append("compare the completions before and after in the report; ablate fewer components or layers, or lower the scale")
    return out or ["see the failed checks in the report"]


def _what_was_tried(causes: list[Cause], failed: set[str], bypass: dict | None, simulated: bool, target: float) -> dict:
    """The part of a conclusion that says what was simulated and what to try next, wherever refusal is left unexplained."""
    return {"tried": _tried(causes, bypass), "next": _next(failed, bypass, simulated, target), "refusal_target": target,
            "target_text": pct(target)}


def conclude(passed: bool, causes: list[Cause], gate: dict, bypass: dict | None = None, simulated: bool = False,
             refusal_target: float = 0.1) -> dict:
    """The diagnosis's conclusion for results.json and the headline (see the module docstring)."""
    if passed:
        return {"status": "not-needed", "cause": None, "proven": False, "statement": "the gate passed: nothing to explain"}
    top = causes[0] if causes else None
    failed_rows = [t for t in gate.get("thresholds") or [] if t.get("passed") is False]
    failed = {t["name"] for t in failed_rows}
    if top is not None and not top.demoted:
        sim = top.simulated or {}
        proven = bool(sim.get("reaches_target"))
        if top.explains_refusal:
            how = ("its fix, simulated, removes refusal" if proven else
                   "its fix was simulated and lowers refusal, short of the target" if sim.get("refusal_rate") is not None else
                   "named on its evidence")
            return {"status": "explained", "cause": top.id, "proven": proven, "statement": f"{top.title} ({how})"}
        how = ("its fix, simulated, keeps refusal removed without the harm" if proven else
               "named on its evidence: a soundness problem, not what keeps refusal")
        out = {"status": "explained", "cause": top.id, "proven": proven, "statement": f"{top.title} ({how})"}
        refusal_stands = failed & REFUSAL_THRESHOLDS and not any(c.explains_refusal and not c.demoted for c in causes)
        if refusal_stands:
            # a soundness problem (damage, an unintended edit) is a fact, but it is not why refusal stayed: say that
            # the refusal part is unexplained, with what was tried, rather than let the soundness cause stand for it
            out.update(refusal_unexplained=True, **_what_was_tried(causes, failed, bypass, simulated, refusal_target))
            out["statement"] += ("; why refusal stays is not explained: no simulated fix removes it" if simulated else
                                 "; why refusal stays is not explained: no rule names a cause for it")
        return out
    why = ("no rule found evidence of a cause" if not causes else
           f"{len(causes)} cause(s) had evidence, but none of their simulated fixes removes refusal")
    return {"status": "unexplained", "cause": None, "proven": False,
            "statement": f"no cause proven: {why}",
            "measured": [t.get("message") or t["name"] for t in failed_rows],
            **_what_was_tried(causes, failed, bypass, simulated, refusal_target)}
