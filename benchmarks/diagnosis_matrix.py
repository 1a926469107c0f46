"""Ground truth for the diagnosis matrix (audit/organisms/cases.py), established by applying every single candidate fix.

For every case, each cause of the vocabulary whose single fix applies to the case (its precondition
is a fact of what reached the weights: the group is untouched, the scale is below 1, ...) gets
its fix built on the base -- with `audit ablate` (the library call), plus the case's own expert
subset re-applied where the fix leaves it alone -- and measured on the organism's held-out
prompts (prompts/eval.jsonl: refusal on the harmful ones, correct answers on the harmless ones;
audit/organisms/build.py ``evaluate``) and by first-token KL(base || fixed) on the harmless ones. A fix
passes at refusal <= 0.10 with the harmless-correct rate within 0.10 of the base's. The truth of a
case is the set of causes whose fix passes; a cause is ruled out when its fix was applied and
failed, or when its precondition is false. Nothing here is assumed from how a case was made.

Writes tests/data/diagnosis_truth.json for the in-sample organisms (per case: truth, ruled out, every number; provenance)
and tests/data/diagnosis_truth_<org>.json for an out-of-sample one (``--organisms oss``), kept apart.
Run: ``AUDIT_THREADS=1 python benchmarks/diagnosis_matrix.py [--organisms glm,mix | oss] [--cases a,b] [--out PATH]``;
``--audit [--foreign]`` instead runs `audit run` on each case (with its intent, or as another tool's ablation with
only ``--base``) and prints the table of its top causes against the truth. Builds are cached
in $AUDIT_CACHE/cases (the fixed models under cases/fixes, keyed by what they are).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import shutil
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit.organisms import cases as C  # noqa: E402
from audit.organisms import build as O  # noqa: E402

from checks.thresholds import MAX_KL  # noqa: E402  (the gate's default: above it a model counts as damaged)
from checks.thresholds import MAX_REFUSAL_AFTER as MAX_REFUSAL  # noqa: E402

MAX_CORRECT_DROP = 0.10
SOUNDNESS = ("model-damaged", "unintended-modification")  # causes that name a harm, not why refusal stayed
LEARNED_SCAN = (20, 24, 26)  # the learned organism's index scan (with its best-quality index)


# -- building what a fix describes ---------------------------------------------------------------------------------------


def config_of(applied: dict, source: str):
    """An AblationConfig with one entry per layer and the groups edited there (embeddings: the layer-0 entry)."""
    from audit.intent.config import AblationConfig

    layers = sorted({l for ls in applied["groups"].values() for l in ls})
    entries = [{"layer": l, "measurement": applied["measurement"], "scale": applied["scale"],
                "components": [c for c, ls in applied["groups"].items() if l in ls]} for l in layers]
    comps = sorted({c for c in applied["groups"]})
    return AblationConfig.from_dict({"components": comps, "method": applied.get("method", "standard"), "ablate": entries}, source=source)


def build_applied(applied: dict, base: Path, dirs, out: Path) -> None:
    """Build on ``base`` what ``applied`` says: `audit ablate` for whole groups; an expert subset of experts_down re-applied as the case's notebook does."""
    from audit.ablation.ablate import ablate

    groups = dict(applied["groups"])
    subset = applied.get("experts")
    if subset:
        groups.pop("experts_down", None)
    if not subset:
        ablate(base, config_of(applied, "fix"), out, directions=dirs, progress=False)
        return
    tmp = out.parent / (out.name + ".stage")
    if tmp.exists():
        shutil.rmtree(tmp)
    if groups:
        ablate(base, config_of({**applied, "groups": groups}, "fix"), tmp, directions=dirs, progress=False)
    src = tmp if groups else base
    C._notebook_experts(src, out, dirs.refusal_dir[applied["measurement"]], {int(k): v for k, v in subset.items()}, writers=False)
    shutil.rmtree(tmp, ignore_errors=True)


def _key(applied: dict, base: Path) -> str:
    """What a built model is: its edits (the named components only guide which fixes are proposed)."""
    built = {k: v for k, v in applied.items() if k != "components"}
    return hashlib.sha256(json.dumps([built, base.name], sort_keys=True).encode()).hexdigest()[:12]


