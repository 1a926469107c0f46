"""One rule per cause: the conditions that name it, its thresholds (checks/thresholds.py), its fix family.

A rule reads ``Evidence`` (checks/diagnosis/evidence.py) and returns the causes it names (with their evidence, each
item citing its measurement) and the components it checked and cleared ("not blamed"). ``RULES`` registers them in
the order the diagnosis runs them; the simulator (audit/pipeline/simulate.py) reads the same table for which causes
are about what writes r (``writer``), bounded by the bypass test.

Each cause carries ``fix["candidates"]``: patches (audit/intent/fixes.py) from the smallest its evidence supports
to the largest its kind allows; the simulator walks them and keeps the smallest that reaches the target.

Rules that keep a diagnosis honest on models it was not built on:
- intent is stated or not claimed: without a manifest or config the intent is exactly what changed, so
  ``keys-not-matched`` needs no tensor changed at all, and ``unintended-modification`` a name-pattern signature
  (a string-prefix collision);
- the groups-left-out and layer-coverage causes need a projection to have reached the weights (an ablation that
  only suppressed experts at the router has no layers or groups to extend);
- damage first: degenerate outputs, NaN or a KL above the gate put ``model-damaged`` on top;
- the scale that reached the weights decides between weak (below 1) and overshoot (above 1); a scale that could
  not be measured decides nothing;
- some routed experts of a layer edited and others not is partial coverage, never a weak scale;
- "routing did not change" is evidence only when an equivalence test shows it (checks/routing.py), never from a
  test that merely found no significant change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from checks.diagnosis.cause import Cause, cite, pct
from checks.diagnosis.evidence import Evidence
from checks.findings import ranges
from checks.thresholds import (BYPASS_MARGIN, DAMAGE_KL_RATIO, MISMATCH_COS, OVERSHOOT_SCALE, QUALITY_RATIO, READ_LEFT, SAME_COS,
                               WEAK_SCALE, WRITE_TOL)

Outcome = tuple[list[Cause], list[dict]]  # (causes named, components checked and not blamed)


@dataclass(frozen=True)
class Rule:
    """A cause id, how people read it, and the function that names it from evidence."""

    cause: str
    title: str
    judge: Callable[[Evidence], Outcome]
    explains_refusal: bool = True  # False: a soundness problem (unintended edits, damage), listed whatever refusal does
    writer: bool = False  # about what writes r into the stream: the bypass test bounds these


# -- fix families ------------------------------------------------------------------------------------------------------


def _pos(x) -> float:
    return max(0.0, float(x)) if x is not None and x == x else 0.0


def _cands(*items) -> list[dict]:
    out, seen = [], []
    for label, patch in items:
        if patch is not None and patch not in seen:
            seen.append(patch)
            out.append({"label": label, "patch": patch})
    return out


def _layers_by_write(wb: dict, groups, layers) -> list[int]:
    """``layers`` in order of how much r ``groups`` wrote there before the ablation (largest first)."""
    return sorted(layers, key=lambda l: -sum(_pos((wb.get(g) or [])[l]) if l < len(wb.get(g) or []) else 0.0 for g in groups))


def _growing(first: list[int], ordered: list[int], every: list[int]) -> list[list[int]]:
    """Layer sets from ``first`` through ``ordered`` (1, 2, 4, ... of them) to ``every``: a family of candidates, no repeats."""
    out: list[list[int]] = []
    for s in [sorted(first)] + [sorted(set(first) | set(ordered[:k])) for k in (1, 2, 4, 8, 16, 32)] + [sorted(every)]:
        if s and s not in out:
            out.append(s)
    return out


def _suppress_cands(ev: Evidence, experts, strengths=None) -> list[tuple[str, dict]]:
    """Suppress the refusal experts at the router, the family's strengths smallest first (none where its router cannot be)."""
    strengths = ev.suppress_strengths if strengths is None else strengths
    experts = sorted({(int(l), int(e)) for l, e in experts or []})
    if not strengths or not experts:
        return []
    return [(f"suppress the {len(experts)} refusal experts at the router (strength {s:g} {ev.suppress_unit})",
             {"suppress": {"experts": [list(p) for p in experts], "strength": s}}) for s in strengths]


# -- what writes r: groups never ablated, groups ablated in too few layers ------------------------------------------------

