"""From evidence to a verdict and ranked causes, each with its numbers and the config change that fixes it.

Pure: ``diagnose(evidence)`` takes one plain dict that audit/run.py assembles from the checks
(what changed per target group, how much of r each component group still writes, the residual
projection per layer, routing facts, recovered direction, refusal and damage numbers) and names
a cause only on evidence. Components left untouched that write (or read) no r are listed under
``not_blamed`` instead. Ranking starts from the evidence's confidence; when the fixes have been
simulated (audit/simulate.py) ``rank_by_simulation`` reorders by what each fix would achieve.

Cause ids are stable (results.json, the report and the gate use them); see DESIGN.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from checks.findings import ranges

WRITER_GROUPS = {  # target group -> (cause id when never modified, human name)
    "attn_out": ("attention-not-ablated", "attention (o_proj)"),
    "shared_down": ("shared-experts-not-ablated", "shared experts (down_proj)"),
    "experts_down": ("routed-experts-not-ablated", "routed experts (down_proj)"),
    "mlp_down": ("layer-coverage", "dense MLPs (down_proj)"),
    "embed": ("layer-coverage", "embeddings"),
}
TITLES = {
    "expert-inputs-not-ablated": "Routed experts still read r (gate/up not ablated)",
    "shared-experts-not-ablated": "Shared experts still write r",
    "routed-experts-not-ablated": "Routed experts still write r (down_proj not ablated)",
    "layer-coverage": "r is still written outside the ablated layers",
    "router-ablation-ineffective": "Router ablation did not change routing on harmful prompts",
    "redundant-refusal-experts": "Refusal moved to other refusal-associated experts",
    "direction-mismatch": "The ablated direction is not the model's refusal direction",
    "keys-not-matched": "Intended tensors were not modified",
    "unintended-modification": "Tensors changed that the ablation did not intend",
    "attention-not-ablated": "Attention still writes r (o_proj not ablated)",
    "precision-loss": "Rounding to the stored dtype left part of r",
    "weak-scale": "Projection reduced but not removed (scale or sparsity)",
    "model-damaged": "The ablation damaged the model",
}
WRITE_TOL = 0.05  # share of the pre-ablation r-writing that counts as "still writes"


@dataclass
class Cause:
    id: str
    confidence: float
    summary: str
    evidence: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    experts: list[list[int]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    fix: dict = field(default_factory=dict)  # {"summary", "patch": {...}} ; audit renders config_yaml
    explains_refusal: bool = True  # False for soundness problems (unintended edits, damage)
    simulated: dict | None = None
    applied: dict | None = None
    demoted: bool = False
    demoted_reason: str | None = None

    @property
    def title(self) -> str:
        return TITLES.get(self.id, self.id)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["title"] = self.title
        d["confidence"] = round(self.confidence, 3)
        d["confidence_label"] = confidence_label(self.confidence)
        return d


def confidence_label(c: float) -> str:
    return "high" if c >= 0.67 else "medium" if c >= 0.34 else "low"


def _pos(x) -> float:
    return max(0.0, float(x)) if x is not None else 0.0


def diagnose(ev: dict) -> dict:
    """Evidence dict -> {"causes": [Cause...] ranked, "not_blamed": [...]}. See module docstring for the keys."""
    causes: list[Cause] = []
    not_blamed: list[dict] = []
    modified: dict[str, list[int]] = {k: list(v) for k, v in (ev.get("modified") or {}).items() if v}
    present: dict[str, list[int]] = ev.get("present") or {}  # target group -> layers where the model has it
    wb: dict[str, list[float]] = ev.get("writes_before") or {}
    wa: dict[str, list[float]] = ev.get("writes_after") or {}
    total_before = sum(_pos(v) for g in wb.values() for v in g) or None
    total_after = sum(_pos(v) for g in wa.values() for v in g if v is not None)
    mod_layers = sorted({l for ls in modified.values() for l in ls})
    good = ev.get("good_index")

    # -- writers: who still writes r after the ablation ----------------------------------------
    for group, (cid_unmodified, name) in WRITER_GROUPS.items():
        if group not in present or group not in wa or total_before is None:
            continue
        after = wa[group]
        share_by_layer = {l: _pos(v) / total_before for l, v in enumerate(after) if v is not None}
        share = sum(share_by_layer.values())
        layers_left = [l for l, s in share_by_layer.items() if s >= WRITE_TOL / 2]
        if group not in modified:
            if share < WRITE_TOL:
                not_blamed.append({"component": name, "reason": f"left untouched, but writes only {share:.1%} of the r written before ablation"})
                continue
            cid = cid_unmodified
            fix = {"summary": f"add {group} to the ablated components" + (f" and ablate layers {ranges(layers_left)}" if cid == "layer-coverage" else ""),
                   "patch": {"add_components": [group], "add_layers": layers_left}}
            summary = f"{name}: not modified, and still write {share:.0%} of the r written before ablation (layers {ranges(layers_left)})."
        else:
            outside = [l for l in layers_left if l not in modified[group]]
            if share < WRITE_TOL:
                continue
            if outside:
                cid = "layer-coverage"
                out_share = sum(share_by_layer[l] for l in outside)
                summary = f"{name}: ablated in layers {ranges(modified[group])}, but layers {ranges(outside)} still write {out_share:.0%} of r."
                fix = {"summary": f"extend the ablated layers to {ranges(sorted(set(mod_layers) | set(outside)))}", "patch": {"add_layers": outside}}
                share = out_share
            else:
                continue  # still writing inside ablated layers: weak-scale / direction-mismatch / precision-loss below
        # confidence: how much of what is still written comes from this group
        of_remaining = share * total_before / total_after if total_after else 0.0
        causes.append(Cause(cid, min(0.95, 0.25 + 0.7 * of_remaining), summary,
                            evidence=[f"{name}: share of pre-ablation r-writing left = {share:.3f} (tolerance {WRITE_TOL}); "
                                      f"{of_remaining:.0%} of all r still written"],
                            numbers={"share_left": share, "share_of_remaining": of_remaining, "group": group, "component": name}, layers=layers_left,
                            links=["#check-contribution", "#check-weights"], fix=fix))
    # merge duplicate ids (e.g. layer-coverage from several groups)
    merged: dict[str, Cause] = {}
    for c in causes:
        if c.id in merged:
            m = merged[c.id]
            m.confidence = min(0.97, max(m.confidence, c.confidence) + 0.05)
            m.summary += " " + c.summary
            m.evidence += c.evidence
            m.layers = sorted(set(m.layers) | set(c.layers))
            p, q = m.fix["patch"], c.fix["patch"]
            p["add_components"] = sorted(set(p.get("add_components", [])) | set(q.get("add_components", [])))
            p["add_layers"] = sorted(set(p.get("add_layers", [])) | set(q.get("add_layers", [])))
            m.fix["summary"] = "; ".join(x for x in (m.fix["summary"], c.fix["summary"]) if x)
            m.numbers["share_left"] = m.numbers.get("share_left", 0) + c.numbers.get("share_left", 0)
        else:
            merged[c.id] = c
    causes = list(merged.values())

    # -- readers: experts' gate/up still see r -------------------------------------------------
    rb, ra = ev.get("residual_before") or [], ev.get("residual_after") or []
    moe_layers = ev.get("moe_layers") or []
    reads = [l for l in moe_layers if l < len(ra) and l < len(rb) and _pos(rb[l]) > 0 and _pos(ra[l]) / _pos(rb[l]) >= 0.25]
    if "experts_gate" in present and "experts_gate" not in modified and "experts_up" not in modified:
        if reads:
            left = max(_pos(ra[l]) / _pos(rb[l]) for l in reads)
            causes.append(Cause("expert-inputs-not-ablated", 0.25 + 0.3 * min(1.0, left),
                                f"Routed experts' gate/up projections are unmodified and the residual stream still carries r at their input "
                                f"in layers {ranges(reads)} (up to {left:.0%} of its pre-ablation projection).",
                                evidence=[f"residual projection on r after/before at MoE layers {ranges(reads)}: max {left:.2f}"],
                                numbers={"residual_left_max": left}, layers=reads, links=["#check-contribution", "#check-projection"],
                                fix={"summary": "add experts_gate and experts_up to the ablated components", "patch": {"add_components": ["experts_gate", "experts_up"]}}))
        else:
            not_blamed.append({"component": "routed experts' gate/up (inputs)", "reason": "left untouched, but r no longer reaches their input (residual projection below 25% of before)"})

    # -- routing ------------------------------------------------------------------------------
    rexp = ev.get("refusal_experts") or []
    if ev.get("router_modified") and ev.get("router_ineffective"):
        causes.append(Cause("router-ablation-ineffective", 0.45, "The router was modified but harmful prompts are routed as before.",
                            evidence=["routing on harmful prompts before vs after: no significant change"], experts=rexp, links=["#check-routing"],
                            fix={"summary": "ablate the refusal experts' writers (down_proj) instead of relying on the router", "patch": {"add_components": ["experts_down"]}}))
    if len(rexp) >= 2 and ev.get("compensation"):
        causes.append(Cause("redundant-refusal-experts", 0.55, f"{len(rexp)} experts are significantly more often chosen for harmful prompts, and after ablation routing moves to other such experts.",
                            evidence=[f"refusal-associated experts (layer, expert): {rexp[:12]}"], experts=rexp, links=["#check-routing"],
                            fix={"summary": "ablate every routed expert's down_proj in the MoE layers, not a subset", "patch": {"add_components": ["experts_down"], "add_layers": moe_layers}}))

    # -- how the edit itself was made ----------------------------------------------------------
    cos, ablated_index = ev.get("direction_cos_good"), ev.get("ablated_index")
    q = ev.get("quality") or {}  # index -> signal quality of the direction measured there
    q_abl, q_good = q.get(ablated_index), q.get(good)
    inner = ablated_index is not None and q and 0 < ablated_index < max(q)  # the embeddings and the final normed output are never good indices
    separable = inner and q_abl is not None and q_good and q_abl >= 0.8 * q_good
    q_ratio = q_abl / q_good if q_abl is not None and q_good else None
    # a mismatch: the directions differ clearly (|cos| < 0.9), or they differ somewhat (< 0.99) and the
    # index used separates harmful from harmless clearly worse than the best one (< 0.8x its quality)
    mismatch = cos is not None and good is not None and ablated_index != good and (
        abs(cos) < 0.9 or (abs(cos) < 0.99 and (not inner or (q_ratio is not None and q_ratio < 0.8))))
    bypass = ev.get("bypass") or {}  # index -> refusal with every writer ablated using that index's direction
    tgt = ev.get("refusal_target", 0.1)
    if ablated_index in bypass and good in bypass:  # the counterfactual test decides, not the heuristics
        works_abl = bypass[ablated_index] <= tgt
        separable = works_abl
        mismatch = ablated_index != good and not works_abl and bypass[good] < bypass[ablated_index] - 0.2
        if works_abl and ablated_index != good:
            not_blamed.append({"component": f"the direction (measured at index {ablated_index})",
                               "reason": f"ablating every residual writer with it removes refusal ({bypass[ablated_index]:.0%} left)"})
    if mismatch and separable and abs(cos) < 0.9 and not bypass:
        not_blamed.append({"component": f"the direction (measured at index {ablated_index})",
                           "reason": f"it differs from the best index {good} (|cos| {abs(cos):.2f}), but refusal separates almost as well there "
                                     f"(quality {q_abl:.3g} vs {q_good:.3g})"})
    elif mismatch and not separable:
        proven = ablated_index in bypass and good in bypass
        conf = 0.85 if proven else min(0.95, 0.4 + (1.0 - abs(cos)) + 0.3 * (1.0 - (q_ratio or 0.0)))
        causes.append(Cause("direction-mismatch", conf, f"The direction removed has cosine {abs(cos):.2f} to the refusal direction measured at index {good}"
                            + (f" (it matches index {ablated_index})." if ablated_index is not None else "."),
                            evidence=[f"|cos(ablated direction, direction at index {good})| = {abs(cos):.3f}"]
                            + ([f"signal quality at index {ablated_index}: {q_abl:.3g}, at index {good}: {q_good:.3g}"] if q_abl is not None and q_good else [])
                            + ([f"bypass test (every writer ablated with the index's direction): refusal {bypass[ablated_index]:.0%} at index "
                                f"{ablated_index}, {bypass[good]:.0%} at index {good}"] if ablated_index in bypass and good in bypass else []),
                            numbers={"cosine": cos, "good_index": good, "ablated_index": ablated_index, "quality_ratio": q_ratio},
                            links=["#check-recovery", "#check-signal"], fix={"summary": f"measure at index {good}: set measurement: {good} in every entry", "patch": {"measurement": good}}))
    for f in ev.get("findings") or []:
        code = f.get("code")
        if code == "weak-scale":
            causes.append(Cause("weak-scale", 0.6, f.get("message", "projection reduced but not removed"), evidence=[f.get("message", "")], numbers={"value": f.get("value")},
                                layers=f.get("layers", []), links=["#check-projection"], fix={"summary": "use scale: 1.0 and sparsity: 0.0", "patch": {"scale": 1.0, "sparsity": 0.0}}))
        elif code == "precision-loss":
            causes.append(Cause("precision-loss", 0.35, f.get("message", "residue left by rounding"), evidence=[f.get("message", "")], layers=f.get("layers", []),
                                links=["#check-projection"], fix={"summary": "store the ablated weights in float32 (or apply the edit in float32 and keep the residue below tolerance)", "patch": {"dtype": "float32"}}))
        elif code in ("intended-untouched", "no-change"):
            intended = ev.get("intended") or {}
            missing = {t: sorted(set(ls) - set(modified.get(t, []))) for t, ls in intended.items()}
            missing = {t: ls for t, ls in missing.items() if ls and t in present}
            causes.append(Cause("keys-not-matched", 0.9, f.get("message", "intended tensors untouched"), evidence=[f.get("message", "")],
                                layers=sorted({l for ls in missing.values() for l in ls}) or f.get("layers", []), numbers={"untouched": missing},
                                links=["#check-weights"],
                                fix={"summary": "re-run the ablation with `audit ablate`, which matches keys by parsed layer index for every layout "
                                                f"(fused experts included); untouched: {', '.join(sorted(missing)) or 'see the weights check'}",
                                     "patch": {"add_components": sorted(missing), "add_layers": sorted({l for ls in missing.values() for l in ls}),
                                               **({"measurement": ev["ablated_index"]} if ev.get("ablated_index") is not None else {})}}))
        elif code == "unintended-modified":
            causes.append(Cause("unintended-modification", 0.8, f.get("message", "tensors changed outside the intent"), evidence=[f.get("message", "")], layers=f.get("layers", []),
                                links=["#check-weights"], explains_refusal=False,
                                fix={"summary": "match layers by parsed index (an entry for layer 1 must not match layers 10-19); re-ablate with `audit ablate`", "patch": {}}))
    bkl = ev.get("bypass_kl") or {}
    if ev.get("damaged"):
        if ablated_index in bkl and good in bkl and ablated_index != good and bkl[good] < 0.5 * bkl[ablated_index]:
            fix = {"summary": f"the direction at index {ablated_index} removes refusal but damages the model (simulated KL {bkl[ablated_index]:.2g} nats "
                              f"vs {bkl[good]:.2g} at index {good}): measure at index {good}", "patch": {"measurement": good}}
        elif mismatch and not separable:
            fix = {"summary": f"the direction removed is not the refusal direction (|cos| {abs(cos):.2f} to index {good}): measure at index {good}",
                   "patch": {"measurement": good}}
        else:
            fix = {"summary": "ablate fewer components or use norm-preserving orthogonalization (method: norm_preserving); check biprojection",
                   "patch": {"method": "norm_preserving"}}
        causes.append(Cause("model-damaged", 0.9, ev["damaged"], evidence=[ev["damaged"]], links=["#check-damage"], explains_refusal=False, fix=fix))

    dedup: dict[str, Cause] = {}
    for c in causes:  # one card per id; keep the most confident
        if c.id not in dedup or c.confidence > dedup[c.id].confidence:
            dedup[c.id] = c
    ranked = sorted(dedup.values(), key=lambda c: -c.confidence)
    return {"causes": ranked, "not_blamed": not_blamed}


def rank_by_simulation(causes: list[Cause], refusal_target: float = 0.10) -> list[Cause]:
    """Reorder by what each simulated fix would achieve: lowest simulated refusal first, damage as tie-break.

    A cause whose simulated fix leaves refusal where it is (within 0.05 of the current rate) is
    demoted below the others and says so. Causes without a simulation keep their evidence order after.
    """
    for c in causes:
        sim = c.simulated
        if not c.explains_refusal or not sim or sim.get("refusal_rate") is None or sim.get("baseline") is None:
            continue
        if sim["baseline"] - sim["refusal_rate"] < 0.05:
            c.demoted = True
            c.demoted_reason = f"simulating its fix leaves refusal at {sim['refusal_rate']:.0%} (now {sim['baseline']:.0%}): it does not remove refusal"
            c.confidence = min(c.confidence, 0.2)
        elif sim["refusal_rate"] <= refusal_target:
            c.confidence = max(c.confidence, 0.9)

    def key(c: Cause):
        # tiers: fixes proven to reach the target (most confident evidence first, then least damage),
        # fixes that help but do not reach it (lowest refusal first), causes not simulated, demoted ones
        sim = c.simulated or {}
        r = sim.get("refusal_rate")
        if c.demoted:
            return (3, 0.0, -c.confidence, 0.0)
        if r is None:
            return (2, 0.0, -c.confidence, 0.0)
        if r <= refusal_target:
            return (0, 0.0, -c.confidence, sim.get("kl") or 0.0)
        return (1, r, -c.confidence, sim.get("kl") or 0.0)

    return sorted(causes, key=key)