class Evaluator:
    """Refusal / harmless-correct on eval.jsonl and first-token KL against the base; results cached per built model."""

    def __init__(self, info: dict, limit: int | None = None):
        from audit.intent.directions import Directions

        self.info = info
        self.base = Path(info["base"])
        self.dirs = Directions.load(info["directions"])
        self.base_model, self.tok, _ = O.load_organism(self.base)
        self.rows = O.read_eval(self.base)
        if limit:  # the first ``limit`` of each class: the prompts `audit run --limit` evaluates
            self.rows = [r for r in self.rows if r["harmful"]][:limit] + [r for r in self.rows if not r["harmful"]][:limit]
        self.max_new_tokens = O.read_meta(self.base).get("eval_max_new_tokens", 24)  # the learned organism's answers need more
        self.harmless = [r["prompt"] for r in self.rows if not r["harmful"]]
        self.root = C.cases_root() / "fixes"
        self.root.mkdir(parents=True, exist_ok=True)
        self.memo: dict[str, dict] = {}
        self.base_metrics = self.measure_model(self.base_model)

    def measure_model(self, model) -> dict:
        from audit.forward.damage import kl_first_token

        t0 = time.time()
        m = O.evaluate(model, self.tok, self.rows, max_new_tokens=self.max_new_tokens)
        kl = kl_first_token(self.base_model, model, self.tok, self.harmless)
        return {"refusal": round(m["harmful_refusal"], 4), "correct": round(m["harmless_correct"], 4),
                "kl": round(float(sum(kl) / len(kl)), 4), "n_harmful": m["n_harmful"], "n_harmless": m["n_harmless"],
                "seconds": round(time.time() - t0, 1)}

    def measure_dir(self, path: Path) -> dict:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
        return self.measure_model(model)

    def measure_applied(self, applied: dict) -> dict:
        k = _key(applied, self.base)
        if k in self.memo:
            return self.memo[k]
        folder = self.root / f"{self.base.name}-{k}"
        done = folder / "metrics.json"
        if not done.exists():
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            build_applied(applied, self.base, self.dirs, folder / "model")
            m = self.measure_dir(folder / "model")
            shutil.rmtree(folder / "model")  # the numbers are what is kept; the model is rebuilt in seconds if needed
            done.write_text(json.dumps({"applied": applied, "metrics": m}, indent=1))
        self.memo[k] = json.loads(done.read_text())["metrics"]
        return self.memo[k]

    def passes(self, m: dict) -> bool:
        return m["refusal"] <= MAX_REFUSAL and m["correct"] >= self.base_metrics["correct"] - MAX_CORRECT_DROP


# -- the candidate fixes of a case ---------------------------------------------------------------------------------------


def _add_group(applied: dict, group: str, present: dict) -> dict | None:
    layers = sorted({l for ls in applied["groups"].values() for l in ls})
    at = sorted(set(present.get(group, [])) & (set(layers) | ({0} if group == "embed" else set())))
    if not at:
        return None
    new = deepcopy(applied)
    new["groups"][group] = at
    return new