GROUP_CAUSE = {  # writer target group -> (the cause when it was never modified, its name for people); layer-coverage: its layers are the fix
    "attn_out": ("attention-not-ablated", "attention (o_proj)"),
    "shared_down": ("shared-experts-not-ablated", "shared experts (down_proj)"),
    "experts_down": ("routed-experts-not-ablated", "routed experts (down_proj)"),
    "mlp_down": ("layer-coverage", "dense MLPs (down_proj)"),
    "embed": ("layer-coverage", "embeddings"),
}


def _totals(ev: Evidence) -> tuple[float | None, float]:
    before = sum(_pos(v) for g in ev.writes_before.values() for v in g) or None
    after = sum(_pos(v) for g in ev.writes_after.values() for v in g)
    return before, after


def _group_share(ev: Evidence, group: str, total_before: float) -> tuple[dict[int, float], float, list[int]]:
    """Per layer, the share of all pre-ablation r-writing ``group`` still writes; its sum; the layers above half the tolerance."""
    by_layer = {l: _pos(v) / total_before for l, v in enumerate(ev.writes_after.get(group) or [])}
    return by_layer, sum(by_layer.values()), [l for l, s in by_layer.items() if s >= WRITE_TOL / 2]


def _group_left_out(group: str) -> Callable[[Evidence], Outcome]:
    cause_id, name = GROUP_CAUSE[group]

    def judge(ev: Evidence) -> Outcome:
        total_before, total_after = _totals(ev)
        if not ev.projected or group not in ev.present or group not in ev.writes_after or total_before is None or group in ev.modified:
            return [], []
        by_layer, share, layers_left = _group_share(ev, group, total_before)
        if share < WRITE_TOL:
            return [], [{"component": name, "reason": f"left untouched, but writes only {share:.1%} of the r written before ablation"}]
        where = sorted(ev.present[group])
        mod_layers = sorted({l for ls in ev.modified.values() for l in ls})
        by_write = _layers_by_write(ev.writes_before, [group], where)
        cands = _cands((f"add {group} in the ablated layers", {"add_components": [group]}),
                       (f"add {group} where it writes r ({ranges(layers_left)})",
                        {"add": [{"targets": [group], "layers": sorted(set(layers_left) | set(mod_layers))}]} if layers_left else None),
                       (f"add {group} in every layer", {"add": [{"targets": [group], "layers": where}]}))
        of_remaining = share * total_before / total_after if total_after else 0.0
        return [Cause(cause_id, min(0.95, 0.25 + 0.7 * of_remaining),
                      f"{name}: not modified, and still write {share:.0%} of the r written before ablation (layers {ranges(layers_left) or ranges(by_write[:3])}).",
                      evidence=[cite("weights", f"{name}: no tensor changed"),
                                cite("contribution", f"{name}: share of the pre-ablation r-writing left = {share:.3f} (tolerance {WRITE_TOL}); "
                                                     f"{of_remaining:.0%} of all r still written")],
                      numbers={"share_left": share, "share_of_remaining": of_remaining, "group": group, "component": name},
                      layers=layers_left, links=["#check-contribution", "#check-weights"],
                      fix={"summary": f"add {group} to the ablated components", "patch": cands[0]["patch"], "candidates": cands})], []
    return judge


