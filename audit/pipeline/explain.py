"""The diagnosis stage of `audit run`: what reached the weights, the bypass test, the rules, the fixes simulated, the conclusion.

Only when the gate failed does anything here cost time: the simulator (audit/pipeline/simulate.py) calibrates on the
judged answers, runs the bypass test and reproduces what reached the weights; the rules (checks/diagnosis) read the
evidence; each cause's fix family is walked; the causes are ranked by what their fixes did; the conclusion says which
cause, proven or on evidence, or that none was proven.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from audit.intent.config import AblationConfig
from audit.intent.fixes import apply_patch, config_yaml
from audit.intent.reached import Reached
from audit.pipeline.fix_search import FixSearch
from audit.pipeline.simulate import Simulator
from checks.diagnosis import Cause, build_evidence, conclude, diagnose, rank_by_simulation
from checks.errors import AuditError


@dataclass
class Explained:
    causes: list[Cause]
    not_blamed: list[dict]
    simulation: dict | None
    conclusion: dict
    evidence: object  # checks.diagnosis.Evidence
    fix_search: dict | None = None  # audit/pipeline/fix_search.py: the trials and the best config (--apply-fix, `audit fix`)


def reference_index(intent_cfg, recovery: dict) -> int | None:
    """The measurement index the ablation used: its config's commonest entry, else the recovered direction's best match."""
    if intent_cfg is not None and intent_cfg.entries:
        return Counter(e.measurement for e in intent_cfg.entries).most_common(1)[0][0]
    groups = (recovery.get("data") or {}).get("groups") or []
    if groups and groups[0].get("best_index") is not None:
        return int(groups[0]["best_index"])
    return None


def direction_facts(directions, ablated_index: int | None, separating: int, recovery: dict) -> dict:
    """The directions the diagnosis reads: both indices, |cos| between their directions, the signal quality per index."""
    cos = None
    if ablated_index is not None and ablated_index < directions.n:
        a, b = directions.refusal_dir[ablated_index].double(), directions.refusal_dir[separating].double()
        cos = abs(float(a @ b / (a.norm() * b.norm()))) if a.norm() > 0 and b.norm() > 0 else None
    else:  # no index: the recovery check's own comparison, when it made one
        mism = next((f for f in recovery.get("findings") or [] if f.get("code") == "direction-mismatch"), None)
        cos = (mism or {}).get("evidence", {}).get("cosine")
    return {"separating_index": separating, "ablated_index": ablated_index, "cos_ablated_separating": cos,
            "quality": directions.quality_table()}


def empty_config() -> AblationConfig:
    return AblationConfig([], (), source="nothing reached the weights")


def explain(ctx, opts, checks: dict, gate: dict, gate_cfg, done: Reached, directions, layout, model: dict, ablated_index: int | None,
            m_base, tok, prompts: dict, judged: dict, scores: torch.Tensor, jd, refusal_ids, lp_harmless) -> Explained:
    """Diagnose a run (see the module docstring). ``judged``: (side, set) -> judgements; ``scores``: first-token refusal
    scores of both models on every prompt, in the order of ``judged``'s base then ablated sets (the calibration)."""
    target, max_kl = gate_cfg.limits["max_refusal_after"], gate_cfg.limits["max_kl"]
    separating = directions.separating_index()
    refusal_after = ((checks["refusal"].get("data") or {}).get("after") or {}).get("rate")
    fix_base, fix_dirs = done.config, done.directions
    sim = bypass = reproduction = None
    if opts.simulate and not gate["passed"]:
        with ctx.stage("simulation: calibration and bypass test"):
            labels = [x.refused for side in ("base", "abl") for k in prompts for x in judged[side, k]]
            sim = Simulator(m_base, tok, prompts["harmful"], prompts["harmless"], scores, labels, jd, opts, directions, layout, refusal_ids,
                            lp_harmless=lp_harmless, **({"target": target} if target is not None else {}),
                            max_kl=max_kl if max_kl is not None else float("inf"))
            if sim.calibration is not None:
                bypass = sim.bypass_scan(ablated_index)
                separating = bypass["best_index"]
                reproduction = sim.reproduce(fix_base, fix_dirs, refusal_after)
    with ctx.stage("diagnosis"):
        ev = build_evidence(checks, done.summary(), model, direction_facts(directions, ablated_index, separating, checks.get("recovery") or {}),
                            gate, gate_cfg.limits, bypass["indices"] if bypass else None)
        diag = diagnose(ev)
    causes = diag["causes"]
    sim_info = None
    if sim is not None and sim.calibration is not None and causes:
        with ctx.stage("simulation: candidate fixes"):
            sim_info = sim.search(causes, fix_base, fix_dirs, refusal_after, bypass=bypass["indices"] if bypass else None, ablated_index=ablated_index)
            causes = rank_by_simulation(causes, refusal_target=ev.refusal_target, damage_first=ev.damage_first)
    if sim is not None:
        sim_info = {**(sim_info or {}), "calibration": sim.calibration.to_dict() if sim.calibration else None, "bypass": bypass,
                    "note": sim.note, "seconds": round(sim.seconds, 3), "reached": done.to_dict(), "reproduction": reproduction}
    for cz in causes:
        _write_fix(cz, fix_base if fix_base is not None else empty_config(), done)
    search = None
    if opts.apply_fix and sim is not None and sim.calibration is not None and not gate["passed"]:
        with ctx.stage("fix search"):
            searcher = FixSearch(sim, layout, gate_cfg.limits, ev.writes_before, budget=opts.fix_budget)
            search = searcher.run(causes, fix_base if fix_base is not None else empty_config(), bypass["indices"] if bypass else None)
            ctx.kept.update(simulator=sim, searcher=searcher)
    conclusion = conclude(gate["passed"], causes, gate, bypass["indices"] if bypass else None, simulated=sim is not None,
                          refusal_target=ev.refusal_target)
    return Explained(causes, diag["not_blamed"], sim_info, conclusion, ev, search)


def _write_fix(cause: Cause, start: AblationConfig, done: Reached) -> None:
    """The cause's fix as a config (what reached the weights, patched), or why it cannot be written as one."""
    if cause.fix.get("patch") is None or not set(cause.fix["patch"]) - {"dtype"}:
        return
    try:
        cause.fix["config_yaml"] = config_yaml(apply_patch(start, cause.fix["patch"]))
        if done.extra_rows:
            cause.fix["note"] = (f"indices {sorted(done.extra_rows)} are the ablation's own directions (no measured index matches them); "
                                 "--apply-fix writes them into the fixed model's directions.safetensors")
    except AuditError as e:
        cause.fix["config_yaml"] = None
        cause.fix["note"] = f"this fix cannot be written as a config: {e}"