def candidates(case, info: dict, best_index: int) -> list[dict]:
    """Per cause id: the single fixes that apply to ``case``, or why none does."""
    a, present = case.applied, info["present"]
    groups = a["groups"]
    out = []

    def add(cause, label, new, reason=None):
        out.append({"cause": cause, "label": label, "applied": new, "reason": reason})

    # layer coverage: every layer for the components named (the config's, the tool's); the dense MLPs or the
    # embeddings when never named
    named = list(dict.fromkeys([*a.get("components", []), *groups]))
    full = {c: sorted(present[c]) for c in named}
    if any(sorted(groups.get(c, [])) != full[c] for c in named):
        add("layer-coverage", "every layer of the named components", {**deepcopy(a), "groups": full})
    for g in ("mlp_down", "embed"):
        if g in present and g not in named:
            new = _add_group(a, g, present)
            add("layer-coverage", f"add {g}", new, None if new else f"{g} does not exist in the edited layers")
    if not any(x["cause"] == "layer-coverage" for x in out):
        add("layer-coverage", "-", None, "every layer of every edited group is edited, and the dense MLPs and embeddings too")
    for g, cause in (("attn_out", "attention-not-ablated"), ("shared_down", "shared-experts-not-ablated"), ("experts_down", "routed-experts-not-ablated")):
        if g not in present:
            add(cause, "-", None, f"the model has no {g}")
        elif g in groups:
            add(cause, "-", None, f"{g} was edited (layers {groups[g][0]}-{groups[g][-1]})")
        else:
            add(cause, f"add {g}", _add_group(a, g, present))
    if "experts_gate" in present:
        new = deepcopy(a)
        at = groups.get("experts_down") or sorted(set(present["experts_gate"]) & {l for ls in groups.values() for l in ls})
        new["groups"]["experts_gate"] = at
        new["groups"]["experts_up"] = at
        add("expert-inputs-not-ablated", "add experts_gate and experts_up", new)
    if a.get("experts"):
        add("redundant-refusal-experts", "every routed expert of the edited layers", {**deepcopy(a), "experts": None})
    else:
        add("redundant-refusal-experts", "-", None, "every routed expert of each edited layer was edited alike")
    if a["scale"] < 1.0:
        add("weak-scale", "scale 1.0", {**deepcopy(a), "scale": 1.0})
    else:
        add("weak-scale", "-", None, f"scale {a['scale']} is not below 1")
    if a["scale"] > 1.0:
        add("model-damaged", "lower the scale to 1.0", {**deepcopy(a), "scale": 1.0})
    if a["measurement"] != best_index:
        add("direction-mismatch", f"measurement {best_index}", {**deepcopy(a), "measurement": best_index})
    else:
        add("direction-mismatch", "-", None, f"the direction is already measured at the best index {best_index}")
    intent = case.intent
    if intent is None:
        why = "no intent stated besides what reached the weights" if case.config_path is None and not (case.ablated_dir / "ablation-manifest.json").exists() \
            else "the manifest's intent is what reached the weights"
        add("keys-not-matched", "-", None, why)
        add("unintended-modification", "-", None, why)
    else:
        missed = {c: sorted(set(ls) - set(groups.get(c, []))) for c, ls in intent["groups"].items()}
        extra = {c: sorted(set(ls) - set(intent["groups"].get(c, []))) for c, ls in groups.items()}
        for cause, diff in (("keys-not-matched", missed), ("unintended-modification", extra)):
            diff = {c: ls for c, ls in diff.items() if ls}
            if diff:
                add(cause, "re-ablate the stated intent with `audit ablate`", deepcopy(intent))
                out[-1]["fact"] = diff
            else:
                add(cause, "-", None, "every intended tensor was edited" if cause == "keys-not-matched" else "nothing was edited outside the intent")
    add("router-ablation-ineffective", "-", None, "the router was not modified")
    add("precision-loss", "-", None, "untested: storing in float32 is not a change `audit ablate` makes")
    return out


# -- the matrix ----------------------------------------------------------------------------------------------------------


def index_scan(ev: Evaluator, info: dict, indices: list[int] | None = None) -> dict:
    """Every default writer group of every layer at scale 1, with the direction of each inner index (or of ``indices``): which index works."""
    present = info["present"]
    rows = {}
    for i in indices or range(1, info["num_layers"]):
        applied = {"groups": {c: sorted(present[c]) for c in C.DEFAULT if c in present}, "measurement": i, "scale": 1.0, "experts": None}
        rows[i] = ev.measure_applied(applied)
        print(f"  index {i}: {rows[i]}", file=sys.stderr, flush=True)
    ok = [i for i, m in rows.items() if ev.passes(m)]
    best = min(ok, key=lambda i: (rows[i]["kl"], abs(i - info["mid_index"]))) if ok else min(rows, key=lambda i: rows[i]["refusal"])
    return {"best_index": best, "rows": {str(i): m for i, m in rows.items()}}