def _layer_coverage(ev: Evidence) -> Outcome:
    """Dense MLPs / embeddings never modified, or any writer group modified in too few of its layers."""
    total_before, total_after = _totals(ev)
    if not ev.projected or total_before is None:
        return [], []
    coverage, not_blamed = [], []  # (group, name, share, layers above tolerance after, missing layers)
    for group, (cause_id, name) in GROUP_CAUSE.items():
        if group not in ev.present or group not in ev.writes_after:
            continue
        by_layer, share, layers_left = _group_share(ev, group, total_before)
        where = sorted(ev.present[group])
        if group not in ev.modified:
            if cause_id != "layer-coverage":
                continue  # a group left out whole is its own rule's
            if share < WRITE_TOL:
                not_blamed.append({"component": name, "reason": f"left untouched, but writes only {share:.1%} of the r written before ablation"})
                continue
            coverage.append((group, name, share, layers_left, where))
            continue
        missing = [l for l in where if l not in ev.modified[group]]
        if not missing:
            continue
        miss_after = sum(by_layer.get(l, 0.0) for l in missing)
        wb = ev.writes_before.get(group) or []
        miss_before = sum(_pos(wb[l]) for l in missing if l < len(wb)) / total_before
        if max(miss_after, miss_before) < WRITE_TOL:
            continue
        coverage.append((group, name, max(miss_after, miss_before), [l for l in layers_left if l in missing], missing))
    if not coverage:
        return [], not_blamed
    mod_layers = sorted({l for ls in ev.modified.values() for l in ls})
    groups = [c[0] for c in coverage]
    first = sorted({l for c in coverage for l in c[3]})
    missing = sorted({l for c in coverage for l in c[4]})
    share = sum(c[2] for c in coverage)
    sets = _growing(first, _layers_by_write(ev.writes_before, groups, missing), missing)
    new_groups = [c[0] for c in coverage if c[0] not in ev.modified]
    cands = _cands(*[(f"also ablate layers {ranges(s)}" + (" (every layer where the groups exist)" if s == missing else ""),
                      {"add_layers": s, **({"add_components": new_groups} if new_groups else {})}) for s in sets])
    of_remaining = share * total_before / total_after if total_after else 0.0
    names = ", ".join(c[1] for c in coverage)
    return [Cause("layer-coverage", min(0.95, 0.3 + 0.7 * min(1.0, of_remaining)),
                  f"{names}: the layers left out ({ranges(missing)}) carried {share:.0%} of the r written before ablation"
                  + (f"; above tolerance after it in layers {ranges(first)}" if first else " (spread thinly: no single layer stands out)") + ".",
                  evidence=[cite("weights", f"ablated layers {ranges(mod_layers)}; left out: {ranges(missing)}")]
                  + [cite("contribution", f"{c[1]}: {c[2]:.3f} of the pre-ablation r-writing in un-ablated layers {ranges(c[4])}") for c in coverage],
                  numbers={"share_left": share, "share_of_remaining": of_remaining, "groups": groups, "component": names},
                  layers=missing, links=["#check-contribution", "#check-weights"],
                  fix={"summary": f"extend the ablated layers (to {ranges(sorted(set(mod_layers) | set(sets[0])))} at least)", "patch": cands[0]["patch"],
                       "candidates": cands})], not_blamed


# -- what reads r: routed experts' gate/up -------------------------------------------------------------------------------


def _expert_inputs(ev: Evidence) -> Outcome:
    rb, ra = ev.residual_before, ev.residual_after
    if not ev.projected or "experts_gate" not in ev.present or "experts_gate" in ev.modified or "experts_up" in ev.modified:
        return [], []
    reads = [l for l in ev.moe_layers if l < len(ra) and l < len(rb) and _pos(rb[l]) > 0 and _pos(ra[l]) / _pos(rb[l]) >= READ_LEFT]
    if not reads:
        return [], [{"component": "routed experts' gate/up (inputs)",
                     "reason": f"left untouched, but r no longer reaches their input (residual projection below {READ_LEFT:.0%} of before)"}]
    left = max(_pos(ra[l]) / _pos(rb[l]) for l in reads)
    cands = _cands(("add experts_gate and experts_up in the ablated layers", {"add_components": ["experts_gate", "experts_up"]}),
                   ("add experts_gate and experts_up in every MoE layer", {"add": [{"targets": ["experts_gate", "experts_up"], "layers": list(ev.moe_layers)}]}))
    return [Cause("expert-inputs-not-ablated", 0.25 + 0.3 * min(1.0, left),
                  f"Routed experts' gate/up projections are unmodified and the residual stream still carries r at their input "
                  f"in layers {ranges(reads)} (up to {left:.0%} of its pre-ablation projection).",
                  evidence=[cite("weights", "routed experts' gate/up: no tensor changed"),
                            cite("contribution", f"residual projection on r after/before at MoE layers {ranges(reads)}: max {left:.2f} (from {READ_LEFT})")],
                  numbers={"residual_left_max": left}, layers=reads, links=["#check-contribution", "#check-projection"],
                  fix={"summary": "add experts_gate and experts_up to the ablated components", "patch": cands[0]["patch"], "candidates": cands})], []


# -- routed experts: some edited and others not; routing ---------------------------------------------------------------------


