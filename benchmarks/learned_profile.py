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

5. with ``--ablations``: held-out harmful refusal (the organism's 40 eval prompts, 32 tokens, the suite's judge) after
   removing, in memory (audit/organisms/build.py ``orthogonalize``, float32), one direction from every writer of every
   layer for each index of ``ABLATION_INDICES``; the same with the embeddings too; and each layer's own direction
   (index layer + 1, llm-abliteration's per-layer ``measurement``) from that layer's writers, over the fine-tuned layers.

The matrix's ground truth (`audit ablate`, both prompt sets, KL) is ``benchmarks/diagnosis_matrix.py --learned``.
Run: ``AUDIT_THREADS=1 python benchmarks/learned_profile.py [--ablations] [--json OUT]`` (minutes; --ablations about a
minute per row on one thread).
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
from checks.linalg import project_out  # noqa: E402

ABLATION_INDICES = (10, 14, 17, 20, 22, 24, 26, 28)
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


def ablations(path: Path) -> list[dict]:
    """Held-out harmful refusal after in-memory ablations: one index for every writer; with embeddings; per-layer directions."""
    model, tok, meta = O.load_organism(path)
    rows = [r for r in O.read_eval(path) if r["harmful"]]
    d = directions_of(model, tok, O.read_prompts(path, "train_harmful"), O.read_prompts(path, "train_harmless"), batch_size=32,
                      progress=False).refusal_dir
    n_tok = meta["eval_max_new_tokens"]

    def per_layer(m, lo):
        with torch.no_grad():
            for role in O.writer_roles(m):
                if role.layer is not None and role.layer >= lo:
                    p = m.get_parameter(role.key)
                    p.data.copy_(project_out(p.data, d[role.layer + 1], role.resid_axis).to(p.dtype))

    plans = [(f"index {i}, every writer of every layer", lambda m, i=i: O.orthogonalize(m, d[i], lambda ro: ro.layer is not None))
             for i in ABLATION_INDICES]
    plans += [(f"index {i}, every writer and the embeddings", lambda m, i=i: O.orthogonalize(m, d[i])) for i in (22, 24)]
    t = meta["recipe"]["trainable_from"]
    plans += [(f"each layer's own index (layer + 1), layers {lo}-{len(d) - 2}", lambda m, lo=lo: per_layer(m, lo)) for lo in (t, 15)]
    out = []
    for name, edit in plans:
        m = O._copy_model(model)
        edit(m)
        r = O.evaluate(m, tok, rows, max_new_tokens=n_tok, samples=1)
        out.append({"ablation": name, "harmful_refusal": r["harmful_refusal"], "undecided": r["unknown"], "n": r["n_harmful"],
                    "sample": r["samples"]["harmful"][0]["answer"][:100]})
        print(f"  {name}: refused {r['harmful_refusal']:.0%} of {r['n_harmful']} (undecided {r['unknown']})", flush=True)
        del m
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--ablations", action="store_true", help="also measure refusal after in-memory ablations (about a minute each)")
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
    if args.ablations:
        print("held-out harmful refusal after ablation:")
        res["ablations"] = ablations(cached_learned())
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
