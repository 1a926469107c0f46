"""`audit run`: every check, the diagnosis with each fix simulated, the gate, and the three output files.

Stages (each timed into results.json): inputs -> directions -> weights (static, streamed) ->
probes (routing and writes along r, base and ablated) -> completions and judgements -> damage ->
diagnosis -> simulated fixes -> gate -> report.html / results.json / junit.xml. Optionally the top
fix is applied with our ablation and re-audited (``apply_fix``).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from audit.ablation.ablate import ablate
from audit.forward.damage import kl_rows
from audit.forward.estimate import refusal_token_ids
from audit.forward.generate import LocalBackend
from audit.forward.measure import measure_directions
from audit.forward.passes import measure
from audit.intent.config import AblationConfig, load_config, resolve_measurements
from audit.intent.directions import load_directions
from audit.intent.fixes import apply_patch, config_yaml
from audit.intent.manifest import DIRECTIONS_NAME, load_manifest
from audit.intent.reached import reached as reached_ablation
from audit.judgement.judges import make_judge
from audit.model.directory import ModelDir
from audit.model.prompts import MAX_PROMPT_TOKENS, fit_to_context, load_prompts, token_budget
from audit.outputs import check_destination, remove_scratch, scratch_folder
from audit.pipeline.gate_file import gate_config
from audit.pipeline.inputs import load_model, offload_parent, open_servers, prompt_source, release, same_tokenizer, train_source
from audit.pipeline.options import RunContext, RunOptions, refuse_before_loading
from audit.pipeline.simulate import Simulator
from audit.pipeline.summary import headline, run_info, version
from audit.pipeline.write import write_outputs
from audit.weights.static_audit import static_audit
from checks.contribution import contribution_check
from checks.diagnose import Cause, diagnose, rank_by_simulation
from checks.errors import AuditError
from checks.findings import WARN, Finding, jsonable
from checks.gate import evaluate_gate
from checks.layout import SUPPRESS_RULES, SUPPRESS_STRENGTHS, SUPPRESS_UNITS
from checks.refusal_eval import MAX_DEGENERATE, MAX_REFUSAL_AFTER, damage_check, refusal_check
from checks.routing import routing_check
from reports.results_io import SCHEMA_VERSION


def _reference_index(intent_cfg, recovery: dict) -> int | None:
    """The measurement index the ablation used: its config's commonest entry, else the recovered direction's best match."""
    if intent_cfg is not None and intent_cfg.entries:
        return Counter(e.measurement for e in intent_cfg.entries).most_common(1)[0][0]
    groups = (recovery.get("data") or {}).get("groups") or []
    if groups and groups[0].get("best_index") is not None:
        return int(groups[0]["best_index"])
    return None


def _cos(dirs, i: int, j: int) -> float | None:
    """|cos| between the directions measured at indices i and j (None if either is zero)."""
    a, b = dirs.refusal_dir[i].double(), dirs.refusal_dir[j].double()
    na, nb = a.norm(), b.norm()
    return abs(float(a @ b / (na * nb))) if na > 0 and nb > 0 else None


def _config_from_changes(modified: dict, measurement: int):
    """A config that says what another tool did: modified target groups over the layers it changed."""
    comps = [t for t in modified if modified[t]]
    layers = sorted({l for ls in modified.values() for l in ls})
    if not comps or not layers:
        return None
    return AblationConfig.from_dict({"components": comps, "ablate": [{"layer": l, "measurement": measurement} for l in layers]},
                                    source="inferred from the changed weights")


def _writes(pr_h, pr_a) -> tuple[dict[str, list[float]], list[float]]:
    """Per component group and layer: mean write along r at the last prompt token, harmful minus harmless."""
    def d(name):
        return (getattr(pr_h, name).mean(0) - getattr(pr_a, name).mean(0)).astype(float)

    L = pr_h.n_layers
    moe = set(pr_h.moe_layers)
    mlp = d("mlp_last")
    out = {"attn_out": d("attn_last").tolist(),
           "mlp_down": [float(mlp[l]) if l not in moe else 0.0 for l in range(L)],
           "shared_down": d("shared_last").tolist()}
    if pr_h.n_experts:
        out["experts_down"] = d("expert_last").sum(-1).tolist()
    resid = d("resid_last").tolist()
    out["embed"] = [resid[0]] + [0.0] * (L - 1)
    return out, resid


def run_audit(opts: RunOptions, write: bool = True) -> dict:
    """Run every check on ``opts.model_dir`` and return the results document (and write the outputs)."""
    ctx = RunContext(opts)
    refuse_before_loading(opts, write)
    with ctx.stage("inputs"):
        jd = make_judge(opts.judge)  # a bad --judge fails before any model is read
        abl = ModelDir(opts.model_dir)
        manifest = load_manifest(abl.path)
        base_path = opts.base or (manifest or {}).get("base", {}).get("path")
        if base_path is None:
            raise AuditError(f"{abl.path}: no ablation-manifest.json names its base; pass --base BASE (the model it was ablated from)")
        base = ModelDir(base_path)
        inputs = [abl.path, base.path, opts.config, opts.gate, opts.harmful, opts.harmless, opts.directions]
        if write:
            check_destination(opts.out, inputs + [opts.apply_fix], opts.force)
        if opts.apply_fix:
            check_destination(opts.apply_fix, inputs + ([opts.out] if write else []), opts.force)
        if base.layout.family != abl.layout.family:
            raise AuditError(f"{abl.path} is {abl.layout.family} but its base {base.path} is {base.layout.family}; pass the right --base")
        dirs_near = [abl.path, base.path]
        harmful_src = prompt_source(opts.harmful, "harmful", dirs_near)
        harmless_src = prompt_source(opts.harmless, "harmless", dirs_near)
        harmful = load_prompts(harmful_src, "harmful")[: opts.limit]
        harmless = load_prompts(harmless_src, "harmless")[: opts.limit]
        tok = base.tokenizer()
        budget = token_budget(base.config, opts.max_new_tokens)
        harmful, cut_h = fit_to_context(tok, harmful, budget)
        harmless, cut_a = fit_to_context(tok, harmless, budget)
        same_tokenizer(abl, base, tok, harmful + harmless)
        ctx.prompts_cut = {"harmful": cut_h, "harmless": cut_a, "token_budget": budget}
        if cut_h or cut_a:
            ctx.say(f"[audit] {cut_h} harmful and {cut_a} harmless prompt(s) cut to {budget} tokens (the model's context minus --max-new-tokens, "
                    f"at most {MAX_PROMPT_TOKENS})")
        intent_cfg = None
        if opts.config:  # the user's statement of intent wins over a manifest
            intent_cfg = load_config(opts.config)
        elif manifest is not None:
            intent_cfg = AblationConfig.from_dict(manifest["config"], source=str(abl.path / "ablation-manifest.json"))
        gate_cfg, gate_source = gate_config(opts.gate)  # a bad gate file fails now, not after the forward passes
        if opts.device == "auto":  # the offload folder is checked now too (never in an input), before any model loads
            remove_scratch(scratch_folder(offload_parent(opts), "audit-offload", inputs))
        elif opts.max_memory or opts.offload_folder:
            raise AuditError("--max-memory and --offload-folder place the models through accelerate's device map: pass --device auto with them")
        servers = open_servers(opts, abl, base, tok, harmful + harmless)
    with ctx.stage("directions"):
        directions = None
        cfg_meas = resolve_measurements(intent_cfg) if opts.config and intent_cfg is not None else None
        man_meas = abl.path / manifest.get("directions_file", DIRECTIONS_NAME) if manifest is not None else None
        if opts.directions:
            directions = load_directions(opts.directions)
        elif cfg_meas is not None and cfg_meas.is_file():  # the stated config's own measurement first
            directions = load_directions(cfg_meas)
        elif man_meas is not None and man_meas.is_file():
            directions = load_directions(man_meas)
        directions_source = "given" if opts.directions else "ablation" if directions is not None else "measured on the base"
        if directions is None:
            th = load_prompts(train_source(opts.harmful, "harmful", dirs_near), "harmful")
            ta = load_prompts(train_source(opts.harmless, "harmless", dirs_near), "harmless")
            directions = measure_directions(base, th, ta, batch_size=opts.batch_size, device=opts.device, dtype=opts.dtype,
                                            max_memory=opts.max_memory, offload_folder=offload_parent(opts), inputs=inputs,
                                            progress=False if opts.quiet else None)
        if directions.hidden_size != base.layout.hidden_size:
            raise AuditError(f"directions have hidden size {directions.hidden_size}, the model {base.layout.hidden_size}; measure them on this base")
    with ctx.stage("weights"):
        weights_record: dict = {}
        static = static_audit(abl.path, base.path, config=opts.config, directions=directions, record=weights_record)
    weights = static["weights"].to_dict()
    for f in weights["findings"]:
        if f["code"] == "base-changed":
            ctx.say(f"[audit] WARNING: {f['message']}")
    modified = weights["data"].get("modified", {})
    present = weights["data"].get("present", {})
    separating = directions.separating_index()
    ref_index = _reference_index(intent_cfg, static["recovery"].to_dict())
    if intent_cfg is None:
        intent_cfg = _config_from_changes(modified, ref_index if ref_index is not None else separating)
    r = directions.refusal_dir[ref_index if ref_index is not None else separating]


    refusal_ids = refusal_token_ids(tok)
    prompts = {"harmful": harmful, "harmless": harmless}
    with ctx.stage("ablated model: load"):
        m_abl = load_model(abl, opts, ctx, inputs)
    gen_a = servers.get("abl") or LocalBackend(m_abl, tok)
    pa = measure(m_abl, tok, prompts, r, gen_a, opts.max_new_tokens, opts.batch_size, refusal_ids, keep_answer_dists=True,
                 stage=lambda n, total=None: ctx.stage(f"ablated model: {n}", total))
    del m_abl, gen_a  # one model resident at a time: what the base side needs is in pa, sized by prompts
    release()
    with ctx.stage("base model: load"):
        m_base = load_model(base, opts, ctx, inputs)
    gen_b = servers.get("base") or LocalBackend(m_base, tok)
    pb = measure(m_base, tok, prompts, r, gen_b, opts.max_new_tokens, opts.batch_size, refusal_ids,
                 against=(pa.completions["harmless"], pa.answer_dists), stage=lambda n, total=None: ctx.stage(f"base model: {n}", total))
    del gen_b
    ctx.servers = {side: be.checks for side, be in servers.items()}
    probes = {(side, k): ps.probes[k] for side, ps in (("base", pb), ("abl", pa)) for k in prompts}
    mod_experts = [[l, e] for l in modified.get("experts_down", []) for e in range(base.layout.n_routed_experts)]
    routing = routing_check(probes["base", "harmful"], probes["base", "harmless"], probes["abl", "harmful"], modified_experts=mod_experts or None,
                            router_modified=modified.get("router") or None, position="last")
    contribution = contribution_check(probes["base", "harmful"], probes["abl", "harmful"], harmless_before=probes["base", "harmless"], harmless_after=probes["abl", "harmless"])
    writes_before, resid_before = _writes(probes["base", "harmful"], probes["base", "harmless"])
    writes_after, resid_after = _writes(probes["abl", "harmful"], probes["abl", "harmless"])
    peak = max(abs(x) for x in resid_before) or 1.0
    contribution.data["residual_left_max"] = max(max(0.0, a) / peak for a in resid_after)
    completions = {(side, k): ps.completions[k] for side, ps in (("base", pb), ("abl", pa)) for k in prompts}
    with ctx.stage("judgements"):
        judged = {k: jd.many([x.answer for x in v], [x.prompt for x in v], [x.finish_reason == "length" for x in v]) for k, v in completions.items()}
    refusal = refusal_check(judged["abl", "harmful"], judged["base", "harmful"], judged["abl", "harmless"], judged["base", "harmless"])
    before_rate = (refusal.data.get("before") or {}).get("rate")
    if before_rate is not None and before_rate < 0.5:
        refusal.findings.append(Finding("base-does-not-refuse", WARN,
                                        f"the base model refuses only {before_rate:.0%} of these harmful prompts: the refusal numbers cannot show "
                                        "what the ablation removed; use prompts the base refuses (--harmful) and check its chat template",
                                        value=before_rate, threshold=0.5))
        refusal.status = WARN if refusal.status == "pass" else refusal.status
    refusal.data["samples"] = [{"prompt": x.prompt, "completion": x.answer, "reasoning": x.reasoning, "finish_reason": x.finish_reason,
                                "n_tokens": x.n_tokens, "label": jm.label, "reason": jm.reason, "score": jm.score,
                                "when": "before" if m == "base" else "after", "set": k}
                               for (m, k), xs in completions.items() for x, jm in zip(xs, judged[m, k])]
    kl1 = kl_rows(pb.first_logprobs_harmless, pa.first_logprobs_harmless).tolist()
    damage = damage_check(kl1, pb.kl_tf, judged["abl", "harmless"] + judged["abl", "harmful"])

    checks = {**static, "routing": routing, "contribution": contribution, "refusal": refusal, "damage": damage}
    checks_d = {name: cr.to_dict() for name, cr in checks.items()}
    doc = {"checks": checks_d}
    gate = evaluate_gate(doc, gate_cfg, gate_source)

    # -- diagnosis ---------------------------------------------------------------------------
    done = reached_ablation(weights_record, directions)  # what really reached the weights, as a config
    fix_base, fix_dirs = done.config, done.directions
    rates = refusal.data
    refusal_after = (rates.get("after") or {}).get("rate")
    target = gate_cfg.max_refusal_after if gate_cfg.max_refusal_after is not None else MAX_REFUSAL_AFTER
    dmg = damage.data
    degenerate = (dmg.get("degenerate") or {}).get("rate") or 0.0
    nonfinite = any(f.code == "nan-inf" for f in damage.findings) or any(f["code"] == "nan-inf" for f in weights["findings"])
    damage_first = degenerate >= MAX_DEGENERATE or nonfinite
    damage_rows = [t for t in gate["thresholds"] if t["passed"] is False and t["name"] in ("max_kl", "max_degenerate", "max_over_refusal", "check:damage")]
    damaged = next((f.message for f in damage.findings if f.severity == "fail"), None) or (
        "; ".join(t["message"] for t in damage_rows) if damage_rows else None)
    if nonfinite and not damaged:
        damaged = "NaN/Inf in the ablated weights or its outputs"
    sim = None
    bypass = reproduction = None
    if opts.simulate and not gate["passed"]:
        with ctx.stage("simulation: calibration and bypass test"):
            labels = [x.refused for side in ("base", "abl") for k in prompts for x in judged[side, k]]
            scores = torch.cat([ps.refusal_scores[k] for ps in (pb, pa) for k in prompts])
            sim = Simulator(m_base, tok, harmful, harmless, scores, labels, jd, opts, directions, base.layout, refusal_ids,
                            lp_harmless=pb.first_logprobs_harmless)
            sim.opts_target = target
            sim.max_kl = gate_cfg.max_kl if gate_cfg.max_kl is not None else float("inf")
            if sim.calibration is not None:
                bypass = sim.bypass_scan(ref_index)
                separating = bypass["best_index"]
                reproduction = sim.reproduce(fix_base, fix_dirs, refusal_after)
    with ctx.stage("diagnosis"):
        findings = [f for cr in checks_d.values() for f in cr["findings"]]
        mism = next((f for f in findings if f["code"] == "direction-mismatch"), None)
        partial, scales = {}, {}
        for e in (fix_base.entries if fix_base is not None else []):
            scales.setdefault(e.layer, []).append(e.scale * fix_base.scale)
            if e.experts is not None and set(e.components or fix_base.components) & {"experts_down", "experts_gate", "experts_up"}:
                partial.setdefault(e.layer, set()).update(e.experts)
        ev = {
            "modified": modified, "present": present, "moe_layers": base.layout.moe_layers, "n_experts": base.layout.n_routed_experts,
            "writes_before": writes_before, "writes_after": writes_after,
            "residual_before": resid_before, "residual_after": resid_after,
            "refusal_experts": next((f["experts"] for f in findings if f["code"] == "refusal-experts"), []),
            "compensation": any(f["code"] == "routing-compensation" for f in findings),
            "router_modified": bool(modified.get("router")),
            "router_ineffective": any(f["code"] == "router-ineffective" for f in findings),
            **_suppress_evidence(base.layout.family), "suppressed": _suppressed(fix_base),
            "intended": weights["data"].get("intended", {}),
            "intent_source": weights_record.get("intent_source", "inferred"),
            "partial_experts": {l: sorted(es) for l, es in partial.items()},
            "reached_scales": scales,
            "separating_index": separating, "ablated_index": ref_index,
            "quality": {row["index"]: row["quality"] for row in directions.quality_table()},
            "bypass": {int(k): v["rate"] for k, v in bypass["indices"].items()} if bypass else None,
            "bypass_kl": {int(k): v["kl"] for k, v in bypass["indices"].items()} if bypass else None,
            "refusal_target": target,
            "direction_cos_separating": _cos(directions, ref_index, separating) if ref_index is not None else (mism["evidence"].get("cosine") if mism else None),
            "findings": [f for f in findings if f["code"] in ("weak-scale", "precision-loss", "intended-untouched", "no-change", "unintended-modified")],
            "damaged": damaged, "damage_first": damage_first, "degenerate_share": degenerate, "nonfinite": nonfinite,
        }
        diag = diagnose(ev)
        causes = diag["causes"]
        if refusal_after is not None and refusal_after <= target:  # refusal is gone: only soundness problems remain
            for c in causes:
                if c.explains_refusal:
                    diag["not_blamed"].append({"component": c.numbers.get("component", c.title), "reason": f"{c.summary} But refusal is already {refusal_after:.0%}: "
                                                                               "this does not limit the ablation."})
            causes = [c for c in causes if not c.explains_refusal]
    sim_info = None
    if sim is not None and sim.calibration is not None and causes:
        with ctx.stage("simulation: candidate fixes"):
            sim_info = sim.search(causes, fix_base, fix_dirs, refusal_after, bypass=bypass["indices"] if bypass else None, ablated_index=ref_index)
            causes = rank_by_simulation(causes, refusal_target=target, damage_first=damage_first)
    if sim is not None:
        sim_info = {**(sim_info or {}), "calibration": sim.calibration.to_dict() if sim.calibration else None, "bypass": bypass,
                    "note": sim.note, "seconds": round(sim.seconds, 3), "reached": done.to_dict(), "reproduction": reproduction}
    if not gate["passed"] and not causes:  # never a failure without a cause
        causes = [_unexplained(gate, rates, bypass, ref_index, separating, target)]
    for cz in causes:
        if cz.fix.get("patch") is not None and set(cz.fix["patch"]) - {"dtype"}:
            try:
                cz.fix["config_yaml"] = config_yaml(apply_patch(fix_base if fix_base is not None else _empty_config(), cz.fix["patch"]))
                if done.extra_rows:
                    cz.fix["note"] = (f"indices {sorted(done.extra_rows)} are the ablation's own directions (no measured index matches them); "
                                      "--apply-fix writes them into the fixed model's directions.safetensors")
            except AuditError as e:
                cz.fix["config_yaml"] = None
                cz.fix["note"] = f"this fix cannot be written as a config: {e}"

    verdict = "pass" if gate["passed"] else "fail"
    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "moe-ablation-audit", "version": version()},
        "run": run_info(opts, ctx, abl, base, harmful_src, harmless_src, len(harmful), len(harmless), directions_source, separating, ref_index,
                         "config" if opts.config else "manifest" if manifest else "inferred", gate_source),
        "model": {"path": str(abl.path.resolve()), "base": str(base.path.resolve()), **base.layout.summary()},  # the schema's model.path
        "verdict": verdict,
        "headline": headline(verdict, rates, causes),
        "causes": [cz.to_dict() for cz in causes],
        "not_blamed": diag["not_blamed"],
        "simulation": sim_info,
        "checks": checks_d,
        "gate": gate,
    }
    if opts.apply_fix and causes and verdict == "fail" and causes[0].fix.get("config_yaml"):
        results["applied_fix"] = _apply_fix(causes[0], fix_base if fix_base is not None else _empty_config(), fix_dirs, base, opts, results)
    results["run"]["judge"] = jd.about()  # which judge labelled the completions, and its measured accuracy
    results = jsonable(results)
    results["run"]["seconds"] = round(time.time() - ctx.t0, 3)
    if write:
        write_outputs(results, opts.out, inputs=inputs + [opts.apply_fix], force=opts.force)
    return results


def _suppress_evidence(family: str) -> dict:
    """The suppress-at-the-router fix family's strengths and unit for this family (none when its router cannot be edited so)."""
    rule = SUPPRESS_RULES.get(family)
    return {"suppress_strengths": list(SUPPRESS_STRENGTHS[rule]), "suppress_unit": SUPPRESS_UNITS[rule]} if rule else {}