def _redundant_experts(ev: Evidence) -> Outcome:
    partial, rexp = ev.partial_experts, [list(x) for x in ev.refusal_experts]
    total_before, _ = _totals(ev)
    if partial:
        pl = sorted(partial)
        wa = ev.writes_after.get("experts_down") or []
        still = [l for l in pl if l < len(wa) and total_before and _pos(wa[l]) / total_before >= WRITE_TOL / 4]
        moved = [e for e in rexp if e[0] in partial and e[1] not in partial[e[0]]]
        counts = ", ".join(f"{len(partial[l])}/{ev.n_experts or '?'} at L{l}" for l in pl[:6])
        cands = _cands((f"ablate every routed expert of layers {ranges(pl)}", {"all_experts": pl}),
                       ("ablate every routed expert of every MoE layer", {"all_experts": pl, "add": [{"targets": ["experts_down"], "layers": list(ev.moe_layers)}]}),
                       *_suppress_cands(ev, rexp))
        return [Cause("redundant-refusal-experts", 0.6 + 0.2 * bool(still) + 0.1 * bool(moved),
                      f"Only some routed experts were ablated in layers {ranges(pl)} ({counts}); the others still write r and the router can pick them.",
                      evidence=[cite("reached", f"routed experts edited per layer: {dict((l, partial[l][:8]) for l in pl[:8])}")]
                      + ([cite("contribution", f"routed experts still write r in layers {ranges(still)}")] if still else [])
                      + ([cite("routing", f"refusal-associated experts left unedited (layer, expert): {moved[:12]}")] if moved else []),
                      experts=[[l, e] for l in pl for e in partial[l]][:200], layers=pl, links=["#check-weights", "#check-routing"],
                      fix={"summary": f"ablate every routed expert of layers {ranges(pl)}, not a subset", "patch": cands[0]["patch"], "candidates": cands})], []
    # routing that moved to other refusal-associated experts explains refusal only if those experts can still write r: their
    # layer's down projections were not ablated, or the routed experts there still write r (out-of-sample gpt_oss, issue 25:
    # with every expert of every layer ablated along a wrong direction, routing moved and the cause was the direction)
    ablated_layers = set(ev.modified.get("experts_down", []))
    wa = ev.writes_after.get("experts_down") or []
    can_write = [e for e in rexp if e[0] not in ablated_layers
                 or (e[0] < len(wa) and total_before and _pos(wa[e[0]]) / total_before >= WRITE_TOL / 4)]
    if len(rexp) >= 2 and ev.compensation and can_write:
        cands = _cands(("ablate every routed expert's down_proj in every MoE layer", {"add": [{"targets": ["experts_down"], "layers": list(ev.moe_layers)}]}),
                       *_suppress_cands(ev, rexp))
        return [Cause("redundant-refusal-experts", 0.55, f"{len(rexp)} experts are significantly more often chosen for harmful prompts, and after "
                      "ablation routing moves to other such experts.",
                      evidence=[cite("routing", f"refusal-associated experts (layer, expert): {rexp[:12]}"),
                                cite("routing", "after ablation harmful prompts moved to other refusal-associated experts (BH-corrected shifts)"),
                                cite("contribution" if any(e[0] in ablated_layers for e in can_write) else "weights",
                                     f"refusal-associated experts that can still write r (down_proj not ablated, or still writing r): {can_write[:12]}")],
                      experts=rexp, links=["#check-routing"],
                      fix={"summary": "ablate every routed expert's down_proj in the MoE layers, not a subset", "patch": cands[0]["patch"], "candidates": cands})], []
    return [], []


def _router_ineffective(ev: Evidence) -> Outcome:
    if not (ev.router_modified and ev.router_unchanged):
        return [], []
    rexp = [list(x) for x in ev.refusal_experts]
    cands = _cands(("ablate the routed experts' down_proj in the ablated layers", {"add_components": ["experts_down"]}),
                   ("ablate the routed experts' down_proj in every MoE layer", {"add": [{"targets": ["experts_down"], "layers": list(ev.moe_layers)}]}),
                   *_suppress_cands(ev, rexp))
    return [Cause("router-ablation-ineffective", 0.45, "The router was modified but harmful prompts are routed as before.",
                  evidence=[cite("weights", f"router modified in layers {ranges(ev.modified.get('router', []))}"),
                            cite("routing", "selection on harmful prompts before vs after: shown unchanged by an equivalence test")],
                  experts=rexp, links=["#check-routing"],
                  fix={"summary": "ablate the refusal experts' writers (down_proj) instead of relying on the router", "patch": cands[0]["patch"], "candidates": cands})], []


