"""`audit fix`'s search against Optuna's TPE sampler (as heretic uses it), on the failed cases of the diagnosis matrix.

Both search the same simulated model (the audited run's simulator: the base with hooks), with the same evaluator
(audit/pipeline/fix_search.py ``FixSearch.evaluate``: first-token estimate, sequential generation, then over-refusal
and KL), the same prompts and the same gate. TPE samples absolute projection configs: a measurement index (every
inner index), a scale in [0.25, 2], a band of layers [start, end] and which writer groups (every expert of each
layer); its objective is the refusal rate of a failing config, and KL - 10 for a passing one (so any pass beats any
failure, and among passes the least KL wins). Each TPE run has a budget of 200 trials; ours has its own (``--budget``,
default audit fix's) and counts the trials the diagnosis's walk made. Printed per case and overall: trials to the first passing
config (ours once: the search is deterministic; TPE per seed), the final config's refusal, KL and edited tensors, and
the ratio of trials to the first pass. Ours is also applied with `audit ablate` and re-audited from disk.

    AUDIT_THREADS=1 python benchmarks/bench_fix.py [--organisms glm,mix,oss] [--cases a,b] [--seeds 0,1,2] [--tpe-budget 200]
        [--json out.json]

Cached in $AUDIT_CACHE/bench_fix: ours per case and per version of the search's code; TPE per organism and seed (TPE
samples absolute configs of the base, so every case of one organism poses it the same problem).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit.intent.config import AblationConfig  # noqa: E402
from audit.organisms import build as O  # noqa: E402
from audit.organisms import cases as C  # noqa: E402
from audit.pipeline.fix_search import FixSearch  # noqa: E402
from audit.pipeline.options import FIX_BUDGET, RunContext, RunOptions  # noqa: E402
from audit.pipeline.run import run_audit  # noqa: E402


def tpe_run(searcher_args, layout, seed: int, budget: int) -> dict:
    """One TPE search of ``budget`` trials on a fresh FixSearch (same simulator); first pass and best pass."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fs = FixSearch(*searcher_args, budget=budget)
    groups = fs.sim.writer_targets()
    L = layout.num_layers

    def objective(trial):
        index = trial.suggest_int("index", 1, L - 1)
        scale = trial.suggest_float("scale", 0.25, 2.0)
        start = trial.suggest_int("start", 0, L - 1)
        end = trial.suggest_int("end", start, L - 1)
        comps = [g for g in groups if trial.suggest_categorical(g, [True, False])] or [groups[0]]
        cfg = AblationConfig.from_dict({"components": comps, "ablate": [{"layer": l, "measurement": index, "scale": round(scale, 3)}
                                                                         for l in range(start, end + 1)]}, source="tpe")
        t = fs.evaluate(cfg, f"index {index}, scale {scale:.2f}, layers {start}-{end}, {'+'.join(comps)}", phase="tpe")
        if t.passes:
            return (t.kl or 0.0) - 10.0
        return 1.0 + (t.refusal if t.refusal is not None else 1.0)

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    t0 = time.process_time()
    study.optimize(objective, n_trials=budget)
    first = next((t.n for t in fs.trials if t.passes), None)
    best = fs.best()
    return {"seed": seed, "first_pass": first, "trials": len(fs.trials), "cpu_s": round(time.process_time() - t0, 1),
            "best": None if best is None else {"refusal": best.refusal, "kl": best.kl, "edited_tensors": best.edited_tensors, "label": best.label}}


def _code_digest() -> str:
    """What ours is measured with (the search and the simulator): a changed search is measured again, an unchanged one is not."""
    import hashlib

    files = [ROOT / "audit" / "pipeline" / f for f in ("fix_search.py", "simulate.py", "explain.py")] + [ROOT / "checks" / "diagnosis" / "rules.py"]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:10]


