"""What the learned organism's refusal looks like, measured with the suite's own tools (README: "The learned organism").

On the cached learned organism (audit/organisms/learned.py), with its training prompts (120 harmful, 120 harmless):

1. signal quality per hidden_states index (`audit measure`'s table: audit.forward.measure + Directions.quality_table),
   and the cosine of each index's direction with the best-quality one;
2. how much of r each writer group writes (the contribution check's "main writers": harmful minus harmless, at the
   last prompt token and over tokens, per group and per layer band), along the best-quality index's direction: the one
   the complete ablation removes (index 0's direction is zero: every prompt ends with the same template token);
3. whether routing shifts on harmful prompts (the routing check: per expert, selection on harmful vs harmless prompts,
   Mann-Whitney U with Benjamini-Hochberg, at the last prompt token and over all tokens);
4. the fine-tuned model against the upcycled one before fine-tuning (the same probes on the weights the build started
   from are not kept, so 4 is the build's own numbers from organism.json).

Whether removing the direction from every writer of every layer removes refusal is measured by
``benchmarks/diagnosis_matrix.py --learned`` (its index scan and the ``lrn-complete`` case), not here.
Run: ``AUDIT_THREADS=1 python benchmarks/learned_profile.py [--json OUT]`` (a few minutes on one thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit.forward.measure import directions_of  # noqa: E402
from audit.forward.probe import probe  # noqa: E402
from audit.organisms import build as O  # noqa: E402
from audit.organisms.learned import cached_learned  # noqa: E402
from checks.contribution import contribution_check, writes  # noqa: E402
from checks.routing import routing_check  # noqa: E402


def profile(path: Path) -> dict:
    model, tok, meta = O.load_organism(path)
    th, ta = O.read_prompts(path, "train_harmful"), O.read_prompts(path, "train_harmless")
    t0 = time.time()
    dirs = directions_of(model, tok, th, ta, batch_size=32, progress=False)
    table = dirs.quality_table()
    best = max(range(1, dirs.n - 1), key=lambda i: table[i]["quality"])
    unit = dirs.refusal_dir / dirs.refusal_dir.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos_best = (unit @ unit[best]).tolist()
    with torch.no_grad():
        ph = probe(model, tok, th, dirs.refusal_dir[best])
        pa = probe(model, tok, ta, dirs.refusal_dir[best])
    L = ph.n_layers
    moe = list(ph.moe_layers)
    wh, wa = writes(ph), writes(pa)
    diff = {k: wh[k] - wa[k] for k in wh}  # the refusal-specific write, per group (experts [L, E])
    per_layer = {"attention": diff["attn"], "dense MLP": diff["mlp"], "shared expert": diff["shared"], "routed experts": diff["experts"].sum(-1)}
    total = sum(float(np.abs(v).sum()) for v in per_layer.values())
    groups = {k: round(float(np.abs(v).sum()) / total, 4) for k, v in per_layer.items()}
    t = meta["recipe"]["trainable_from"]
    mid = (t + L) // 2
    bands = {f"layers 0-{t - 1} (not fine-tuned)": range(0, t), f"layers {t}-{mid - 1}": range(t, mid), f"layers {mid}-{L - 1}": range(mid, L)}
    by_band = {b: {k: round(float(np.abs(v[list(ls)]).sum()) / total, 4) for k, v in per_layer.items()} for b, ls in bands.items()}
    signed = {k: [round(float(x), 4) for x in v] for k, v in per_layer.items()}
    contrib = contribution_check(ph, harmless_before=pa)
    main = [f.message for f in contrib.findings if f.code == "main-writers"]
    routing = {}
    for pos in ("last", "tokens"):
        res = routing_check(ph, pa, position=pos)
        rows = res.data.get("refusal_experts", [])
        fh = ph.last_sel[:, moe].mean(0) if pos == "last" else None
        routing[pos] = {"refusal_associated_cells": len(rows), "tested_cells": len(moe) * ph.n_experts,
                        "layers": sorted({r["layer"] for r in rows}),
                        "top": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "ablated"} for r in rows[:8]]}
        if fh is not None:
            routing[pos]["harmful_last_token_pick_rates"] = {str(l): [round(float(x), 3) for x in fh[i]] for i, l in enumerate(moe)}
            routing[pos]["harmless_last_token_pick_rates"] = {str(l): [round(float(x), 3) for x in pa.last_sel[:, l].mean(0)] for l in moe}
    resid_h = ph.resid_last.mean(0)
    resid_a = pa.resid_last.mean(0)
    return {"organism": path.name, "prompts": {"harmful": len(th), "harmless": len(ta)}, "seconds": round(time.time() - t0, 1),
            "quality": [round(r["quality"], 4) for r in table], "best_index": best, "cos_to_best": [round(c, 3) for c in cos_best],
            "resid_projection_gap": [round(float(a - b), 3) for a, b in zip(resid_h, resid_a)],
            "writer_share": groups, "writer_share_by_band": by_band, "writes_per_layer": signed, "main_writers": main,
            "routing": routing, "moe_layers": moe,
            "build": {k: meta.get(k) for k in ("before", "after", "ablated_every_writer_at_best", "best_index", "build_seconds", "torch_threads")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    O._torch_threads()
    res = profile(cached_learned())
    print(f"best-quality index {res['best_index']}; quality per index: {res['quality']}")
    print(f"cos to the best index's direction: {res['cos_to_best']}")
    print(f"share of the refusal-specific write along r (|harmful - harmless|, summed over layers): {res['writer_share']}")
    for band, v in res["writer_share_by_band"].items():
        print(f"  {band}: {v}")
    print("contribution check:", "; ".join(res["main_writers"]))
    for pos, r in res["routing"].items():
        print(f"routing ({pos}): {r['refusal_associated_cells']} of {r['tested_cells']} layer x expert cells chosen more on harmful prompts "
              f"(BH q < 0.05), layers {r['layers']}; top: {r['top'][:4]}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