# -- how the edit was made: direction, scale, rounding -------------------------------------------------------------------------


def _direction(ev: Evidence) -> tuple[bool, bool]:
    """(mismatch, separable): whether the ablated direction differs from the best one, and whether it separates refusal anyway."""
    cos, ai, si = ev.cos_ablated_separating, ev.ablated_index, ev.separating_index
    q = ev.quality
    q_abl, q_sep = q.get(ai), q.get(si)
    inner = ai is not None and q and 0 < ai < max(q)  # the embeddings and the final normed output are never separating indices
    separable = inner and q_abl is not None and q_sep and q_abl >= QUALITY_RATIO * q_sep
    q_ratio = q_abl / q_sep if q_abl is not None and q_sep else None
    mismatch = cos is not None and si is not None and ai != si and (
        abs(cos) < MISMATCH_COS or (abs(cos) < SAME_COS and (not inner or (q_ratio is not None and q_ratio < QUALITY_RATIO))))
    bypass = ev.bypass or {}
    if ai in bypass and si in bypass:  # the counterfactual test decides, not the heuristics
        works = bypass[ai] is not None and bypass[ai] <= ev.refusal_target
        separable = works
        # the direction is to blame when every writer ablated with it misses the target while another direction reaches it
        # (or does better by BYPASS_MARGIN): a fixed margin alone missed 19% -> 0% (the glm "late" organism, issue 31)
        other_works = bypass[si] is not None and bypass[si] <= ev.refusal_target
        mismatch = ai != si and not works and bypass[si] is not None and (other_works or bypass[si] < bypass[ai] - BYPASS_MARGIN)
    return bool(mismatch), bool(separable)


def _direction_mismatch(ev: Evidence) -> Outcome:
    cos, ai, si = ev.cos_ablated_separating, ev.ablated_index, ev.separating_index
    if not ev.projected or cos is None:
        return [], []
    mismatch, separable = _direction(ev)
    bypass = ev.bypass or {}
    q_abl, q_sep = ev.quality.get(ai), ev.quality.get(si)
    if ai in bypass and si in bypass and separable and ai != si:
        return [], [{"component": f"the direction (measured at index {ai})", "reason": f"ablating every residual writer with it removes refusal ({bypass[ai]:.0%} left)"}]
    if mismatch and separable and abs(cos) < MISMATCH_COS and not bypass:
        return [], [{"component": f"the direction (measured at index {ai})",
                     "reason": f"it differs from the best index {si} (|cos| {abs(cos):.2f}), but refusal separates almost as well there "
                               f"(quality {q_abl:.3g} vs {q_sep:.3g})"}]
    if not mismatch or separable:
        return [], []
    proven = ai in bypass and si in bypass
    q_ratio = q_abl / q_sep if q_abl is not None and q_sep else None
    conf = 0.85 if proven else min(0.95, 0.4 + (1.0 - abs(cos)) + 0.3 * (1.0 - (q_ratio or 0.0)))
    working = sorted([i for i, v in bypass.items() if v is not None and v <= ev.refusal_target], key=lambda i: ((ev.bypass_kl or {}).get(i) or 0.0, i))
    cands = _cands(*[(f"measure at index {i}", {"measurement": i}) for i in [si] + [i for i in working if i != si]])
    return [Cause("direction-mismatch", conf, f"The direction removed has cosine {abs(cos):.2f} to the refusal direction measured at index {si}"
                  + (f" (it matches index {ai})." if ai is not None else "."),
                  evidence=[cite("directions", f"|cos(ablated direction, direction at index {si})| = {abs(cos):.3f}")]
                  + ([cite("directions", f"signal quality at index {ai}: {q_abl:.3g}, at index {si}: {q_sep:.3g}")] if q_abl is not None and q_sep else [])
                  + ([cite("bypass", f"every writer ablated with the index's direction: refusal {bypass[ai]:.0%} at index {ai}, {bypass[si]:.0%} at index {si}")]
                     if proven else []),
                  numbers={"cosine": cos, "separating_index": si, "ablated_index": ai, "quality_ratio": q_ratio},
                  links=["#check-recovery", "#check-signal"],
                  fix={"summary": f"measure at index {si}: set measurement: {si} in every entry", "patch": cands[0]["patch"], "candidates": cands})], []


