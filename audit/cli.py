"""The `audit` command line: one entry point, subcommands, clean errors (exit 2, no traceback)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checks.errors import AuditError
from checks.findings import ranges


def _cmd_inspect(args) -> int:
    from audit.model_dir import ModelDir

    md = ModelDir(args.model_dir)
    lay = md.layout
    info = {**lay.summary(), "path": str(md.path), "dtypes": md.dtypes(), "bytes": md.nbytes, "shards": len(md.shards),
            "per_layer": {str(k): v for k, v in lay.counts().items()}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{md.path}  family={lay.family}  layers={lay.num_layers}  hidden={lay.hidden_size}")
    print(f"  size {md.nbytes / 2**20:.1f} MiB in {len(md.shards)} shard(s); dtypes {md.dtypes()}")
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
    from pathlib import Path

    from audit.measure import format_table, measure_directions
    from audit.model_dir import ModelDir
    from audit.prompts import load_prompts

    md = ModelDir(args.base)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise AuditError(f"{out}: exists; choose another -o or pass --force to replace it")
    if md.path.resolve() in out.absolute().resolve().parents:
        raise AuditError(f"{out}: is inside the input {md.path}; the audit never writes into an input directory")
    harmful, harmless = load_prompts(args.harmful, "harmful"), load_prompts(args.harmless, "harmless")
    if args.limit is not None:
        if args.limit < 1:
            raise AuditError(f"--limit must be at least 1, got {args.limit}")
        harmful, harmless = harmful[: args.limit], harmless[: args.limit]
    dirs = measure_directions(md, harmful, harmless, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    dirs.save(out)
    print(f"{len(harmful)} harmful / {len(harmless)} harmless prompts; index i = hidden_states[i] = input of layer i (0 = embeddings)")
    print(format_table(dirs.quality_table()))
    print(f"wrote {out}")
    return 0


def _cmd_ablate(args) -> int:
    from audit.ablate import ablate
    from audit.ablation_config import load_config
    from audit.measure import Directions

    cfg = load_config(args.config)
    base = args.base or cfg.model
    out = args.output or cfg.output
    if not base:
        raise AuditError(f"{args.config}: no base model: pass BASE or set 'model:' in the config")
    if not out:
        raise AuditError(f"{args.config}: no output directory: pass -o OUT or set 'output:' in the config")
    dirs = Directions.load(args.directions) if args.directions else None
    m = ablate(base, cfg, out, directions=dirs, force=args.force, progress=False if args.quiet else None)
    mods = m["modified"]
    worst = max((x["along_after"] / x["along_before"] for x in mods if x["along_before"] > 0), default=0.0)
    print(f"{len(mods)} tensors edited in {len(m['shards']['rewritten'])} shard(s), {len(m['shards']['copied'])} copied; "
          f"{m['timings']['total_s']:.1f} s; largest remaining share along r {worst:.2e}")
    if m["unmatched_components"]:
        print(f"note: no tensor matched component(s) {', '.join(m['unmatched_components'])}")
    print(f"wrote {out}")
    return 0


def _cmd_report(args) -> int:
    from pathlib import Path

    from reports.html import write_report
    from reports.junit import write_junit
    from reports.results_io import load_results

    results = load_results(args.results)
    src = Path(args.results)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    html, junit = write_report(results, out / "report.html"), write_junit(results, out / "junit.xml")
    print(f"wrote {html}\nwrote {junit}")
    return 0


def _cmd_static(args) -> int:
    """Static weight audit (weights, projection, recovery) -> DIR/results.json; 1 when a check fails."""
    import time

    from audit.static_audit import results_document, static_audit, validate_results, write_results

    t0 = time.time()
    results = static_audit(args.model_dir, base=args.base, config=args.config, directions=args.directions,
                           harmful=args.harmful, harmless=args.harmless)
    doc = results_document(results, args.model_dir, results["weights"].data.get("base"), t0)
    validate_results(doc)
    inputs = [args.model_dir] + ([args.base] if args.base else [])
    path = write_results(doc, args.output, inputs=inputs, force=args.force)
    for name, r in results.items():
        print(f"{name:11s} {r.status:5s} {r.summary}")
    print(f"wrote {path}")
    return 1 if any(r.status == "fail" for r in results.values()) else 0


def _cmd_classify(args) -> int:
    from audit.classify import classify_file

    c = classify_file(args.file, args.output)
    print(f"{c['rows']} rows: {c['refusal']} refusal, {c['compliance']} compliance, {c['unknown']} unknown"
          + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def _cmd_run(args) -> int:
    from audit.run import RunOptions, run_audit

    opts = RunOptions(model_dir=args.model_dir, base=args.base, config=args.config, gate=args.gate, harmful=args.harmful,
                      harmless=args.harmless, directions=args.directions, out=args.out, force=args.force,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit, simulate=args.simulate,
                      apply_fix=args.apply_fix, device=args.device, server=args.server, served_model=args.served_model,
                      command="audit " + " ".join(sys.argv[1:]))
    res = run_audit(opts)
    print(f"verdict: {res['verdict'].upper()}  {res['headline']}")
    for c in res["causes"][:5]:
        sim = c.get("simulated") or {}
        extra = f"; simulated fix -> refusal {sim['refusal_rate']:.0%}" if sim.get("refusal_rate") is not None else ""
        print(f"  [{c['confidence_label']}] {c['id']}: {c['summary']}{extra}")
        print(f"      fix: {c['fix'].get('summary', '')}")
    if res.get("applied_fix"):
        a = res["applied_fix"]
        print(f"applied fix ({a['cause']}) -> {a['model_dir']}: verdict {a['verdict'].upper()}, refusal {a['refusal_rate']:.0%}")
    print(f"report: {Path(args.out).resolve() / 'report.html'}")
    return 0 if res["verdict"] == "pass" else 1


def _cmd_demo(args) -> int:
    from audit.demo import run_demo

    s = run_demo(args.out, args.family, args.variant, args.seed)
    print(f"demo organism: {s['organism']}")
    print(f"guide-style ablation: verdict {s['verdict'].upper()}  top cause: {s['top_cause']}")
    print(f"  {s['headline']}")
    print(f"  report: {s['report']}")
    if s["fixed_verdict"]:
        print(f"after applying the report's fix: verdict {s['fixed_verdict'].upper()}, refusal {s['fixed_refusal_rate']:.0%}")
        print(f"  report: {s['fixed_report']}")
    print(f"done in {s['seconds']:.0f} s")
    return 0


def _cmd_organism_build(args) -> int:
    from audit.organism import build_organism

    out = build_organism(args.out, args.family, args.variant, args.seed, progress=lambda m: print(m, file=sys.stderr))
    meta = json.loads((out / "organism.json").read_text())
    m = meta["metrics"]
    print(f"{out}: {meta['family']}/{meta['variant']} seed {meta['seed']}, trained in {meta['train_seconds']:.0f} s")
    print(f"  held-out: harmful refused {m['harmful_refusal']:.0%}, harmless correct {m['harmless_correct']:.0%}; "
          f"all writers orthogonalized at layer {meta['good_layer']}: refused {m['ablated_harmful_refusal']:.0%}, "
          f"correct {m['ablated_harmless_correct']:.0%}")
    print(f"  refusal direction carried by: {json.dumps(meta['carriers'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="audit", description="Audit (and fix) refusal-direction ablations of Mixture-of-Experts models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("classify", help="judge completions (JSONL/CSV with a 'completion' or 'response' column): refusal / compliance / unknown")
    s.add_argument("file", help="JSONL or CSV; optional 'prompt' and 'finish_reason' columns are used")
    s.add_argument("-o", "--output", default=None, help="JSONL to write (default: stdout)")
    s.set_defaults(func=_cmd_classify)

    s = sub.add_parser("run", help="every check, the diagnosis with simulated fixes, report.html, results.json, junit.xml; exit 1 if the gate fails")
    s.add_argument("model_dir", help="the ablated model directory")
    s.add_argument("--base", help="the model it was ablated from (default: the one its ablation-manifest.json names)")
    s.add_argument("--config", help="the ablation config that was used (ours or llm-abliteration's YAML), for the intent")
    s.add_argument("--gate", help="gate thresholds (YAML); default: [tool.audit.gate] in ./pyproject.toml, else built-in defaults")
    s.add_argument("--harmful", help="harmful prompts (txt/JSONL/CSV/Parquet or a datasets name); default: the model's prompts/ or the embedded set")
    s.add_argument("--harmless", help="harmless prompts, same forms")
    s.add_argument("--directions", help="refusal directions (our directions.safetensors or llm-abliteration's measurement .pt)")
    s.add_argument("-o", "--out", default="audit-out", help="output folder (default: audit-out)")
    s.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--limit", type=int, help="use at most this many prompts per set")
    s.add_argument("--no-simulate", dest="simulate", action="store_false", help="skip the in-memory simulation of each fix")
    s.add_argument("--apply-fix", metavar="OUT", help="apply the top fix with our ablation into OUT and re-audit it")
    s.add_argument("--device", help="torch device (default cpu), e.g. cuda or auto (accelerate device_map)")
    s.add_argument("--server", metavar="URL", help="an OpenAI-compatible server (vLLM, SGLang, llama.cpp, transformers serve) serving the ablated model: its completions come from there")
    s.add_argument("--served-model", metavar="NAME", help="the name the server serves the ablated model under (default: MODEL_DIR)")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("demo", help="the embedded default: grow the demo organism, ablate it as the guide's current code does, audit, fix, re-audit")
    s.add_argument("-o", "--out", default="audit-demo", help="output folder (default: audit-demo)")
    s.add_argument("--family", default="glm4_moe", choices=["glm4_moe", "qwen3_moe", "mixtral"])
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
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--device", default=None, help="e.g. cuda, cuda:0, auto (default: cpu)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each set")
    s.add_argument("--force", action="store_true", help="replace an existing output file")
    s.set_defaults(func=_cmd_measure)

    s = sub.add_parser("ablate", help="the suite's own ablation: orthogonalize the configured tensors, streamed, with a manifest")
    s.add_argument("base", nargs="?", default=None, help="base model directory (default: the config's 'model')")
    s.add_argument("--config", required=True, help="ablation YAML (llm-abliteration's format plus components/method/router_mode/biprojection)")
    s.add_argument("-o", "--output", default=None, help="output model directory (default: the config's 'output')")
    s.add_argument("--directions", default=None, help="directions file (default: the config's 'measurements')")
    s.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_ablate)

    s = sub.add_parser("static", help="static weight audit of an ablated model: key diff, projections on r, directions recovered from the weights")
    s.add_argument("model_dir", help="the ablated model directory")
    s.add_argument("--base", help="the model it was ablated from (default: the manifest's base)")
    s.add_argument("--config", help="the ablation YAML (ours or llm-abliteration's) that says what was intended")
    s.add_argument("--directions", help="directions file (audit measure's .safetensors or llm-abliteration's measurement)")
    s.add_argument("--harmful", help="harmful prompts to measure directions on the base (when no directions file)")
    s.add_argument("--harmless", help="harmless prompts to measure directions on the base")
    s.add_argument("-o", "--output", required=True, help="output directory for results.json")
    s.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    s.set_defaults(func=_cmd_static)

    s = sub.add_parser("report", help="re-render report.html and junit.xml from a results.json")
    s.add_argument("results", help="results.json written by `audit run` (or its output folder)")
    s.add_argument("-o", "--out", default=None, help="folder for report.html and junit.xml (default: next to results.json)")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("organism", help="the demo organism: a tiny MoE chat model whose refusal direction is known")
    osub = s.add_subparsers(dest="organism_command", required=True)
    s = osub.add_parser("build", help="train it (about a minute on a laptop CPU) and write a Hugging Face model directory")
    s.add_argument("-o", "--out", required=True, help="new output directory")
    s.add_argument("--family", default="glm4_moe", choices=["glm4_moe", "qwen3_moe", "mixtral"])
    s.add_argument("--variant", default="base", choices=["base", "shared", "experts", "late", "spread"],
                   help="which part carries the refusal direction (shared: glm4_moe only; spread: every writer group of every layer, "
                        "redundantly, with more layers)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_organism_build)
    return p


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


if __name__ == "__main__":
    sys.exit(main())