def bench_case(name: str, seeds, tpe_budget: int, budget: int, cache: Path) -> dict:
    """Ours on the case (cached by the search's code), and TPE on the case's organism (cached per organism and seed: TPE samples
    absolute configs of the base, so every case of one organism gives it the same problem)."""
    case = C.build_case(name)
    f_ours = cache / f"ours-{name}-b{budget}-{_code_digest()}.json"
    searcher = None
    if f_ours.exists():
        out = json.loads(f_ours.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="bench-fix-") as tmp:
            opts = RunOptions(model_dir=str(case.ablated_dir), base=str(case.base_dir), config=str(case.config_path) if case.config_path else None,
                              directions=str(case.directions_path) if case.directions_path else None, limit=C.AUDIT_LIMIT,
                              max_new_tokens=C.AUDIT_MAX_NEW_TOKENS, quiet=True, capability="none", multi_turn=0, controls=False,
                              apply_fix=str(Path(tmp) / "fixed"), fix_budget=budget, out=str(Path(tmp) / "report"))
            ctx = RunContext(opts)
            t0 = time.process_time()
            res = run_audit(opts, write=False, ctx=ctx)
            ours_cpu = time.process_time() - t0
        fs = res.get("fix_search") or {}
        applied = res.get("applied_fix") or {}
        best = fs.get("best") or {}
        out = {"case": name, "verdict": res["verdict"], "top": (res["causes"] or [{}])[0].get("id"),
               "ours": {"first_pass": fs.get("first_pass"), "trials": fs.get("n_trials"), "ended": fs.get("ended"), "limited_by": fs.get("limited_by"),
                        "best": {k: best.get(k) for k in ("refusal", "kl", "edited_tensors", "label")} if best else None,
                        "applied": {k: applied.get(k) for k in ("verdict", "refusal_rate", "kl")} if applied else None,
                        "cpu_s_whole_audit": round(ours_cpu, 1)}}
        searcher = ctx.kept.get("searcher")
        f_ours.write_text(json.dumps(out, indent=1))
    out["tpe"] = []
    for seed in seeds:
        f_tpe = cache / f"tpe-{C.ALL_SPECS[name].organism}-s{seed}-b{tpe_budget}.json"
        if not f_tpe.exists():
            if searcher is None:  # ours came from the cache: run the case's audit once more for its simulator
                with tempfile.TemporaryDirectory(prefix="bench-fix-") as tmp:
                    opts = RunOptions(model_dir=str(case.ablated_dir), base=str(case.base_dir), limit=C.AUDIT_LIMIT,
                                      max_new_tokens=C.AUDIT_MAX_NEW_TOKENS, quiet=True, capability="none", multi_turn=0, controls=False,
                                      apply_fix=str(Path(tmp) / "fixed"), fix_budget=1, out=str(Path(tmp) / "report"))
                    ctx = RunContext(opts)
                    run_audit(opts, write=False, ctx=ctx)
                    searcher = ctx.kept.get("searcher")
            if searcher is None:
                continue
            args = (searcher.sim, searcher.layout, {"max_over_refusal": searcher.max_over}, {})
            f_tpe.write_text(json.dumps(tpe_run(args, searcher.layout, seed, tpe_budget), indent=1))
        out["tpe"].append(json.loads(f_tpe.read_text()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organisms", default="glm,mix,oss")
    ap.add_argument("--cases", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tpe-budget", type=int, default=200)
    ap.add_argument("--budget", type=int, default=FIX_BUDGET, help=f"ours: the most configs it simulates (default {FIX_BUDGET}, audit fix's)")
    ap.add_argument("--json", default=None, help="also write every number here")
    args = ap.parse_args(argv)
    O._torch_threads()
    orgs = args.organisms.split(",")
    truth = {}
    for p in (ROOT / "tests" / "data").glob("diagnosis_truth*.json"):
        truth.update(json.loads(p.read_text())["cases"])
    names = args.cases.split(",") if args.cases else [n for n, sp in C.ALL_SPECS.items() if sp.organism in orgs
                                                       and truth.get(n, {}).get("expected_verdict") == "fail"]
    seeds = [int(x) for x in args.seeds.split(",")]
    cache = O.cache_root() / "bench_fix"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| case | ours: trials to 1st pass | TPE: trials to 1st pass (per seed) | ratio | ours: refusal / KL / tensors | TPE best: refusal / KL / tensors | ours applied |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        r = bench_case(n, seeds, args.tpe_budget, args.budget, cache)
        rows.append(r)
        o = r["ours"]
        tf = [t["first_pass"] for t in r["tpe"]]
        tf_med = statistics.median([x if x is not None else args.tpe_budget + 1 for x in tf]) if tf else None
        ratio = (o["first_pass"] / tf_med) if o["first_pass"] and tf_med else None
        tb = [t["best"] for t in r["tpe"] if t["best"]]
        tbest = min(tb, key=lambda b: b["kl"] or 0.0) if tb else None
        fmt = lambda b: f"{b['refusal']:.0%} / {b['kl']:.2g} / {b['edited_tensors']}" if b and b.get("kl") is not None else "-"  # noqa: E731
        ap_ = o.get("applied") or {}
        print(f"| {n} | {o['first_pass'] or '-'} | {', '.join(str(x) if x else '>' + str(args.tpe_budget) for x in tf)} | "
              f"{f'{ratio:.2f}' if ratio is not None else '-'} | {fmt(o.get('best'))} | {fmt(tbest)} | "
              f"{ap_.get('verdict', '-')} {'' if ap_.get('refusal_rate') is None else format(ap_['refusal_rate'], '.0%')} |", flush=True)
    ours = [r["ours"]["first_pass"] for r in rows if r["ours"]["first_pass"]]
    tpes = [x if x is not None else args.tpe_budget + 1 for r in rows for x in [t["first_pass"] for t in r["tpe"]]]
    if ours and tpes:
        print(f"\nmedian trials to the first pass: ours {statistics.median(ours)}, TPE {statistics.median(tpes)} "
              f"(ratio {statistics.median(ours) / statistics.median(tpes):.3f}); ours found a pass in {len(ours)} of {len(rows)} cases, "
              f"TPE in {sum(x <= args.tpe_budget for x in tpes)} of {len(tpes)} runs")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
