"""`audit demo`: the embedded default, end to end, no downloads.

Grows (or reuses) the demo organism, ablates it the way the troubleshooting guide's "current code"
does (routed experts' down_proj, the router, the shared expert's down_proj and attention, in a
middle band of layers), audits it, applies the report's own top fix with our ablation, re-audits,
and prints both verdicts and where the reports are.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from audit.ablation.ablate import ablate
from audit.forward.measure import measure_directions
from audit.intent.config import AblationConfig
from audit.model.directory import ModelDir
from audit.model.prompts import load_prompts
from audit.organisms.build import cached_organism, read_meta
from audit.outputs import MARKER, check_destination
from audit.pipeline.run import RunOptions, run_audit


OLD_MARKER = ".audit-demo"  # what earlier versions wrote; audit.outputs.MARKER now
GUIDE_COMPONENTS = ["experts_down", "router", "shared_down", "attn_out"]


def guide_config(num_layers: int, measurement: int):
    """The guide's 'current code': writers of routed/shared experts, the router and attention, middle layers only."""
    lo, hi = max(1, num_layers // 4), max(1, (3 * num_layers) // 4 - 1)
    return AblationConfig.from_dict({"components": GUIDE_COMPONENTS, "ablate": [{"layer": f"{lo}-{hi}", "measurement": measurement}]},
                                    source="the troubleshooting guide's current code")


def run_demo(out: str = "audit-demo", family: str = "glm4_moe", variant: str = "base", seed: int = 0, limit: int | None = None,
             quiet: bool = False) -> dict:
    t0 = time.time()
    out = Path(out).absolute()
    if not (out / OLD_MARKER).is_file():  # an earlier demo's folder is ours to replace
        check_destination(out, [], force=True)  # refuses a file, an unwritable place, a folder of anyone else's
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"[demo] organism {family}/{variant} (seed {seed}): building or reusing the cached one ...")
    org = cached_organism(family, variant, seed)
    info = read_meta(org)
    md = ModelDir(org)
    say("[demo] measuring refusal directions on the organism's training prompts ...")
    dirs = measure_directions(md, load_prompts(str(org / "prompts" / "train_harmful.txt"), "harmful"),
                              load_prompts(str(org / "prompts" / "train_harmless.txt"), "harmless"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"tool": "moe-ablation-audit", "kind": "demo"}) + "\n")
    cfg = guide_config(md.layout.num_layers, int(info.get("separating_index", md.layout.num_layers // 2)))
    say(f"[demo] ablating as the guide's current code does: components {GUIDE_COMPONENTS}, layers {cfg.entries[0].layer}-{cfg.entries[-1].layer} ...")
    ablate(org, cfg, out / "ablated", directions=dirs, force=True)
    say("[demo] auditing the ablated model (then applying the report's fix and re-auditing) ...")
    res = run_audit(RunOptions(model_dir=str(out / "ablated"), out=str(out / "report"), apply_fix=str(out / "fixed"), force=True,
                               limit=limit, max_new_tokens=48, quiet=quiet, command="audit demo"))
    applied = res.get("applied_fix") or {}
    summary = {
        "organism": str(org), "verdict": res["verdict"], "headline": res["headline"],
        "top_cause": res["causes"][0]["id"] if res["causes"] else None,
        "report": str((out / "report" / "report.html").resolve()),
        "fixed_verdict": applied.get("verdict"), "fixed_refusal_rate": applied.get("refusal_rate"),
        "fixed_report": str((out / "report" / "applied-fix" / "report.html").resolve()) if applied else None,
        "seconds": round(time.time() - t0, 1),
    }
    return summary