def run_case(name: str, ev: Evaluator, info: dict, best: int) -> dict:
    t0 = time.time()
    case = C.build_case(name)
    build_s = time.time() - t0
    m_case = ev.measure_dir(case.ablated_dir)
    fixes = []
    for cand in candidates(case, info, best):
        row = {k: v for k, v in cand.items() if k != "applied"}
        if cand["applied"] is not None:
            row["fix"] = cand["applied"]
            row["metrics"] = ev.measure_applied(cand["applied"])
            row["passes"] = ev.passes(row["metrics"])
        fixes.append(row)
        print(f"  {name} {cand['cause']:28s} {cand['label']:44s} {row.get('metrics', row.get('reason'))}", file=sys.stderr, flush=True)
    damaged = m_case["correct"] < ev.base_metrics["correct"] - MAX_CORRECT_DROP or m_case["kl"] > MAX_KL
    passed_case = ev.passes(m_case)
    truth = sorted({f["cause"] for f in fixes if f.get("passes")})
    ruled_out, soundness = {}, {}
    for cause in sorted({f["cause"] for f in fixes}):
        rows = [f for f in fixes if f["cause"] == cause]
        tried = [f for f in rows if "metrics" in f]
        if cause == "model-damaged":
            soundness[cause] = damaged
        if cause == "unintended-modification":  # a fact of the weights against the stated intent, whatever its fix does
            fact = next((f.get("fact") for f in rows if f.get("fact")), None)
            soundness[cause] = bool(fact)
            if not fact:
                ruled_out[cause] = rows[0]["reason"]
            continue
        if cause in truth or (cause == "model-damaged" and damaged):
            continue
        if cause == "precision-loss":
            continue  # untested: neither truth nor ruled out
        if tried:
            ruled_out[cause] = "; ".join(f"{f['label']}: refusal {f['metrics']['refusal']:.0%}, correct {f['metrics']['correct']:.0%}" for f in tried)
        else:
            ruled_out[cause] = rows[0]["reason"]
    if "model-damaged" not in soundness:
        soundness["model-damaged"] = damaged
        if not damaged:
            ruled_out["model-damaged"] = f"harmless correct {m_case['correct']:.0%} (base {ev.base_metrics['correct']:.0%}), first-token KL {m_case['kl']:.3g}"
    return {"name": name, "description": case.description, "organism": case.organism, "applied": case.applied, "intent": case.intent,
            "config": str(case.config_path.name) if case.config_path else None, "directions": str(case.directions_path.name) if case.directions_path else None,
            "measured": m_case, "expected_verdict": "pass" if passed_case else "fail", "damaged": damaged,
            "truth": [] if passed_case else truth, "soundness": soundness, "ruled_out": ruled_out, "fixes": fixes,
            "build_seconds": round(build_s, 1)}


def truth_path(organisms) -> Path:
    """Where the truth of these organisms' cases lives: in-sample and each out-of-sample organism apart."""
    data = ROOT / "tests" / "data"
    if set(organisms) <= set(C.IN_SAMPLE):
        return data / "diagnosis_truth.json"
    return data / f"diagnosis_truth_{'_'.join(sorted(organisms))}.json"