def _scales(ev: Evidence, low: bool) -> list[int]:
    return sorted(l for l, ss in ev.reached_scales.items() if any((s < WEAK_SCALE) if low else (s > OVERSHOOT_SCALE) for s in ss))


def _scale_overshoot(ev: Evidence) -> Outcome:
    over = _scales(ev, low=False)
    if not over:
        return [], []
    top = max(s for l in over for s in ev.reached_scales[l])
    cands = _cands(("lower the scale to 1.0", {"scale": 1.0}))
    return [Cause("scale-overshoot", 0.75, f"The edits in layers {ranges(over)} overshoot: scale up to {top:.2f} flips r instead of removing it.",
                  evidence=[cite("reached", f"effective scale along the ablated direction (1 removes r, 2 reflects it): up to {top:.2f} in layers {ranges(over)}")],
                  numbers={"max_scale": top}, layers=over, links=["#check-projection", "#check-recovery"],
                  fix={"summary": "lower the scale to 1.0 (a scale above 1 overshoots: it does not remove more refusal, it flips r)",
                       "patch": cands[0]["patch"], "candidates": cands})], []


def _finding(ev: Evidence, code: str) -> dict | None:
    return next((f for f in ev.weight_findings if f.get("code") == code), None)


def _weak_scale(ev: Evidence) -> Outcome:
    causes = []
    weak = _scales(ev, low=True)
    f = _finding(ev, "weak-scale")
    if f and weak and not ev.partial_experts:
        low = min(s for l in weak for s in ev.reached_scales[l])
        cands = _cands(("use scale 1.0", {"scale": 1.0}), ("use scale 1.0 and sparsity 0", {"scale": 1.0, "sparsity": 0.0}))
        causes.append(Cause("weak-scale", 0.6, f"The edits in layers {ranges(weak)} reduce r but do not remove it (scale as low as {low:.2f}).",
                            evidence=[cite("projection", f.get("message", "")),
                                      cite("reached", f"effective scale that reached the weights: as low as {low:.2f} in layers {ranges(weak)}")],
                            numbers={"value": f.get("value"), "min_scale": low}, layers=weak, links=["#check-projection"],
                            fix={"summary": "use scale: 1.0 and sparsity: 0.0", "patch": cands[0]["patch"], "candidates": cands}))
    sup = ev.suppressed
    if sup:  # a router suppression reached the weights and refusal stayed (dropped with the rest once refusal is gone)
        have = sorted({(int(l), int(e)) for l, e in sup["experts"]})
        extra = [list(e) for e in ev.refusal_experts if tuple(e) not in have]
        stronger = [s for s in ev.suppress_strengths if s > sup["strength"]]
        cands = _cands(*[(f"suppress the same {len(have)} experts at strength {s:g}", {"suppress": {"experts": [list(p) for p in have], "strength": s}})
                         for s in stronger],
                       *(_suppress_cands(ev, have + [tuple(e) for e in extra], stronger[-1:] or [sup["strength"]]) if extra else ()))
        causes.append(Cause("weak-scale", 0.55, f"The router suppression of {len(have)} experts at strength {sup['strength']:g} leaves refusal in place: "
                            "they (or other refusal-associated experts) are still chosen on harmful prompts.",
                            evidence=[cite("reached", f"suppressed at the router (layer, expert): {[list(p) for p in have][:12]}, strength {sup['strength']:g} "
                                                      f"{ev.suppress_unit}"), cite("refusal", f"refusal after the suppression: {pct(ev.refusal_after)}")]
                            + ([cite("routing", f"refusal-associated experts not suppressed: {extra[:12]}")] if extra else []),
                            numbers={"suppress_strength": sup["strength"]}, experts=[list(p) for p in have], layers=sorted({l for l, _ in have}),
                            links=["#check-routing", "#check-weights"],
                            fix={"summary": "raise suppress_strength (the unit is the family's selection score: checks/layout.py SUPPRESS_RULES)",
                                 "patch": cands[0]["patch"] if cands else {}, "candidates": cands}))
    return causes, []


