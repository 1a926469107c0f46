"""From evidence to ranked causes, each with the ordered family of fixes that could remove it.

Pure: ``diagnose(evidence)`` takes one plain dict that audit/pipeline/run.py assembles from the checks and from
what reached the weights (audit/intent/reached.py), and names a cause only on evidence of its own. Each
cause carries ``fix["candidates"]``: patches (audit/intent/fixes.py) from the smallest its evidence supports
to the largest its kind allows -- for layer coverage the layers whose measured write of r passes the
tolerance, then more layers in order of their write of r before the ablation, then every layer where
the groups exist. audit/pipeline/simulate.py walks each family (first-token estimate, then generation) and
keeps the smallest fix that reaches the target; ``rank_by_simulation`` orders causes by that, and a
cause is demoted only when its largest candidate fails. ``fix["patch"]`` is the first candidate until
a search picks another.

Rules that keep a diagnosis honest on models it was not built on:
- intent is stated or it is not claimed: with no manifest or config (``intent_source: inferred``) the
  intent is exactly what changed, so ``keys-not-matched`` needs no tensor changed at all, and
  ``unintended-modification`` needs a name-pattern signature (a prefix collision);
- damage first: degenerate outputs, NaN or a KL above the gate put ``model-damaged`` on top;
- the scale that reached the weights decides between weak (below 1) and overshoot (above 1);
- some routed experts of a layer edited and others not is partial coverage, never a weak scale.

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
    "weak-scale": "The edit is too weak: r reduced but not removed, or suppressed experts still chosen (scale, sparsity, suppress strength)",
    "model-damaged": "The ablation damaged the model",
    "scale-overshoot": "The edit overshoots: r is flipped, not removed (scale above 1)",
}
WRITE_TOL = 0.05  # share of the pre-ablation r-writing that counts as "still writes"
WEAK, OVER = 0.95, 1.05  # a reached scale below / above these is weak / an overshoot


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
    search: list[dict] = field(default_factory=list)  # the candidates tried, in order, with what each gave
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


def _pct(x) -> str:
    """A rate for people: '12%', or 'not measurable' (never 'nan%')."""
    return "not measurable" if x is None or x != x else f"{x:.0%}"


def _pos(x) -> float:
    return max(0.0, float(x)) if x is not None else 0.0


def _layers_by_write(wb: dict, groups, layers) -> list[int]:
    """``layers`` in order of how much r ``groups`` wrote there before the ablation (largest first)."""
    return sorted(layers, key=lambda l: -sum(_pos((wb.get(g) or [0] * (l + 1))[l]) if l < len(wb.get(g) or []) else 0.0 for g in groups))


def _growing(first: list[int], ordered: list[int], every: list[int]) -> list[list[int]]:
    """Layer sets from ``first`` through ``ordered`` (1, 2, 4, ... of them) to ``every``: a family of candidates, no repeats."""
    out: list[list[int]] = []
    for s in [sorted(first)] + [sorted(set(first) | set(ordered[:k])) for k in (1, 2, 4, 8, 16, 32)] + [sorted(every)]:
        if s and s not in out:
            out.append(s)
    return out


def _cands(*items) -> list[dict]:
    out, seen = [], []
    for label, patch in items:
        if patch is not None and patch not in seen:
            seen.append(patch)
            out.append({"label": label, "patch": patch})
    return out


def _suppress_cands(ev: dict, experts) -> list[tuple[str, dict]]:
    """The "suppress the refusal experts at the router" family: the routing check's refusal experts, the family's
    strengths smallest first (checks/layout.py SUPPRESS_STRENGTHS, passed in ``suppress_strengths``); none when the
    family's router cannot be edited that way."""
    strengths, unit = ev.get("suppress_strengths") or (), ev.get("suppress_unit") or ""
    experts = sorted({(int(l), int(e)) for l, e in experts or []})
    if not strengths or not experts:
        return []
    return [(f"suppress the {len(experts)} refusal experts at the router (strength {s:g} {unit})",
             {"suppress": {"experts": [list(p) for p in experts], "strength": s}}) for s in strengths]