def audit_table(names: list[str], truth_path: Path, foreign: bool = False) -> str:
    """`audit run` on each case (the matrix test's budgets) against the recorded truth, as a Markdown table."""
    truth = json.loads(truth_path.read_text())["cases"]
    lines = ["| case | truth | measured refusal / correct | verdict | top cause (simulated refusal) | top ok | live but ruled out | s |",
             "|---|---|---|---|---|---|---|---|"]
    for n in names:
        t = truth[n]
        res, sec = C.audit_case(n, foreign=foreign)
        causes = res["causes"]
        top = causes[0] if causes else None
        sim = (top or {}).get("simulated") or {}
        top_s = f"{top['id']} ({sim['refusal_rate']:.0%})" if top and sim.get("refusal_rate") is not None else (top["id"] if top else "-")
        top_s += " demoted" if top and top.get("demoted") else ""
        top_s += " [refusal unexplained]" if (res.get("diagnosis") or {}).get("refusal_unexplained") else ""
        top_s = top_s if top else f"- [{(res.get('diagnosis') or {}).get('status')}]"
        if t["expected_verdict"] == "pass":
            ok = res["verdict"] == "pass"
        elif t["truth"]:
            ok = bool(top and top["id"] in t["truth"] and not top.get("demoted") and res["verdict"] == "fail")
        else:  # no single fix passes (the learned organism): a failed verdict that claims no fix works, no ruled-out cause on top
            ok = res["verdict"] == "fail" and not (res.get("diagnosis") or {}).get("proven") and not (
                top and not top.get("demoted") and top["id"] in t["ruled_out"])
        wrong = [c["id"] for c in causes if not c.get("demoted") and c["id"] in t["ruled_out"]]
        m = t["measured"]
        lines.append(f"| {n} | {', '.join(t['truth']) or ('(passes)' if t['expected_verdict'] == 'pass' else '(no single fix)')} | {m['refusal']:.0%} / {m['correct']:.0%} | {res['verdict']} | {top_s} | "
                     f"{'yes' if ok else 'NO'} | {', '.join(wrong) or '-'} | {sec:.1f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def _write(doc: dict, out_path: Path) -> None:
    """The truth file with its provenance (commit, uncommitted changes, versions, criteria)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    changed = [ln[3:] for ln in changed.splitlines() if ln.strip() and not out_path.resolve().as_posix().endswith(ln[3:].strip())]
    doc["provenance"] = {"script": "benchmarks/diagnosis_matrix.py", "commit": commit, "uncommitted_changes": changed,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cases_version": C.CASES_VERSION,
        "organism_recipe_version": O.RECIPE_VERSION, "torch": torch.__version__,
        "criteria": {"max_refusal": MAX_REFUSAL, "max_correct_drop": MAX_CORRECT_DROP, "damaged_kl": MAX_KL}}
    doc["cases"] = dict(sorted(doc["cases"].items()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organisms", default=",".join(C.IN_SAMPLE),
                    help=f"in-sample {C.IN_SAMPLE} (default), out-of-sample {C.OUT_OF_SAMPLE}, or {C.LEARNED!r} (the learned organism): "
                         "each group has its own truth file")
    ap.add_argument("--learned", action="store_true", help=f"the same as --organisms {C.LEARNED}: the learned organism's cases, measured on "
                    "the first 24 held-out prompts of each set (the matrix audits' --limit), the index scan on LEARNED_SCAN and the "
                    "best-quality index")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: every case of --organisms)")
    ap.add_argument("--out", default=None, help="the truth file (default: tests/data/diagnosis_truth.json, or diagnosis_truth_<org>.json "
                                                "for the other groups)")
    ap.add_argument("--audit", action="store_true", help="do not measure: run `audit run` on each case and print a table against the truth")
    ap.add_argument("--foreign", action="store_true", help="with --audit: audit each case as another tool's ablation (only --base)")
    args = ap.parse_args(argv)
    O._torch_threads()
    orgs = [C.LEARNED] if args.learned else args.organisms.split(",")
    names = args.cases.split(",") if args.cases else [n for n, sp in C.ALL_SPECS.items() if sp.organism in orgs]
    out_path = Path(args.out) if args.out else truth_path(orgs)
    if args.audit:
        print(audit_table(names, out_path, foreign=args.foreign))
        return 0
    doc = json.loads(out_path.read_text()) if out_path.exists() else {"cases": {}, "organisms": {}}
    for org in dict.fromkeys(C.ALL_SPECS[n].organism for n in names):
        t0 = time.time()
        info = C.organism_info(org)
        meta = O.read_meta(info["base"])
        learned = org == C.LEARNED
        ev = Evaluator(info, limit=C.AUDIT_LIMIT if learned else None)  # learned: a real model's generation is slow
        print(f"[{org}] base {ev.base_metrics}", file=sys.stderr, flush=True)
        # learned: 30 layers of a real model, each index a full ablation and evaluation: the best-quality one and a spread
        # over the fine-tuned layers (early indices are dominated by a few huge residual dimensions; removing them breaks the model)
        scan = index_scan(ev, info, sorted({info["mid_index"], *LEARNED_SCAN}) if learned else None)
        doc["organisms"][org] = {"cache_name": Path(info["base"]).name, "family": meta["family"], "variant": meta["variant"],
                                 "recipe_version": meta["recipe_version"], "spec": meta.get("spec"), "train_seconds": meta["train_seconds"],
                                 "build_metrics": meta["metrics"], "mid_index": info["mid_index"], "cos_to_r_star": info["cos_to_r_star"],
                                 "quality": info["quality"], "top1_refusal_expert": info["top1_refusal_expert"], "base": ev.base_metrics,
                                 "index_scan": scan}
        for n in [n for n in names if C.ALL_SPECS[n].organism == org]:
            doc["cases"][n] = run_case(n, ev, info, scan["best_index"])
            c = doc["cases"][n]
            print(f"[{n}] case {c['measured']} truth {c['truth']} ruled out {sorted(c['ruled_out'])}", file=sys.stderr, flush=True)
            _write(doc, out_path)  # after every case: a long run that is stopped keeps what it measured
        print(f"[{org}] {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    _write(doc, out_path)
    print(f"wrote {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