def _precision_loss(ev: Evidence) -> Outcome:
    f = _finding(ev, "precision-loss")
    if not f:
        return [], []
    return [Cause("precision-loss", 0.35, f.get("message", "residue left by rounding"), evidence=[cite("projection", f.get("message", ""))],
                  layers=f.get("layers", []), links=["#check-projection"],
                  fix={"summary": "store the ablated weights in float32 (or apply the edit in float32 and keep the residue below tolerance)",
                       "patch": {"dtype": "float32"}, "candidates": []})], []


# -- the key diff against the intent -----------------------------------------------------------------------------------------


def _keys_not_matched(ev: Evidence) -> Outcome:
    untouched, nothing = _finding(ev, "intended-untouched"), _finding(ev, "no-change")
    f = nothing or (untouched if ev.intent_stated else None)
    if f is None:
        return [], []
    missing = {t: sorted(set(ls) - set(ev.modified.get(t, []))) for t, ls in ev.intended.items()}
    missing = {t: ls for t, ls in missing.items() if ls and t in ev.present}
    if nothing and not missing:  # nothing changed and nothing stated: a complete ablation is the fix
        missing = {t: sorted(ev.present[t]) for t in GROUP_CAUSE if t in ev.present}
    if not missing:
        return [], []
    index = ev.ablated_index if ev.ablated_index is not None else ev.separating_index
    add = [{"targets": [t], "layers": ls} for t, ls in sorted(missing.items())]
    cands = _cands(("edit the intended tensors that were left untouched", {"add": add, **({"measurement": index} if index is not None else {})}))
    return [Cause("keys-not-matched", 0.9, f.get("message", "intended tensors untouched"), evidence=[cite("weights", f.get("message", ""))],
                  layers=sorted({l for ls in missing.values() for l in ls}) or f.get("layers", []), numbers={"untouched": missing},
                  links=["#check-weights"],
                  fix={"summary": "re-run the ablation with `audit ablate`, which matches keys by parsed layer index for every layout "
                                  f"(fused experts included); untouched: {', '.join(sorted(missing)) or 'see the weights check'}",
                       "patch": cands[0]["patch"], "candidates": cands})], []


def prefix_collisions(changed_layers: list[int], n_layers: int) -> dict[int, list[int]]:
    """Layers whose change only a string-prefix match explains: entry n also hit n0..n9 (`key.startswith('layers.1')`).

    n and every existing layer whose number starts with n changed, and the layers between n and the first of them did
    not (so they are not one band): {n: [the collided layers]}.
    """
    ch = set(changed_layers)
    out = {}
    for n in sorted(ch):
        kids = [l for l in range(n_layers) if l != n and str(l).startswith(str(n))]
        if kids and set(kids) <= ch and any(l not in ch for l in range(n + 1, min(kids))):
            out[n] = kids
    return out


def _unintended(ev: Evidence) -> Outcome:
    if ev.intent_stated:
        f = _finding(ev, "unintended-modified")
        if not f:
            return [], []
        fe = f.get("evidence") or {}
        cands = _cands(("leave the unintended tensors as they were", {"drop": [{"targets": fe.get("targets") or [], "layers": f.get("layers", [])}]}))
        return [Cause("unintended-modification", 0.8, f.get("message", "tensors changed outside the intent"), evidence=[cite("weights", f.get("message", ""))],
                      layers=f.get("layers", []), links=["#check-weights"], explains_refusal=False,
                      fix={"summary": "match layers by parsed index (an entry for layer 1 must not match layers 10-19); re-ablate with `audit ablate`",
                           "patch": cands[0]["patch"], "candidates": cands})], []
    # no intent was given: only a name-pattern signature can call a change unintended
    mod_layers = sorted({l for ls in ev.modified.values() for l in ls})
    n_layers = ev.n_layers or max([len(v) for v in ev.writes_before.values()] + [max(mod_layers) + 1 if mod_layers else 0])
    coll = prefix_collisions(mod_layers, n_layers)
    if not coll:
        return [], []
    hit = sorted({l for ls in coll.values() for l in ls})
    targets = sorted({t for t, ls in ev.modified.items() if set(ls) & set(hit)})
    cands = _cands(("leave the collided layers as they were", {"drop": [{"targets": targets, "layers": hit}]}))
    return [Cause("unintended-modification", 0.6,
                  f"Layers {ranges(hit)} changed exactly as a string-prefix match would have changed them: "
                  + "; ".join(f"'layers.{n}' is a prefix of 'layers.{ls[0]}'..'layers.{ls[-1]}'" for n, ls in coll.items())
                  + ", while the layers between were left alone (a key.startswith match, not a band).",
                  evidence=[cite("weights", f"changed layers {ranges(mod_layers)}; the entry for layer {n} also matches {ranges(ls)}") for n, ls in coll.items()],
                  layers=hit, links=["#check-weights"], explains_refusal=False,
                  fix={"summary": "match layers by parsed index (`audit ablate` does); the collided layers were not meant",
                       "patch": cands[0]["patch"], "candidates": cands})], []


