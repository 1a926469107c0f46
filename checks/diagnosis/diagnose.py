"""From evidence to ranked causes (every rule of checks/diagnosis/rules.py run once), and the ranking by simulated fixes."""

from __future__ import annotations

from checks.diagnosis.cause import Cause, pct
from checks.diagnosis.evidence import Evidence
from checks.diagnosis.rules import RULES
from checks.thresholds import MAX_REFUSAL_AFTER


def diagnose(ev: Evidence) -> dict:
    """Evidence -> {"causes": [Cause...] ranked by evidence, "not_blamed": [...]}.

    Every rule runs; one cause per id (the most confident); once refusal is gone only soundness problems remain
    (the causes that explain refusal are listed as not blamed, with why); damage leads when answers degenerate.
    """
    causes: list[Cause] = []
    not_blamed: list[dict] = []
    for rule in RULES:
        named, cleared = rule.judge(ev)
        for c in named:
            c.title = rule.title
            c.explains_refusal = c.explains_refusal and rule.explains_refusal
        causes += named
        not_blamed += cleared
    best: dict[str, Cause] = {}
    for c in causes:
        if c.id not in best or c.confidence > best[c.id].confidence:
            best[c.id] = c
    causes = list(best.values())
    if ev.refusal_gone:
        for c in causes:
            if c.explains_refusal:
                not_blamed.append({"component": str(c.numbers.get("component") or c.title),
                                   "reason": f"{c.summary} But refusal is already {pct(ev.refusal_after)}: this does not limit the ablation."})
        causes = [c for c in causes if not c.explains_refusal]
    ranked = sorted(causes, key=lambda c: (not (c.id == "model-damaged" and ev.damage_first), -c.confidence))
    return {"causes": ranked, "not_blamed": not_blamed}


def rank_by_simulation(causes: list[Cause], refusal_target: float = MAX_REFUSAL_AFTER, damage_first: bool = False) -> list[Cause]:
    """Reorder by what each simulated fix achieves: fixes that reach the target first (confident evidence, then least damage).

    A cause whose search ended without reaching the target is demoted below the others and says so ("its largest
    candidate ..."); a single simulated fix that leaves refusal where it was is demoted the same way. With
    ``damage_first`` (degenerate outputs, NaN), ``model-damaged`` stays on top whatever the rest does.
    """
    for c in causes:
        sim = c.simulated
        if not c.explains_refusal or not sim or sim.get("refusal_rate") is None:
            continue
        reaches = sim.get("reaches_target", sim["refusal_rate"] <= refusal_target)  # the search's verdict when there was one
        if reaches:
            c.confidence = max(c.confidence, 0.9)
        elif c.search or (sim.get("baseline") is not None and sim["baseline"] - sim["refusal_rate"] < 0.05):
            c.demoted = True
            walked = [r for r in c.search if "refusal_rate" in r]
            tried = f"its largest candidate ({walked[-1]['label']})" if walked else "its fix"
            why = walked[-1].get("note") if walked else None
            now = pct(sim.get("baseline"))
            c.demoted_reason = (f"simulating {tried} does not count as a fix: {why} (refusal now {now})" if why else
                                f"simulating {tried} leaves refusal at {pct(sim['refusal_rate'])} (now {now}): it does not remove refusal")
            c.confidence = min(c.confidence, 0.2)

    def key(c: Cause):
        # tiers: damage first when outputs broke; fixes proven to reach the target (most confident evidence first, then
        # least damage); soundness causes and causes not simulated; demoted ones (lowest simulated refusal first)
        sim = c.simulated or {}
        r = sim.get("refusal_rate")
        if damage_first and c.id == "model-damaged":
            return (-1, 0.0, -c.confidence, 0.0)
        if c.demoted:
            return (3, r if r is not None else 1.0, -c.confidence, 0.0)
        if r is None or not c.explains_refusal:
            return (2, 0.0, -c.confidence, 0.0)
        if sim.get("reaches_target", r <= refusal_target):
            return (0, 0.0, -c.confidence, sim.get("kl") or 0.0)
        return (1, r, -c.confidence, sim.get("kl") or 0.0)

    return sorted(causes, key=key)