def prefix_collisions(changed_layers: list[int], n_layers: int) -> dict[int, list[int]]:
    """Layers whose change only a string-prefix match explains: entry n also hit n0..n9 (`key.startswith('layers.1')`).

    n and every existing layer whose number starts with n changed, and the layers between n and the first of
    them did not (so they are not one band): {n: [the collided layers]}.
    """
    ch = set(changed_layers)
    out = {}
    for n in sorted(ch):
        kids = [l for l in range(n_layers) if l != n and str(l).startswith(str(n))]
        if kids and set(kids) <= ch and any(l not in ch for l in range(n + 1, min(kids))):
            out[n] = kids
    return out


def diagnose(ev: dict) -> dict:
    """Evidence dict -> {"causes": [Cause...] ranked by evidence, "not_blamed": [...]}. See the module docstring."""
    causes: list[Cause] = []
    not_blamed: list[dict] = []
    modified: dict[str, list[int]] = {k: list(v) for k, v in (ev.get("modified") or {}).items() if v}
    present: dict[str, list[int]] = ev.get("present") or {}  # target group -> layers where the model has it
    wb: dict[str, list[float]] = ev.get("writes_before") or {}
    wa: dict[str, list[float]] = ev.get("writes_after") or {}
    total_before = sum(_pos(v) for g in wb.values() for v in g) or None
    total_after = sum(_pos(v) for g in wa.values() for v in g if v is not None)
    mod_layers = sorted({l for ls in modified.values() for l in ls})
    separating = ev.get("separating_index")
    stated = ev.get("intent_source", "manifest") != "inferred"
    n_layers = max([len(v) for v in wb.values()] + [len(v) for v in present.values()] + [max(mod_layers) + 1 if mod_layers else 0] + [0])
    moe_layers = ev.get("moe_layers") or []

    # -- writers: groups never ablated, and groups ablated in too few layers -------------------
    coverage = []  # (group, name, share of the pre-ablation writes in its un-ablated layers, thresholded layers, missing layers)
    for group, (cid_unmodified, name) in WRITER_GROUPS.items():
        if group not in present or group not in wa or total_before is None:
            continue
        after = wa[group]
        share_by_layer = {l: _pos(v) / total_before for l, v in enumerate(after) if v is not None}
        share = sum(share_by_layer.values())
        layers_left = [l for l, s in share_by_layer.items() if s >= WRITE_TOL / 2]
        where = sorted(present.get(group, []))
        if group not in modified:
            if share < WRITE_TOL:
                not_blamed.append({"component": name, "reason": f"left untouched, but writes only {share:.1%} of the r written before ablation"})
                continue
            by_write = _layers_by_write(wb, [group], where)
            if cid_unmodified == "layer-coverage":  # dense MLPs, embeddings: their layers are the fix
                coverage.append((group, name, share, layers_left, where))
                continue
            cands = _cands((f"add {group} in the ablated layers", {"add_components": [group]}),
                           (f"add {group} where it writes r ({ranges(layers_left)})", {"add": [{"targets": [group], "layers": sorted(set(layers_left) | set(mod_layers))}]} if layers_left else None),
                           (f"add {group} in every layer", {"add": [{"targets": [group], "layers": where}]}))
            of_remaining = share * total_before / total_after if total_after else 0.0
            causes.append(Cause(cid_unmodified, min(0.95, 0.25 + 0.7 * of_remaining),
                                f"{name}: not modified, and still write {share:.0%} of the r written before ablation (layers {ranges(layers_left) or ranges(by_write[:3])}).",
                                evidence=[f"{name}: share of pre-ablation r-writing left = {share:.3f} (tolerance {WRITE_TOL}); {of_remaining:.0%} of all r still written"],
                                numbers={"share_left": share, "share_of_remaining": of_remaining, "group": group, "component": name},
                                layers=layers_left, links=["#check-contribution", "#check-weights"],
                                fix={"summary": f"add {group} to the ablated components", "patch": cands[0]["patch"], "candidates": cands}))
        else:
            missing = [l for l in where if l not in modified[group]]
            if not missing:
                continue
            miss_after = sum(share_by_layer.get(l, 0.0) for l in missing)
            miss_before = sum(_pos(wb[group][l]) for l in missing if l < len(wb.get(group, []))) / total_before
            if max(miss_after, miss_before) < WRITE_TOL:
                continue
            coverage.append((group, name, max(miss_after, miss_before), [l for l in layers_left if l in missing], missing))
    if coverage:
        groups = [c[0] for c in coverage]
        first = sorted({l for c in coverage for l in c[3]})
        missing = sorted({l for c in coverage for l in c[4]})
        share = sum(c[2] for c in coverage)
        ordered = _layers_by_write(wb, groups, missing)
        sets = _growing(first, ordered, missing)
        new_groups = [c[0] for c in coverage if c[0] not in modified]
        cands = _cands(*[(f"also ablate layers {ranges(s)}" + (" (every layer where the groups exist)" if s == missing else ""),
                          {"add_layers": s, **({"add_components": new_groups} if new_groups else {})}) for s in sets])
        of_remaining = share * total_before / total_after if total_after else 0.0
        names = ", ".join(c[1] for c in coverage)
        causes.append(Cause("layer-coverage", min(0.95, 0.3 + 0.7 * min(1.0, of_remaining)),
                            f"{names}: the layers left out ({ranges(missing)}) carried {share:.0%} of the r written before ablation"
                            + (f"; above tolerance after it in layers {ranges(first)}" if first else " (spread thinly: no single layer stands out)") + ".",
                            evidence=[f"{c[1]}: {c[2]:.3f} of the pre-ablation r-writing in un-ablated layers {ranges(c[4])}" for c in coverage],
                            numbers={"share_left": share, "share_of_remaining": of_remaining, "groups": groups, "component": names},
                            layers=missing, links=["#check-contribution", "#check-weights"],
                            fix={"summary": f"extend the ablated layers (to {ranges(sorted(set(mod_layers) | set(sets[0])))} at least)", "patch": cands[0]["patch"],
                                 "candidates": cands}))

    # -- readers: experts' gate/up still see r -------------------------------------------------
    rb, ra = ev.get("residual_before") or [], ev.get("residual_after") or []
    reads = [l for l in moe_layers if l < len(ra) and l < len(rb) and _pos(rb[l]) > 0 and _pos(ra[l]) / _pos(rb[l]) >= 0.25]
    if "experts_gate" in present and "experts_gate" not in modified and "experts_up" not in modified:
        if reads:
            left = max(_pos(ra[l]) / _pos(rb[l]) for l in reads)
            exp_layers = sorted(set(modified.get("experts_down", [])) & set(moe_layers)) or reads
            cands = _cands(("add experts_gate and experts_up in the ablated layers", {"add_components": ["experts_gate", "experts_up"]}),
                           ("add experts_gate and experts_up in every MoE layer", {"add": [{"targets": ["experts_gate", "experts_up"], "layers": moe_layers}]}))
            causes.append(Cause("expert-inputs-not-ablated", 0.25 + 0.3 * min(1.0, left),
                                f"Routed experts' gate/up projections are unmodified and the residual stream still carries r at their input "
                                f"in layers {ranges(reads)} (up to {left:.0%} of its pre-ablation projection).",
                                evidence=[f"residual projection on r after/before at MoE layers {ranges(reads)}: max {left:.2f}"],
                                numbers={"residual_left_max": left, "layers_edited": exp_layers}, layers=reads,
                                links=["#check-contribution", "#check-projection"],
                                fix={"summary": "add experts_gate and experts_up to the ablated components", "patch": cands[0]["patch"], "candidates": cands}))
        else:
            not_blamed.append({"component": "routed experts' gate/up (inputs)", "reason": "left untouched, but r no longer reaches their input (residual projection below 25% of before)"})

    # -- routed experts: some edited, others not --------------------------------------------------
    partial = {int(l): es for l, es in (ev.get("partial_experts") or {}).items()}  # layer -> experts the ablation edited (a subset)
    rexp = ev.get("refusal_experts") or []
    if partial:
        pl = sorted(partial)
        n_exp = ev.get("n_experts") or 0
        still = [l for l in pl if l < len(wa.get("experts_down", [])) and total_before and _pos(wa["experts_down"][l]) / total_before >= WRITE_TOL / 4]
        moved = [e for e in rexp if e[0] in partial and e[1] not in partial[e[0]]]
        counts = ", ".join(f"{len(partial[l])}/{n_exp or '?'} at L{l}" for l in pl[:6])
        cands = _cands((f"ablate every routed expert of layers {ranges(pl)}", {"all_experts": pl}),
                       ("ablate every routed expert of every MoE layer", {"all_experts": pl, "add": [{"targets": ["experts_down"], "layers": moe_layers}]}),
                       *_suppress_cands(ev, rexp))
        causes.append(Cause("redundant-refusal-experts", 0.6 + 0.2 * bool(still) + 0.1 * bool(moved),
                            f"Only some routed experts were ablated in layers {ranges(pl)} ({counts}); "
                            "the others still write r and the router can pick them.",
                            evidence=[f"experts edited per layer: {dict((l, partial[l][:8]) for l in pl[:8])}"]
                            + ([f"routed experts still write r in layers {ranges(still)}"] if still else [])
                            + ([f"refusal-associated experts left unedited (layer, expert): {moved[:12]}"] if moved else []),
                            experts=[[l, e] for l in pl for e in partial[l]][:200], layers=pl, links=["#check-weights", "#check-routing"],
                            fix={"summary": f"ablate every routed expert of layers {ranges(pl)}, not a subset", "patch": cands[0]["patch"], "candidates": cands}))
    elif len(rexp) >= 2 and ev.get("compensation"):
        cands = _cands(("ablate every routed expert's down_proj in every MoE layer", {"add": [{"targets": ["experts_down"], "layers": moe_layers}]}),
                       *_suppress_cands(ev, rexp))
        causes.append(Cause("redundant-refusal-experts", 0.55, f"{len(rexp)} experts are significantly more often chosen for harmful prompts, and after ablation routing moves to other such experts.",
                            evidence=[f"refusal-associated experts (layer, expert): {rexp[:12]}"], experts=rexp, links=["#check-routing"],
                            fix={"summary": "ablate every routed expert's down_proj in the MoE layers, not a subset", "patch": cands[0]["patch"], "candidates": cands}))
    sup = ev.get("suppressed")  # a router suppression reached the weights (router_mode: suppress)
    if sup:  # (audit/pipeline/run.py drops causes that explain refusal once refusal is gone)
        have = sorted({(int(l), int(e)) for l, e in sup["experts"]})
        extra = [e for e in rexp if tuple(e) not in have]
        stronger = [s for s in (ev.get("suppress_strengths") or ()) if s > sup["strength"]]
        cands = _cands(*[(f"suppress the same {len(have)} experts at strength {s:g}", {"suppress": {"experts": [list(p) for p in have], "strength": s}})
                         for s in stronger],
                       *_suppress_cands({**ev, "suppress_strengths": stronger[-1:] or [sup["strength"]]}, have + [tuple(e) for e in extra]) if extra else ())
        causes.append(Cause("weak-scale", 0.55, f"The router suppression of {len(have)} experts at strength {sup['strength']:g} leaves refusal in place: "
                            "they (or other refusal-associated experts) are still chosen on harmful prompts.",
                            evidence=[f"suppressed at the router (layer, expert): {[list(p) for p in have][:12]}, strength {sup['strength']:g} "
                                      f"{ev.get('suppress_unit') or ''}"] + ([f"refusal-associated experts not suppressed: {extra[:12]}"] if extra else []),
                            numbers={"suppress_strength": sup["strength"]}, experts=[list(p) for p in have], layers=sorted({l for l, _ in have}),
                            links=["#check-routing", "#check-weights"],
                            fix={"summary": "raise suppress_strength (the unit is the family's selection score: checks/layout.py SUPPRESS_RULES)",
                                 "patch": cands[0]["patch"] if cands else {}, "candidates": cands}))
    if ev.get("router_modified") and ev.get("router_ineffective"):
        cands = _cands(("ablate the routed experts' down_proj in the ablated layers", {"add_components": ["experts_down"]}),
                       ("ablate the routed experts' down_proj in every MoE layer", {"add": [{"targets": ["experts_down"], "layers": moe_layers}]}),
                       *_suppress_cands(ev, rexp))
        causes.append(Cause("router-ablation-ineffective", 0.45, "The router was modified but harmful prompts are routed as before.",
                            evidence=["routing on harmful prompts before vs after: no significant change"], experts=rexp, links=["#check-routing"],
                            fix={"summary": "ablate the refusal experts' writers (down_proj) instead of relying on the router", "patch": cands[0]["patch"], "candidates": cands}))

    # -- how the edit itself was made ----------------------------------------------------------
    cos, ablated_index = ev.get("direction_cos_separating"), ev.get("ablated_index")
    q = ev.get("quality") or {}  # index -> signal quality of the direction measured there
    q_abl, q_separating = q.get(ablated_index), q.get(separating)
    inner = ablated_index is not None and q and 0 < ablated_index < max(q)  # the embeddings and the final normed output are never separating indices
    separable = inner and q_abl is not None and q_separating and q_abl >= 0.8 * q_separating
    q_ratio = q_abl / q_separating if q_abl is not None and q_separating else None
    mismatch = cos is not None and separating is not None and ablated_index != separating and (
        abs(cos) < 0.9 or (abs(cos) < 0.99 and (not inner or (q_ratio is not None and q_ratio < 0.8))))
    bypass = ev.get("bypass") or {}  # index -> refusal with every writer ablated using that index's direction (generation-confirmed where it could)
    tgt = ev.get("refusal_target", 0.1)
    working = sorted([i for i, v in bypass.items() if v is not None and v <= tgt], key=lambda i: ((ev.get("bypass_kl") or {}).get(i, 0.0), i))
    if ablated_index in bypass and separating in bypass:  # the counterfactual test decides, not the heuristics
        works_abl = bypass[ablated_index] is not None and bypass[ablated_index] <= tgt
        separable = works_abl
        mismatch = ablated_index != separating and not works_abl and bypass[separating] is not None and bypass[separating] < bypass[ablated_index] - 0.2
        if works_abl and ablated_index != separating:
            not_blamed.append({"component": f"the direction (measured at index {ablated_index})",
                               "reason": f"ablating every residual writer with it removes refusal ({bypass[ablated_index]:.0%} left)"})
    if mismatch and separable and abs(cos) < 0.9 and not bypass:
        not_blamed.append({"component": f"the direction (measured at index {ablated_index})",
                           "reason": f"it differs from the best index {separating} (|cos| {abs(cos):.2f}), but refusal separates almost as well there "
                                     f"(quality {q_abl:.3g} vs {q_separating:.3g})"})
    elif mismatch and not separable:
        proven = ablated_index in bypass and separating in bypass
        conf = 0.85 if proven else min(0.95, 0.4 + (1.0 - abs(cos)) + 0.3 * (1.0 - (q_ratio or 0.0)))
        others = [i for i in working if i != separating]
        cands = _cands(*[(f"measure at index {i}", {"measurement": i}) for i in [separating] + others])
        causes.append(Cause("direction-mismatch", conf, f"The direction removed has cosine {abs(cos):.2f} to the refusal direction measured at index {separating}"
                            + (f" (it matches index {ablated_index})." if ablated_index is not None else "."),
                            evidence=[f"|cos(ablated direction, direction at index {separating})| = {abs(cos):.3f}"]
                            + ([f"signal quality at index {ablated_index}: {q_abl:.3g}, at index {separating}: {q_separating:.3g}"] if q_abl is not None and q_separating else [])
                            + ([f"bypass test (every writer ablated with the index's direction): refusal {bypass[ablated_index]:.0%} at index "
                                f"{ablated_index}, {bypass[separating]:.0%} at index {separating}"] if proven else []),
                            numbers={"cosine": cos, "separating_index": separating, "ablated_index": ablated_index, "quality_ratio": q_ratio},
                            links=["#check-recovery", "#check-signal"],
                            fix={"summary": f"measure at index {separating}: set measurement: {separating} in every entry", "patch": cands[0]["patch"], "candidates": cands}))

    scales = ev.get("reached_scales") or {}  # layer -> [scales that reached the weights there]
    weak_layers = sorted(l for l, ss in scales.items() if any(s < WEAK for s in ss))
    over_layers = sorted(l for l, ss in scales.items() if any(s > OVER for s in ss))
    if over_layers:
        top = max(s for l in over_layers for s in scales[l])
        cands = _cands(("lower the scale to 1.0", {"scale": 1.0}))
        causes.append(Cause("scale-overshoot", 0.75, f"The edits in layers {ranges(over_layers)} overshoot: scale up to {top:.2f} flips r instead of removing it.",
                            evidence=[f"effective scale along the ablated direction (1 removes r, 2 reflects it): up to {top:.2f} in layers {ranges(over_layers)}"],
                            numbers={"max_scale": top}, layers=over_layers, links=["#check-projection", "#check-recovery"],
                            fix={"summary": "lower the scale to 1.0 (a scale above 1 overshoots: it does not remove more refusal, it flips r)",
                                 "patch": cands[0]["patch"], "candidates": cands}))
    for f in ev.get("findings") or []:
        code = f.get("code")
        if code == "precision-loss":
            causes.append(Cause("precision-loss", 0.35, f.get("message", "residue left by rounding"), evidence=[f.get("message", "")], layers=f.get("layers", []),
                                links=["#check-projection"], fix={"summary": "store the ablated weights in float32 (or apply the edit in float32 and keep the residue below tolerance)",
                                                                  "patch": {"dtype": "float32"}, "candidates": []}))
        elif code == "weak-scale" and weak_layers and not partial:
            low = min(s for l in weak_layers for s in scales[l])
            cands = _cands(("use scale 1.0", {"scale": 1.0}), ("use scale 1.0 and sparsity 0", {"scale": 1.0, "sparsity": 0.0}))
            causes.append(Cause("weak-scale", 0.6, f"The edits in layers {ranges(weak_layers)} reduce r but do not remove it (scale as low as {low:.2f}).",
                                evidence=[f.get("message", ""), f"effective scale that reached the weights: as low as {low:.2f} in layers {ranges(weak_layers)}"],
                                numbers={"value": f.get("value"), "min_scale": low}, layers=weak_layers, links=["#check-projection"],
                                fix={"summary": "use scale: 1.0 and sparsity: 0.0", "patch": cands[0]["patch"], "candidates": cands}))
        elif code in ("intended-untouched", "no-change") and (stated or code == "no-change"):
            intended = ev.get("intended") or {} if stated else {}
            missing = {t: sorted(set(ls) - set(modified.get(t, []))) for t, ls in intended.items()}
            missing = {t: ls for t, ls in missing.items() if ls and t in present}
            if code == "no-change" and not missing:  # nothing changed and nothing stated: a complete ablation is the fix
                writers = [t for t in WRITER_GROUPS if t in present]
                missing = {t: sorted(present[t]) for t in writers}
            if not missing:
                continue
            add = [{"targets": [t], "layers": ls} for t, ls in sorted(missing.items())]
            cands = _cands(("edit the intended tensors that were left untouched", {"add": add, **({"measurement": ev["ablated_index"]} if ev.get("ablated_index") is not None else {"measurement": separating} if separating is not None else {})}))
            causes.append(Cause("keys-not-matched", 0.9, f.get("message", "intended tensors untouched"), evidence=[f.get("message", "")],
                                layers=sorted({l for ls in missing.values() for l in ls}) or f.get("layers", []), numbers={"untouched": missing},
                                links=["#check-weights"],
                                fix={"summary": "re-run the ablation with `audit ablate`, which matches keys by parsed layer index for every layout "
                                                f"(fused experts included); untouched: {', '.join(sorted(missing)) or 'see the weights check'}",
                                     "patch": cands[0]["patch"], "candidates": cands}))
        elif code == "unintended-modified" and stated:
            ev_ = f.get("evidence") or {}
            cands = _cands(("leave the unintended tensors as they were", {"drop": [{"targets": ev_.get("targets") or [], "layers": f.get("layers", [])}]}))
            causes.append(Cause("unintended-modification", 0.8, f.get("message", "tensors changed outside the intent"), evidence=[f.get("message", "")], layers=f.get("layers", []),
                                links=["#check-weights"], explains_refusal=False,
                                fix={"summary": "match layers by parsed index (an entry for layer 1 must not match layers 10-19); re-ablate with `audit ablate`",
                                     "patch": cands[0]["patch"], "candidates": cands}))
    if not stated:  # no intent was given: only a name-pattern signature can call a change unintended
        coll = prefix_collisions(mod_layers, n_layers)
        if coll:
            hit = sorted({l for ls in coll.values() for l in ls})
            targets = sorted({t for t, ls in modified.items() if set(ls) & set(hit)})
            cands = _cands(("leave the collided layers as they were", {"drop": [{"targets": targets, "layers": hit}]}))
            causes.append(Cause("unintended-modification", 0.6,
                                f"Layers {ranges(hit)} changed exactly as a string-prefix match would have changed them: "
                                + "; ".join(f"'layers.{n}' is a prefix of 'layers.{ls[0]}'..'layers.{ls[-1]}'" for n, ls in coll.items())
                                + ", while the layers between were left alone (a key.startswith match, not a band).",
                                evidence=[f"changed layers {ranges(mod_layers)}; the entry for layer {n} also matches {ranges(ls)}" for n, ls in coll.items()],
                                layers=hit, links=["#check-weights"], explains_refusal=False,
                                fix={"summary": "match layers by parsed index (`audit ablate` does); the collided layers were not meant",
                                     "patch": cands[0]["patch"], "candidates": cands}))

    bkl = ev.get("bypass_kl") or {}
    if ev.get("damaged"):
        cands = []
        if over_layers:
            cands += _cands(("lower the scale to 1.0", {"scale": 1.0}))
        if ablated_index in bkl and separating in bkl and ablated_index != separating and bkl[separating] < 0.5 * bkl[ablated_index]:
            cands += _cands((f"measure at index {separating} (less damage)", {"measurement": separating}))
        elif mismatch and not separable:
            cands += _cands((f"measure at index {separating}", {"measurement": separating}))
        if over_layers:
            fix = {"summary": "lower the scale to 1.0: above 1 the edit flips r and breaks the model"}
        elif cands:
            fix = {"summary": f"the direction at index {ablated_index} removes refusal but damages the model: measure at index {separating}"}
        else:
            fix = {"summary": "ablate fewer components or use norm-preserving orthogonalization (method: norm_preserving); check biprojection"}
            cands = [{"label": "norm-preserving orthogonalization (not simulable: no hook reproduces it)", "patch": {"method": "norm_preserving"}}]
        fix.update(patch=cands[0]["patch"], candidates=cands)
        causes.append(Cause("model-damaged", 0.95 if ev.get("degenerate_share", 0) >= 0.2 or ev.get("nonfinite") else 0.9, ev["damaged"],
                            evidence=[ev["damaged"]], links=["#check-damage"], explains_refusal=False, fix=fix))

    dedup: dict[str, Cause] = {}
    for c in causes:  # one card per id; keep the most confident
        if c.id not in dedup or c.confidence > dedup[c.id].confidence:
            dedup[c.id] = c
    ranked = sorted(dedup.values(), key=lambda c: (not (c.id == "model-damaged" and ev.get("damage_first")), -c.confidence))
    return {"causes": ranked, "not_blamed": not_blamed}


def rank_by_simulation(causes: list[Cause], refusal_target: float = 0.10, damage_first: bool = False) -> list[Cause]:
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
            now = _pct(sim["baseline"])
            c.demoted_reason = (f"simulating {tried} does not count as a fix: {why} (refusal now {now})" if why else
                                f"simulating {tried} leaves refusal at {_pct(sim['refusal_rate'])} (now {now}): it does not remove refusal")
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