# -- damage ---------------------------------------------------------------------------------------------------------------------


def _damaged(ev: Evidence) -> Outcome:
    if not ev.damaged:
        return [], []
    ai, si = ev.ablated_index, ev.separating_index
    bkl = ev.bypass_kl or {}
    over = _scales(ev, low=False)
    mismatch, separable = _direction(ev)
    cands = []
    if over:
        cands += _cands(("lower the scale to 1.0", {"scale": 1.0}))
    if ai in bkl and si in bkl and ai != si and bkl[si] is not None and bkl[ai] is not None and bkl[si] < DAMAGE_KL_RATIO * bkl[ai]:
        cands += _cands((f"measure at index {si} (less damage)", {"measurement": si}))
    elif mismatch and not separable:
        cands += _cands((f"measure at index {si}", {"measurement": si}))
    if over:
        fix = {"summary": "lower the scale to 1.0: above 1 the edit flips r and breaks the model"}
    elif cands:
        fix = {"summary": f"the direction at index {ai} removes refusal but damages the model: measure at index {si}"}
    else:
        fix = {"summary": "ablate fewer components or use norm-preserving orthogonalization (method: norm_preserving); check biprojection"}
        cands = [{"label": "norm-preserving orthogonalization (not simulable: no hook reproduces it)", "patch": {"method": "norm_preserving"}}]
    fix.update(patch=cands[0]["patch"], candidates=cands)
    return [Cause("model-damaged", 0.95 if ev.degenerate_share >= 0.2 or ev.nonfinite else 0.9, ev.damaged, evidence=[cite("damage", ev.damaged)],
                  links=["#check-damage"], explains_refusal=False, fix=fix)], []


# -- the table ------------------------------------------------------------------------------------------------------------------

RULES: tuple[Rule, ...] = (
    Rule("attention-not-ablated", "Attention still writes r (o_proj not ablated)", _group_left_out("attn_out"), writer=True),
    Rule("shared-experts-not-ablated", "Shared experts still write r", _group_left_out("shared_down"), writer=True),
    Rule("routed-experts-not-ablated", "Routed experts still write r (down_proj not ablated)", _group_left_out("experts_down"), writer=True),
    Rule("layer-coverage", "r is still written outside the ablated layers", _layer_coverage, writer=True),
    Rule("expert-inputs-not-ablated", "Routed experts still read r (gate/up not ablated)", _expert_inputs),
    Rule("redundant-refusal-experts", "Refusal moved to other refusal-associated experts", _redundant_experts, writer=True),
    Rule("router-ablation-ineffective", "Router ablation did not change routing on harmful prompts", _router_ineffective),
    Rule("direction-mismatch", "The ablated direction is not the model's refusal direction", _direction_mismatch),
    Rule("scale-overshoot", "The edit overshoots: r is flipped, not removed (scale above 1)", _scale_overshoot),
    Rule("weak-scale", "The edit is too weak: r reduced but not removed, or suppressed experts still chosen (scale, sparsity, suppress strength)",
         _weak_scale),
    Rule("precision-loss", "Rounding to the stored dtype left part of r", _precision_loss),
    Rule("keys-not-matched", "Intended tensors were not modified", _keys_not_matched),
    Rule("unintended-modification", "Tensors changed that the ablation did not intend", _unintended, explains_refusal=False),
    Rule("model-damaged", "The ablation damaged the model", _damaged, explains_refusal=False),
)
BY_ID = {r.cause: r for r in RULES}
WRITER_CAUSES = tuple(r.cause for r in RULES if r.writer)
TITLES = {r.cause: r.title for r in RULES}
