"""`audit run`: every check, the diagnosis with each fix simulated, the gate, and the three output files.

Stages (each timed into results.json): inputs -> directions -> weights (static, streamed) ->
probes (routing and writes along r, base and ablated) -> completions and judgements -> damage ->
diagnosis -> simulated fixes -> gate -> report.html / results.json / junit.xml. Optionally the top
fix is applied with our ablation and re-audited (``apply_fix``).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checks.errors import AuditError


@dataclass
class RunOptions:
    model_dir: str
    base: str | None = None
    config: str | None = None
    gate: str | None = None
    harmful: str | None = None
    harmless: str | None = None
    directions: str | None = None
    out: str = "audit-out"
    force: bool = False
    max_new_tokens: int = 128
    batch_size: int = 16
    limit: int | None = None  # at most this many prompts per set
    simulate: bool = True
    confirm_top: int = 2  # simulated fixes confirmed by full generation
    apply_fix: str | None = None  # write the fixed ablation here, re-audit it
    device: str | None = None  # None / "cpu", a torch device, or "auto": accelerate's device map (GPUs, CPU, disk)
    dtype: str = "auto"  # --dtype: auto (the stored dtype: bf16 stays bf16), float32, bfloat16, float16
    max_memory: dict | None = None  # --max-memory (audit.model_dir.parse_max_memory), with device "auto"
    offload_folder: str | None = None  # --offload-folder: where accelerate's disk offload goes (a temporary of ours inside it)
    server: str | None = None  # OpenAI-compatible server that serves the ablated model (its completions come from there)
    served_model: str | None = None  # the name it serves it under (default: the model directory's path)
    base_server: str | None = None  # OpenAI-compatible server that serves the base model (its completions come from there)
    served_base_model: str | None = None  # the name it serves it under (default: the base directory's path)
    server_timeout: float = 300.0  # seconds one server request may take in all
    quiet: bool = False
    command: str = "audit run"
    judge: str = "rules"  # --judge: rules (default, offline), rules-only, classifier:DIR, server:URL[#MODEL] (audit/judges.py)


@dataclass
class _Ctx:
    opts: RunOptions
    stages: dict = field(default_factory=dict)
    stages_cpu: dict = field(default_factory=dict)  # the same stages in CPU seconds of this process (steady on a shared machine)
    t0: float = field(default_factory=time.time)
    prompts_cut: dict = field(default_factory=dict)  # prompts cut to the token budget, per set
    placement: dict = field(default_factory=dict)  # per model loaded: its dtype and accelerate's device map by device
    servers: dict = field(default_factory=dict)  # per side served ("abl", "base"): what was checked about its server

    def say(self, msg: str) -> None:
        if not self.opts.quiet:
            print(msg, file=sys.stderr, flush=True)

    def stage(self, name: str, total: int | None = None, unit: str = "prompt"):
        """Time a stage into results.json. ``with`` yields ``advance(n)``: with a ``total``, a progress bar on a terminal
        (tqdm, off when stderr is not a TTY or with quiet), where a log gets the stage's name instead."""
        ctx = self

        class _S:
            def __enter__(self):
                self.bar = None
                if total and not ctx.opts.quiet:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, desc=f"[audit] {name}", unit=unit, disable=None, leave=False, file=sys.stderr)
                if self.bar is None or self.bar.disable:
                    ctx.say(f"[audit] {name} ...")
                self.t, self.cpu = time.perf_counter(), time.process_time()
                return self.advance

            def advance(self, n: int = 1) -> None:
                if self.bar is not None:
                    self.bar.update(n)

            def __exit__(self, *exc):
                ctx.stages[name] = round(time.perf_counter() - self.t, 3)
                ctx.stages_cpu[name] = round(time.process_time() - self.cpu, 3)
                if self.bar is not None:
                    self.bar.close()

        return _S()