def _suppressed(cfg) -> dict | None:
    """The router suppression that reached the weights (audit/intent/reached.py), for the diagnosis."""
    sup = cfg.suppressed() if cfg is not None else {}
    return {"experts": [[l, e] for l, es in sup.items() for e in es], "strength": cfg.suppress_strength} if sup else None


def _empty_config():
    return AblationConfig([], (), source="nothing reached the weights")


def _unexplained(gate, rates, bypass, ablated_index, separating, target):
    """The cause a failed verdict names when no evidence-backed cause is left, from what failed (never a failure without one)."""
    failed = [t for t in gate["thresholds"] if t["passed"] is False]
    names = {t["name"] for t in failed}
    ev = [t["message"] for t in failed][:5]
    after = (rates.get("after") or {}).get("rate")
    refusal_left = after is not None and after == after and after > target
    if refusal_left or names & {"max_refusal_after", "min_drop"}:
        if bypass and any(v["rate"] <= target for v in bypass["indices"].values()):
            return Cause("direction-mismatch", 0.3, f"The gate failed ({', '.join(sorted(names))}) and no single cause was proven; ablating every "
                         f"residual writer at every layer with the direction at index {separating} removes refusal in the simulation.", evidence=ev,
                         fix={"summary": f"ablate every residual writer at every layer, measurement {separating}", "patch": {"measurement": separating},
                              "candidates": []})
        return Cause("direction-mismatch", 0.2, f"The gate failed ({', '.join(sorted(names))}); no evidence here names a cause"
                     + (" and no measured direction removes refusal even when every writer of every layer is ablated: refusal may not "
                        "ride on one direction at these indices, or these prompts do not elicit it" if bypass else " (the fixes were not simulated)") + ".",
                     evidence=ev, fix={"summary": "measure directions on prompts the base refuses (--harmful), at other indices; check the "
                                                  "judge's labels in the report", "patch": {}, "candidates": []})
    if names & {"max_kl", "max_degenerate", "max_over_refusal", "max_unknown", "check:damage"}:
        return Cause("model-damaged", 0.5, "The ablation moved what the model says on harmless prompts beyond the gate: " + "; ".join(ev[:3]) + ".",
                     evidence=ev, explains_refusal=False,
                     fix={"summary": "ablate fewer components or layers, or lower the scale; compare the completions in the report", "patch": {}, "candidates": []})
    if "check:projection" in names:
        return Cause("weak-scale", 0.4, "Refusal is gone, but tensors the ablation edited still carry r above tolerance (the projection check "
                     "failed): the edit did not remove what it meant to.", evidence=ev, explains_refusal=False,
                     fix={"summary": "use scale: 1.0 and sparsity: 0.0 (or waive the projection check in the gate if the residue is intended)",
                          "patch": {"scale": 1.0, "sparsity": 0.0}, "candidates": []})
    if names & {"forbid_unintended", "must_ablate", "check:weights", "check:recovery"}:
        return Cause("unintended-modification", 0.3, "The weights do not match what the gate asks of them: " + "; ".join(ev[:3])
                     + (". Without a stated intent nothing can be called intended or not: pass --config (the ablation's YAML), or mark "
                        "forbid_unintended optional in the gate" if "forbid_unintended" in names else "") + ".",
                     evidence=ev, explains_refusal=False, fix={"summary": "pass --config with the ablation's YAML, or re-ablate with `audit ablate` "
                                                                          "(its manifest states the intent)", "patch": {}, "candidates": []})
    return Cause("model-damaged", 0.2, f"The gate failed ({', '.join(sorted(names))}) and no cause was named: see the failed checks.", evidence=ev,
                 explains_refusal=False, fix={"summary": "see the failed checks in the report", "patch": {}, "candidates": []})


def _apply_fix(cause, config, directions, base, opts, results) -> dict:
    """Re-ablate the base with the top cause's fix (our ablation), re-audit it, record both."""
    new = apply_patch(config, cause.fix.get("patch", {}) if hasattr(cause, "fix") else {})
    ablate(base.path, new, opts.apply_fix, directions=directions, force=opts.force)
    sub = RunOptions(**{**opts.__dict__, "model_dir": opts.apply_fix, "base": str(base.path), "config": None, "apply_fix": None,
                        "simulate": False, "out": str(Path(opts.out) / "applied-fix"), "directions": None,
                        "server": None, "served_model": None})  # the base server, if any, still serves this base
    again = run_audit(sub, write=False)
    rates = again["checks"]["refusal"]["data"]
    after = rates.get("after") or {}
    applied = {"cause": cause.id, "model_dir": str(Path(opts.apply_fix).resolve()), "verdict": again["verdict"],
               "refusal_rate": after.get("rate"), "interval": [after.get("lo"), after.get("hi")], "report": "applied-fix/report.html"}
    for c in results["causes"]:
        if c["id"] == cause.id:
            c["applied"] = applied
    results["_applied_results"] = again
    return applied




