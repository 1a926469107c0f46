"""`audit run`: every check, the diagnosis with each fix simulated, the gate, and the three output files.

Stages (each timed into results.json): inputs -> directions -> weights (static, streamed) ->
probes (routing and writes along r, base and ablated) -> completions and judgements -> damage ->
diagnosis -> simulated fixes -> gate -> report.html / results.json / junit.xml. Optionally the top
fix is applied with our ablation and re-audited (``apply_fix``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from audit.ablation.ablate import ablate
from audit.forward.capability import CapabilitySpec
from audit.forward.damage import kl_rows
from audit.forward.estimate import refusal_token_ids
from audit.forward.generate import LocalBackend
from audit.forward.measure import measure_directions
from audit.forward.passes import measure
from audit.intent.config import AblationConfig, load_config, resolve_measurements
from audit.intent.directions import load_directions
from audit.intent.fixes import config_yaml
from audit.intent.manifest import DIRECTIONS_NAME
from audit.intent.reached import reached as reached_ablation
from audit.judgement.extend import extend_truncated
from audit.judgement.judges import make_judge
from audit.judgement.record import add_judgement_records
from audit.model.hashes import hash_inputs
from audit.model.prompts import MAX_PROMPT_TOKENS, context_length, fit_to_context, load_categories, load_prompts, token_budget
from audit.outputs import check_destination, remove_scratch, scratch_folder
from audit.pipeline.controls import run_controls
from audit.pipeline.explain import explain, reference_index
from audit.pipeline.gate_file import gate_config, gate_record
from audit.pipeline.inputs import (load_model, offload_parent, open_models, open_servers, prompt_source, release, run_inputs,
                                   same_tokenizer, train_source)
from audit.pipeline.options import RunContext, RunOptions, refuse_before_loading
from audit.pipeline.summary import headline, run_info, version
from audit.pipeline.write import write_outputs
from audit.weights.static_audit import static_audit
from checks.capability import capability_check
from checks.contribution import contribution_check
from checks.controls import control_checks, control_gate, noop_check
from checks.errors import AuditError
from checks.findings import WARN, Finding, jsonable
from checks.gate import evaluate_gate
from checks.generation_health import health_check
from checks.multiturn import multiturn_check
from checks.refusal_eval import damage_check, refusal_check
from checks.routing import routing_check
from reports.results_io import SCHEMA_VERSION

def run_audit(opts: RunOptions, write: bool = True, ctx: RunContext | None = None) -> dict:
    """Run every check on ``opts.model_dir`` and return the results document (and write the outputs)."""
    ctx = ctx or RunContext(opts)  # a caller may pass its own to look at what the run kept (ctx.kept: benchmarks/bench_fix.py)
    refuse_before_loading(opts, write)
    with ctx.stage("inputs"):
        jd = make_judge(opts.judge)  # a bad --judge fails before any model is read
        jd2 = make_judge(opts.second_judge) if opts.second_judge else None
        abl, base, manifest, intent_dir = open_models(opts)  # a GGUF file too (audit/model/gguf_file.py)
        inputs = [abl.path, base.path, opts.config, opts.gate, opts.harmful, opts.harmless, opts.directions, opts.against,
                  opts.capability if opts.capability and Path(opts.capability).is_file() else None]
        if write:
            check_destination(opts.out, inputs + [opts.apply_fix], opts.force)
        if opts.apply_fix:
            check_destination(opts.apply_fix, inputs + ([opts.out] if write else []), opts.force)
        if base.layout.family != abl.layout.family:
            raise AuditError(f"{abl.path} is {abl.layout.family} but its base {base.path} is {base.layout.family}; pass the right --base")
        dirs_near = [p for p in (abl.path, base.path, intent_dir) if p is not None]
        harmful_src = prompt_source(opts.harmful, "harmful", dirs_near)
        harmless_src = prompt_source(opts.harmless, "harmless", dirs_near)
        harmful = load_prompts(harmful_src, "harmful")[: opts.limit]
        harmless = load_prompts(harmless_src, "harmless")[: opts.limit]
        categories = {k: (c or [])[: opts.limit] for k, c in (("harmful", load_categories(harmful_src)), ("harmless", load_categories(harmless_src)))}
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
            intent_cfg = AblationConfig.from_dict(manifest["config"], source=str(intent_dir / "ablation-manifest.json"))
        gate_cfg, gate_source = gate_config(opts.gate)  # a bad gate file fails now, not after the forward passes
        if opts.gate_overrides:  # `audit fix --target-refusal / --max-kl`
            gate_cfg, gate_source = gate_cfg.with_limits(**opts.gate_overrides), f"{gate_source} + {opts.gate_overrides}"
        if opts.device == "auto":  # the offload folder is checked now too (never in an input), before any model loads
            remove_scratch(scratch_folder(offload_parent(opts), "audit-offload", inputs))
        elif opts.max_memory or opts.offload_folder:
            raise AuditError("--max-memory and --offload-folder place the models through accelerate's device map: pass --device auto with them")
        servers = open_servers(opts, abl, base, tok, harmful + harmless)
        # damage beyond KL (issue 29): the capability items are read now, so a bad --capability fails before any model loads
        capability = CapabilitySpec.from_flag(opts.capability, opts.capability_format, context_length(base.config), opts.capability_limit)
    with ctx.stage("hashes"):  # the bytes this verdict is about (audit/model/hashes.py; `audit verify` re-checks them)
        hashes = hash_inputs(run_inputs(opts, abl, base, intent_dir, harmful_src, harmless_src, gate_source, intent_cfg if opts.config else None))
    with ctx.stage("directions"):
        directions = None
        cfg_meas = resolve_measurements(intent_cfg) if opts.config and intent_cfg is not None else None
        man_meas = intent_dir / manifest.get("directions_file", DIRECTIONS_NAME) if manifest is not None else None
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
        static = static_audit(abl.path, base.path, config=opts.config, directions=directions, record=weights_record, against=opts.against,
                              same_ok=opts.control)
    weights = static["weights"].to_dict()
    for f in weights["findings"]:
        if f["code"] == "base-changed":
            ctx.say(f"[audit] WARNING: {f['message']}")
    modified = weights["data"].get("modified", {})
    separating = directions.separating_index()
    ref_index = reference_index(intent_cfg, static["recovery"].to_dict())
    r = directions.refusal_dir[ref_index if ref_index is not None else separating]


    refusal_ids = refusal_token_ids(tok)
    prompts = {"harmful": harmful, "harmless": harmless}
    extensions: dict = {}  # per "model/set": cut-off answers generated further before judging (audit/judgement/extend.py)

    def extender(side, gen):
        def one(k, ps, cs):
            out, ext = extend_truncated(gen, ps, cs, jd, opts.max_new_tokens, opts.cap(), opts.batch_size)
            extensions[f"{side}/{k}"] = ext.to_dict()
            return out
        return one

    with ctx.stage("ablated model: load"):
        m_abl = load_model(abl, opts, ctx, inputs)
    gen_a = servers.get("abl") or LocalBackend(m_abl, tok)
    pa = measure(m_abl, tok, prompts, r, gen_a, opts.max_new_tokens, opts.batch_size, refusal_ids, keep_answer_dists=True,
                 stage=lambda n, total=None: ctx.stage(f"ablated model: {n}", total), extend=extender("abl", gen_a), capability=capability,
                 multi_turn=opts.multi_turn)
    del m_abl, gen_a  # one model resident at a time: what the base side needs is in pa, sized by prompts
    release()
    with ctx.stage("base model: load"):
        m_base = load_model(base, opts, ctx, inputs)
    gen_b = servers.get("base") or LocalBackend(m_base, tok)
    pb = measure(m_base, tok, prompts, r, gen_b, opts.max_new_tokens, opts.batch_size, refusal_ids,
                 against=(pa.forced_harmless, pa.answer_dists), stage=lambda n, total=None: ctx.stage(f"base model: {n}", total),
                 extend=extender("base", gen_b), capability=capability, multi_turn=opts.multi_turn)
    del gen_b
    ctx.servers = {side: be.checks for side, be in servers.items()}
    probes = {(side, k): ps.probes[k] for side, ps in (("base", pb), ("abl", pa)) for k in prompts}
    mod_experts = [[l, e] for l in modified.get("experts_down", []) for e in range(base.layout.n_routed_experts)]
    routing = routing_check(probes["base", "harmful"], probes["base", "harmless"], probes["abl", "harmful"], modified_experts=mod_experts or None,
                            router_modified=modified.get("router") or None, position="last")
    contribution = contribution_check(probes["base", "harmful"], probes["abl", "harmful"], harmless_before=probes["base", "harmless"],
                                      harmless_after=probes["abl", "harmless"])
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
                                "n_tokens": x.n_tokens, "extended_from": x.extended_from, "label": jm.label, "reason": jm.reason, "score": jm.score,
                                "when": "before" if m == "base" else "after", "set": k,
                                **({"category": categories[k][i]} if i < len(categories[k]) else {})}
                               for (m, k), xs in completions.items() for i, (x, jm) in enumerate(zip(xs, judged[m, k]))]
    judged2 = None
    if jd2 is not None:
        with ctx.stage("second judge"):
            judged2 = {k: jd2.many([x.answer for x in v], [x.prompt for x in v], [x.finish_reason == "length" for x in v]) for k, v in completions.items()}
    add_judgement_records(refusal, completions, judged, extensions, categories, jd, jd2, judged2)
    kl1 = kl_rows(pb.first_logprobs_harmless, pa.first_logprobs_harmless).tolist()
    damage = damage_check(kl1, pb.kl_tf, judged["abl", "harmless"] + judged["abl", "harmful"])

    checks = {**static, "routing": routing, "contribution": contribution, "refusal": refusal, "damage": damage,
              **damage_beyond_kl(pb, pa, completions, judged, jd, capability, gate_cfg)}
    checks_d = {name: cr.to_dict() for name, cr in checks.items()}  # the gate reads what results.json will hold (NaN included)
    gate = evaluate_gate({"checks": checks_d}, gate_cfg, gate_source)
    if opts.control:  # the no-op control: nothing was meant to be removed; the noop check decides (checks/controls.py)
        checks_d["noop"] = noop_check(checks_d["weights"], checks_d["damage"], checks_d["refusal"]).to_dict()
        gate = control_gate(gate, checks_d["noop"])
        checks_d = control_checks(checks_d)

    done = reached_ablation(weights_record, directions)  # what really reached the weights, as a config
    scores = torch.cat([ps.refusal_scores[k] for ps in (pb, pa) for k in prompts])
    why = explain(ctx, opts, checks_d, gate, gate_cfg, done, directions, base.layout, base.layout.summary(), ref_index, m_base, tok, prompts,
                  judged, scores, jd, refusal_ids, pb.first_logprobs_harmless)
    causes = why.causes
    # the random-direction control: the reached edits with a direction orthogonal to r, as hooks on the base (issue 29)
    checks_d["controls"] = run_controls(ctx, opts, done, directions, base.layout, m_base, tok, prompts, judged, scores, jd, refusal_ids,
                                        pb.first_logprobs_harmless, checks_d["refusal"], checks_d["damage"]).to_dict()
    verdict = "pass" if gate["passed"] else "fail"
    rates = refusal.data
    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "moe-ablation-audit", "version": version()},
        "run": run_info(opts, ctx, abl, base, harmful_src, harmless_src, len(harmful), len(harmless), directions_source,
                        why.evidence.separating_index, ref_index, "config" if opts.config else "manifest" if manifest else "inferred", gate_source),
        "model": {"path": str(abl.path.resolve()), "base": str(base.path.resolve()), **base.layout.summary()},  # the schema's model.path
        "verdict": verdict,
        "headline": headline(verdict, rates, why.conclusion),
        "diagnosis": why.conclusion,
        "causes": [cz.to_dict() for cz in causes],
        "not_blamed": why.not_blamed,
        "simulation": why.simulation,
        "reached_config": config_yaml(done.config) if done.config is not None else None,
        "checks": checks_d,
        "gate": gate,
        "inputs": hashes,
    }
    results["run"].update(options=opts.record(), gate_config=gate_record(gate_cfg, gate_source))
    if why.fix_search is not None:
        best = why.fix_search.pop("best_config")
        results["fix_search"] = why.fix_search
        if best is not None:
            results["applied_fix"] = _apply_fix(best, why.fix_search["best"], done.directions, base, opts, results)
    if opts.control:  # the headline of a no-op control says what a control shows, not how much refusal an ablation removed
        results["headline"], results["run"]["control"] = checks_d["noop"]["summary"], "noop"
    results["run"]["judge"] = jd.about()  # which judge labelled the completions, and its measured accuracy
    if jd2 is not None:
        results["run"]["second_judge"] = jd2.about()
    results = jsonable(results)
    results["run"]["seconds"] = round(time.time() - ctx.t0, 3)
    if write:
        write_outputs(results, opts.out, inputs=inputs + [opts.apply_fix], force=opts.force)
    return results


FIX_CONFIG_NAME = "fix-config.yaml"  # the applied config, as `audit ablate --config` and llm-abliteration read it


def _apply_fix(config, trial: dict, directions, base, opts, results) -> dict:
    """Ablate the base with the search's best config (our ablation, written as llm-abliteration YAML beside its manifest),
    re-audit it from disk, record both: the measured verdict, not the simulated one."""
    ablate(base.path, config, opts.apply_fix, directions=directions, force=opts.force, extra_files={FIX_CONFIG_NAME: config_yaml(config)})
    sub = RunOptions(**{**opts.__dict__, "model_dir": opts.apply_fix, "base": str(base.path), "config": None, "apply_fix": None,
                        "simulate": False, "out": str(Path(opts.out) / "applied-fix"), "directions": None,
                        "server": None, "served_model": None, "against": None})  # the base server, if any, still serves this base
    again = run_audit(sub, write=False)
    rates = again["checks"]["refusal"]["data"]
    after = rates.get("after") or {}
    applied = {"cause": trial.get("origin") or None, "trial": trial["n"], "label": trial["label"], "model_dir": str(Path(opts.apply_fix).resolve()),
               "config": FIX_CONFIG_NAME, "verdict": again["verdict"], "simulated_refusal": trial.get("refusal"), "refusal_rate": after.get("rate"),
               "interval": [after.get("lo"), after.get("hi")], "kl": ((again["checks"]["damage"]["data"] or {}).get("first_token") or {}).get("mean"),
               "report": "applied-fix/report.html"}
    for c in results["causes"]:
        if c["id"] == applied["cause"]:
            c["applied"] = applied
    results["_applied_results"] = again
    return applied


def damage_beyond_kl(pb, pa, completions: dict, judged: dict, jd, capability, gate_cfg) -> dict:
    """The capability, generation-health and multi-turn checks from both models' passes (issue 29)."""
    out = {}
    tasks = {}
    for name, b in (pb.capability or {}).items():
        a = (pa.capability or {})[name]
        if b["scored"] != a["scored"]:
            raise AuditError(f"capability task {name}: the two models scored different items ({len(b['scored'])} and {len(a['scored'])}); "
                             "they must share a tokenizer and context length")
        tasks[name] = {"before": b["correct"], "after": a["correct"], "chance": b["chance"], "source": capability.source if capability else None,
                       "skipped": b["skipped"], "skipped_why": "longer than the model's context", "questions": b["questions"]}
    limit = gate_cfg.limits.get("max_capability_drop")  # the check's own fail line follows the gate's limit where one is set
    out["capability"] = capability_check(tasks, {"drop": limit} if limit is not None else None,
                                         why_not=None if capability is not None else "no capability items (--capability none)")
    if capability is not None and not any(t["before"]["acc"] for t in tasks.values()):
        out["capability"].summary = f"no item fits the model's context ({sum(t['skipped'] for t in tasks.values())} items not scored)"
    answers = {(side, k): [{"prompt": x.prompt, "answer": x.answer, "finish_reason": x.finish_reason, "refused": j.refused}
                           for x, j in zip(completions[side, k], judged[side, k])] for side, k in completions}
    out["health"] = health_check(answers)
    turn2 = {}
    for side, ps in (("base", pb), ("abl", pa)):
        for k, comps in (ps.second_turn or {}).items():
            turn2[side, k] = jd.many([x.answer for x in comps], [x.prompt for x in comps], [x.finish_reason == "length" for x in comps])
    out["multiturn"] = multiturn_check(turn2, gate_cfg.limits.get("max_refusal_after") or 0.10, gate_cfg.limits.get("max_over_refusal") or 0.10)
    if turn2:
        out["multiturn"].data["samples"] = [{"prompt": x.prompt, "completion": x.answer, "reasoning": x.reasoning, "label": jm.label,
                                             "reason": jm.reason, "when": "before" if side == "base" else "after", "set": f"{k}, turn 2"}
                                            for side, ps in (("base", pb), ("abl", pa)) for k, comps in (ps.second_turn or {}).items()
                                            for x, jm in zip(comps, turn2[side, k])]
    return out