def _prompt_source(explicit: str | None, kind: str, dirs: list[Path]) -> str | None:
    """--harmful/--harmless win; else a model directory may ship its evaluation prompts as prompts/{kind}.txt."""
    if explicit:
        return explicit
    for d in dirs:
        p = d / "prompts" / f"{kind}.txt"
        if p.is_file():
            return str(p)
    return None


def _train_source(explicit: str | None, kind: str, dirs: list[Path]) -> str | None:
    for d in dirs:
        p = d / "prompts" / f"train_{kind}.txt"
        if p.is_file() and not explicit:
            return str(p)
    return explicit


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


def _good_index(dirs) -> int:
    """The index where harmful and harmless separate best (quality), skipping the embeddings and the final norm."""
    table = dirs.quality_table()
    inner = [row for row in table if 0 < row["index"] < len(table) - 1] or table
    return int(max(inner, key=lambda row: row["quality"])["index"])


def _config_from_changes(modified: dict, measurement: int):
    """A config that says what another tool did: modified target groups over the layers it changed."""
    from audit.ablation_config import AblationConfig

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


def _load(md, opts: RunOptions, ctx: _Ctx | None = None, inputs=()):
    """One model, in the stored dtype unless --dtype says otherwise, placed by --device (auto: accelerate's device map,
    bounded by --max-memory, disk offload in a temporary folder of ours that goes with the model)."""
    model = md.load_model(dtype=opts.dtype, device=opts.device, max_memory=opts.max_memory, offload_folder=_offload_parent(opts),
                          inputs=inputs)
    if ctx is not None:
        from audit.model_dir import placement

        ctx.placement[str(md.path)] = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "devices": placement(model)}
    return model


def _offload_parent(opts: RunOptions) -> str | None:
    """Where accelerate's disk offload goes (only with --device auto): --offload-folder, else beside the output folder."""
    if opts.device != "auto" or opts.offload_folder:
        return opts.offload_folder
    parent = Path(opts.out).absolute().parent
    while not parent.is_dir() and parent != parent.parent:  # never create a folder for it (an applied fix's -o does not exist yet)
        parent = parent.parent
    return str(parent)


def _release() -> None:
    """Give a released model's memory back before the next one loads (and its offload folder, by its finalizer)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _servers(opts: RunOptions, abl, base, tok, prompts: list) -> dict:
    """The OpenAI-compatible servers that generate for the ablated model (--server) and the base (--base-server), each
    checked before any model is loaded: reachable, serving that name, room for the prompts, the same chat template."""
    from audit.generate import ServerBackend
    from audit.probe import encode

    out = {}
    spec = (("abl", opts.server, opts.served_model, abl, "--server", "--served-model"),
            ("base", opts.base_server, opts.served_base_model, base, "--base-server", "--served-base-model"))
    ids = None
    for side, url, name, md, flag, name_flag in spec:
        if url is None:
            if name is not None:
                raise AuditError(f"{name_flag} {name!r} names a served model, but no {flag} URL was given")
            continue
        be = ServerBackend(url, name or str(md.path), tokenizer=tok, timeout=opts.server_timeout, flag=flag, name_flag=name_flag)
        ids = encode(tok, prompts) if ids is None else ids
        be.check_prompts(prompts, ids, opts.max_new_tokens)
        out[side] = be
    if "abl" in out and "base" in out and out["abl"].base == out["base"].base and out["abl"].model == out["base"].model:
        raise AuditError(f"--server and --base-server both point at {out['abl'].model!r} on {out['abl'].base}: one server model cannot be "
                         "the base and the ablated model; serve both (see the README's two-server recipe)")
    return out


def run_audit(opts: RunOptions, write: bool = True) -> dict:
    """Run every check on ``opts.model_dir`` and return the results document (and write the outputs)."""
    from audit.ablate import DIRECTIONS_NAME, load_manifest
    from audit.ablation_config import AblationConfig
    from audit.damage import kl_rows
    from audit.foreign import load_config, load_directions, resolve_measurements
    from audit.generate import LocalBackend
    from audit.measure import measure_directions
    from audit.model_dir import ModelDir
    from audit.outputs import check_destination
    from audit.probe import probe
    from audit.prompts import MAX_PROMPT_TOKENS, fit_to_context, load_prompts, token_budget
    from audit.simulate import Simulator
    from checks.refusal_eval import MAX_DEGENERATE
    from audit.static_audit import static_audit
    from checks.contribution import contribution_check
    from checks.diagnose import diagnose, rank_by_simulation
    from checks.findings import jsonable
    from checks.gate import evaluate_gate
    from audit.judges import make_judge
    from checks.refusal_eval import damage_check, refusal_check
    from checks.routing import routing_check

    ctx = _Ctx(opts)
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
        harmful_src = _prompt_source(opts.harmful, "harmful", dirs_near)
        harmless_src = _prompt_source(opts.harmless, "harmless", dirs_near)
        harmful = load_prompts(harmful_src, "harmful")[: opts.limit]
        harmless = load_prompts(harmless_src, "harmless")[: opts.limit]
        tok = base.tokenizer()
        budget = token_budget(base.config, opts.max_new_tokens)
        harmful, cut_h = fit_to_context(tok, harmful, budget)
        harmless, cut_a = fit_to_context(tok, harmless, budget)
        ctx.prompts_cut = {"harmful": cut_h, "harmless": cut_a, "token_budget": budget}
        if cut_h or cut_a:
            ctx.say(f"[audit] {cut_h} harmful and {cut_a} harmless prompt(s) cut to {budget} tokens (the model's context minus --max-new-tokens, "
                    f"at most {MAX_PROMPT_TOKENS})")
        intent_cfg = None
        if opts.config:  # the user's statement of intent wins over a manifest
            intent_cfg = load_config(opts.config)
        elif manifest is not None:
            intent_cfg = AblationConfig.from_dict(manifest["config"], source=str(abl.path / "ablation-manifest.json"))
        gate_cfg, gate_source = _gate_config(opts.gate)  # a bad gate file fails now, not after the forward passes
        if opts.device == "auto":  # the offload folder is checked now too (never in an input), before any model loads
            from audit.outputs import remove_scratch, scratch_folder

            remove_scratch(scratch_folder(_offload_parent(opts), "audit-offload", inputs))
        elif opts.max_memory or opts.offload_folder:
            raise AuditError("--max-memory and --offload-folder place the models through accelerate's device map: pass --device auto with them")
        servers = _servers(opts, abl, base, tok, harmful + harmless)
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
            th = load_prompts(_train_source(opts.harmful, "harmful", dirs_near), "harmful")
            ta = load_prompts(_train_source(opts.harmless, "harmless", dirs_near), "harmless")
            directions = measure_directions(base, th, ta, batch_size=opts.batch_size, device=opts.device, dtype=opts.dtype,
                                            max_memory=opts.max_memory, offload_folder=_offload_parent(opts), inputs=inputs,
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
    good = _good_index(directions)
    ref_index = _reference_index(intent_cfg, static["recovery"].to_dict())
    if intent_cfg is None:
        intent_cfg = _config_from_changes(modified, ref_index if ref_index is not None else good)
    r = directions.refusal_dir[ref_index if ref_index is not None else good]

    from audit.estimate import refusal_token_ids
    from audit.passes import measure

    refusal_ids = refusal_token_ids(tok)
    prompts = {"harmful": harmful, "harmless": harmless}
    with ctx.stage("ablated model: load"):
        m_abl = _load(abl, opts, ctx, inputs)
    gen_a = servers.get("abl") or LocalBackend(m_abl, tok)
    pa = measure(m_abl, tok, prompts, r, gen_a, opts.max_new_tokens, opts.batch_size, refusal_ids, keep_answer_dists=True,
                 stage=lambda n, total=None: ctx.stage(f"ablated model: {n}", total))
    del m_abl, gen_a  # one model resident at a time: what the base side needs is in pa, sized by prompts
    _release()
    with ctx.stage("base model: load"):
        m_base = _load(base, opts, ctx, inputs)
    gen_b = servers.get("base") or LocalBackend(m_base, tok)
    pb = measure(m_base, tok, prompts, r, gen_b, opts.max_new_tokens, opts.batch_size, refusal_ids,
                 against=(pa.completions["harmless"], pa.answer_dists), stage=lambda n, total=None: ctx.stage(f"base model: {n}", total))
    del gen_b
    ctx.servers = {side: be.checks for side, be in servers.items()}
    p = {(side, k): ps.probes[k] for side, ps in (("base", pb), ("abl", pa)) for k in prompts}
    mod_experts = [[l, e] for l in modified.get("experts_down", []) for e in range(base.layout.n_routed_experts)]
    routing = routing_check(p["base", "harmful"], p["base", "harmless"], p["abl", "harmful"], modified_experts=mod_experts or None,
                            router_modified=modified.get("router") or None, position="last")
    contribution = contribution_check(p["base", "harmful"], p["abl", "harmful"], harmless_before=p["base", "harmless"], harmless_after=p["abl", "harmless"])
    writes_before, resid_before = _writes(p["base", "harmful"], p["base", "harmless"])
    writes_after, resid_after = _writes(p["abl", "harmful"], p["abl", "harmless"])
    peak = max(abs(x) for x in resid_before) or 1.0
    contribution.data["residual_left_max"] = max(max(0.0, a) / peak for a in resid_after)
    c = {(side, k): ps.completions[k] for side, ps in (("base", pb), ("abl", pa)) for k in prompts}
    with ctx.stage("judgements"):
        j = {k: jd.many([x.answer for x in v], [x.prompt for x in v], [x.finish_reason == "length" for x in v]) for k, v in c.items()}
    refusal = refusal_check(j["abl", "harmful"], j["base", "harmful"], j["abl", "harmless"], j["base", "harmless"])
    before_rate = (refusal.data.get("before") or {}).get("rate")
    if before_rate is not None and before_rate < 0.5:
        from checks.findings import WARN, Finding

        refusal.findings.append(Finding("base-does-not-refuse", WARN,
                                        f"the base model refuses only {before_rate:.0%} of these harmful prompts: the refusal numbers cannot show "
                                        "what the ablation removed; use prompts the base refuses (--harmful) and check its chat template",
                                        value=before_rate, threshold=0.5))
        refusal.status = WARN if refusal.status == "pass" else refusal.status
    refusal.data["samples"] = [{"prompt": x.prompt, "completion": x.answer, "reasoning": x.reasoning, "finish_reason": x.finish_reason,
                                "n_tokens": x.n_tokens, "label": jj.label, "reason": jj.reason, "score": jj.score,
                                "when": "before" if m == "base" else "after", "set": k}
                               for (m, k), xs in c.items() for x, jj in zip(xs, j[m, k])]
    kl1 = kl_rows(pb.first_logprobs_harmless, pa.first_logprobs_harmless).tolist()
    damage = damage_check(kl1, pb.kl_tf, j["abl", "harmless"] + j["abl", "harmful"])

    checks = {**static, "routing": routing, "contribution": contribution, "refusal": refusal, "damage": damage}
    checks_d = {name: cr.to_dict() for name, cr in checks.items()}
    doc = {"checks": checks_d}
    gate = evaluate_gate(doc, gate_cfg, gate_source)

    # -- diagnosis ---------------------------------------------------------------------------
    from audit.fixes import apply_patch, config_yaml
    from audit.reached import reached as reached_ablation

    done = reached_ablation(weights_record, directions)  # what really reached the weights, as a config
    fix_base, fix_dirs = done.config, done.directions
    rates = refusal.data
    refusal_after = (rates.get("after") or {}).get("rate")
    target = gate_cfg.max_refusal_after if gate_cfg.max_refusal_after is not None else 0.1
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
            labels = [x.refused for side in ("base", "abl") for k in prompts for x in j[side, k]]
            scores = torch.cat([ps.refusal_scores[k] for ps in (pb, pa) for k in prompts])
            sim = Simulator(m_base, tok, harmful, harmless, scores, labels, jd, opts, directions, base.layout, refusal_ids,
                            lp_harmless=pb.first_logprobs_harmless)
            sim.opts_target = target
            sim.max_kl = gate_cfg.max_kl if gate_cfg.max_kl is not None else float("inf")
            if sim.calibration is not None:
                bypass = sim.bypass_scan(ref_index)
                good = bypass["best_index"]
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
            "good_index": good, "ablated_index": ref_index,
            "quality": {row["index"]: row["quality"] for row in directions.quality_table()},
            "bypass": {int(k): v["rate"] for k, v in bypass["indices"].items()} if bypass else None,
            "bypass_kl": {int(k): v["kl"] for k, v in bypass["indices"].items()} if bypass else None,
            "refusal_target": target,
            "direction_cos_good": _cos(directions, ref_index, good) if ref_index is not None else (mism["evidence"].get("cosine") if mism else None),
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
        causes = [_unexplained(gate, rates, bypass, ref_index, good, target)]
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
        "schema_version": "1.0",
        "tool": {"name": "moe-ablation-audit", "version": _version()},
        "run": _run_info(opts, ctx, abl, base, harmful_src, harmless_src, len(harmful), len(harmless), directions_source, good, ref_index,
                         "config" if opts.config else "manifest" if manifest else "inferred", gate_source),
        "model": base.layout.summary(),
        "verdict": verdict,
        "headline": _headline(verdict, rates, causes),
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
    from checks.layout import SUPPRESS_RULES, SUPPRESS_STRENGTHS, SUPPRESS_UNITS

    rule = SUPPRESS_RULES.get(family)
    return {"suppress_strengths": list(SUPPRESS_STRENGTHS[rule]), "suppress_unit": SUPPRESS_UNITS[rule]} if rule else {}


def _suppressed(cfg) -> dict | None:
    """The router suppression that reached the weights (audit/reached.py), for the diagnosis."""
    sup = cfg.suppressed() if cfg is not None else {}
    return {"experts": [[l, e] for l, es in sup.items() for e in es], "strength": cfg.suppress_strength} if sup else None


def _empty_config():
    from audit.ablation_config import AblationConfig

    return AblationConfig([], (), source="nothing reached the weights")


def _unexplained(gate, rates, bypass, ablated_index, good, target):
    """The cause a failed verdict names when no evidence-backed cause is left, from what failed (never a failure without one)."""
    from checks.diagnose import Cause

    failed = [t for t in gate["thresholds"] if t["passed"] is False]
    names = {t["name"] for t in failed}
    ev = [t["message"] for t in failed][:5]
    after = (rates.get("after") or {}).get("rate")
    refusal_left = after is not None and after == after and after > target
    if refusal_left or names & {"max_refusal_after", "min_drop"}:
        if bypass and any(v["rate"] <= target for v in bypass["indices"].values()):
            return Cause("direction-mismatch", 0.3, f"The gate failed ({', '.join(sorted(names))}) and no single cause was proven; ablating every "
                         f"residual writer at every layer with the direction at index {good} removes refusal in the simulation.", evidence=ev,
                         fix={"summary": f"ablate every residual writer at every layer, measurement {good}", "patch": {"measurement": good},
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
    from audit.ablate import ablate
    from audit.fixes import apply_patch

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


def _gate_config(path: str | None):
    from checks.gate import GateConfig

    if path is None:
        pp = Path("pyproject.toml")
        if pp.is_file():
            import tomllib

            try:
                data = tomllib.loads(pp.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise AuditError(f"{pp.resolve()}: not valid TOML ({e})") from None
            tbl = data.get("tool", {}).get("audit", {}).get("gate")
            if tbl is not None:
                return GateConfig.from_dict(tbl, f"{pp.resolve()} [tool.audit.gate]"), f"{pp.resolve()} [tool.audit.gate]"
        return GateConfig(), "defaults"
    from audit.ablation_config import read_yaml

    p = Path(path)
    d = read_yaml(p, "gate") or {}
    if not isinstance(d, dict):
        raise AuditError(f"{p}: a gate file is a mapping of thresholds, e.g. max_refusal_after: 0.1")
    d = d.get("gate", d)
    return GateConfig.from_dict(d, str(p)), str(p)


def _version() -> str:
    from audit import __version__

    return __version__


def _rate_text(r: dict | None) -> str:
    """A rate for a headline: '40%', or why there is none (never 'nan%')."""
    if not r:
        return "not measured"
    rate = r.get("rate")
    if not r.get("n") or rate is None or rate != rate:
        return f"not measurable (all {r.get('unknown', 0)} outputs undecided: empty, cut off or degenerate)"
    return f"{rate:.0%}"


def _headline(verdict, rates, causes) -> str:
    rr = f"refusal {_rate_text(rates.get('before'))} -> {_rate_text(rates.get('after'))}"
    if verdict == "pass":
        return f"The ablation works: {rr}."
    top = causes[0] if causes else None
    return f"The ablation fails: {rr}." + (f" Most likely cause: {top.title}." if top else "")


def _run_info(opts, ctx, abl, base, hs, ls, nh, nl, dsrc, good, ref, intent_source, gate_source) -> dict:
    import platform

    import transformers

    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ctx.t0)), "command": opts.command,
            "model_dir": str(abl.path.resolve()), "base_dir": str(base.path.resolve()), "config": opts.config, "intent_source": intent_source,
            "prompts": {"harmful": {"source": hs or "embedded default", "n": nh}, "harmless": {"source": ls or "embedded default", "n": nl},
                        "cut_to_budget": ctx.prompts_cut},
            "directions": {"source": dsrc, "good_index": good, "ablated_index": ref}, "gate_source": gate_source,
            "max_new_tokens": opts.max_new_tokens, "device": opts.device or "cpu", "dtype": opts.dtype, "placement": ctx.placement,
            "stages": ctx.stages, "stages_cpu": ctx.stages_cpu,
            "completions_from": f"{opts.server} ({opts.served_model or abl.path})" if opts.server else "local transformers",
            "base_completions_from": f"{opts.base_server} ({opts.served_base_model or base.path})" if opts.base_server else "local transformers",
            "servers": ctx.servers,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def write_outputs(results: dict, out: str, inputs=(), force: bool = False) -> Path:
    """report.html, results.json and junit.xml (plus applied-fix/ when a fix was applied), written atomically."""
    from audit.outputs import OutputDir
    from reports.html import write_report
    from reports.junit import write_junit
    from reports.results_io import write_results_json

    applied = results.pop("_applied_results", None)
    with OutputDir(out, inputs=inputs, force=force) as od:
        for folder, res in ((od.tmp, results), (od.tmp / "applied-fix", applied)):
            if res is None:
                continue
            folder.mkdir(exist_ok=True)
            write_results_json(res, folder / "results.json")
            write_samples(res, folder / SAMPLES_NAME)
            write_report(res, folder / "report.html")
            write_junit(res, folder / "junit.xml")
        dest = od.commit()
    return dest


SAMPLES_NAME = "samples.jsonl"


def write_samples(results: dict, path: Path) -> None:
    """Every judged completion, one JSON object per line: prompt, completion, reasoning, label, reason, set, model."""
    import json

    from reports.results_io import write_text_atomic

    rows = ((results.get("checks") or {}).get("refusal") or {}).get("data", {}).get("samples") or []
    write_text_atomic(path, "".join(json.dumps({**r, "model": "base" if r.get("when") == "before" else "ablated"}, ensure_ascii=False, sort_keys=True) + "\n"
                                    for r in rows))
