"""How much of the refusal direction r each tensor still writes (or reads) after the ablation.

For a writer the share of its original write capacity along r that is left, ||r^T W'|| / ||r^T W||,
and ||r^T W'|| / ||W'||_F; for a reader ||W' r|| / ||W r|| (one formula: the component along r on
the residual axis, checks/pair_stats.py). Each changed tensor is classified against the rounding
floor of its dtype: ``removed``, ``rounding`` (what is left is what storing W' in bf16/fp16 leaves),
``weak-scale`` (reduced, not removed), ``reflected`` (r flipped, s ~ 2), ``not-ablated``. Per-expert
layer x expert matrices and the router's per-expert logit sensitivity r . W_e come along.

Directions are named: "ablated" (the direction the intent says was removed, or the one recovered
from the edit) and "local" (the layer's own measured direction: index L for readers of layer L,
L+1 for its writers, whose output enters hidden_states[L+1]).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from checks.findings import FAIL, INFO, PASS, WARN, CheckResult, Finding
from checks.layout import WRITER_TARGETS
from checks.pair_stats import DirStats
from checks.weights import GROUP_NAMES, ranges

REMOVED_TOL = 0.05  # share of r left that counts as removed
FLOOR_K = 3.0  # a residue within FLOOR_K x the expected rounding residue is rounding
# A re-quantized weight (FP8, MXFP4): a residue within what re-quantizing the exact edit leaves (computed, not estimated)
# plus REQUANT_MARGIN x the expected rounding residue is rounding; the margin covers another quantizer's roundings. Its
# floor is a large share of r on real widths (FP8: 19 % at 1024 wide, 36 % at 4096), so FLOOR_K x it would call a
# half-strength edit rounding.
REQUANT_MARGIN = 1.0
NOT_ABLATED = 0.95  # share left above this: not ablated
CLASSES = ("removed", "rounding", "weak-scale", "reflected", "not-ablated", "no-signal")


@dataclass
class TensorProjection:
    """One tensor's components along the named directions, before and after."""

    key: str
    layer: int | None
    component: str
    projection: str
    io: str
    targets: tuple[str, ...]
    changed: bool
    dtype: str
    expert: int | None = None
    ablated_fro: float | None = 0.0  # None for an unchanged tensor (not computed)
    dirs: dict[str, DirStats] = field(default_factory=dict)


def classify(ds: DirStats, changed: bool, tol: float = REMOVED_TOL) -> str:
    """removed / rounding / weak-scale / reflected / not-ablated / no-signal for one tensor along one direction."""
    if ds.before <= 0 or not math.isfinite(ds.before):
        return "no-signal"
    if not changed:
        return "not-ablated"
    left, signed = ds.share_left, ds.signed_left
    if signed is not None and signed <= -0.5:
        return "reflected"
    if left <= tol:
        return "removed"
    if ds.floor > 0 and ds.after <= FLOOR_K * ds.floor:
        return "rounding"
    if ds.floor_requant is not None and ds.after <= ds.floor_requant + REQUANT_MARGIN * ds.floor:
        return "rounding"
    if left < NOT_ABLATED:
        return "weak-scale"
    return "not-ablated"


def floor_can_matter(ds: DirStats, tol: float = REMOVED_TOL) -> bool:
    """With ``ds.floor`` an upper bound of the rounding floor of a changed tensor: whether the exact floor could change ``classify``.

    Only ``rounding`` depends on the floor, and only for a signal that is neither reflected nor removed
    (verdicts reached before the floor is looked at); the exact floor is at most the bound, so a residue
    above FLOOR_K x the bound is never rounding. Valid for any ``classify(..., tol)`` with tol >= ``tol``.
    """
    if ds.before <= 0 or not math.isfinite(ds.before):
        return False
    if ds.signed_left <= -0.5 or ds.share_left <= tol:
        return False
    return not (ds.after > FLOOR_K * ds.floor)  # NaN residue: inconclusive, compute it


def _matrix(title, rows_of: dict[int, list], n_cols: int, col_prefix: str, unit: str, note: str, vmax=1.0) -> dict:
    layers = sorted(rows_of)
    return {"title": title, "rows": [f"L{l}" for l in layers], "cols": [f"{col_prefix}{e}" for e in range(n_cols)],
            "values": [rows_of[l] for l in layers], "vmin": 0.0, "vmax": vmax, "unit": unit, "note": note}


def check_projection(recs: list[TensorProjection], n_experts: int = 0, hidden_size: int | None = None,
                     direction_cosines: list[dict] | None = None, tol: float = REMOVED_TOL) -> CheckResult:
    """Shares left along each direction, classes, findings (writer-left, reader-left, precision-loss, weak-scale), matrices."""
    # the main direction: what the ablation meant to remove (its own, else each edit's recovered one), then the model's local ones
    dir_names = sorted({n for r in recs for n in r.dirs}, key=lambda n: ({"ablated": 0, "recovered": 1}.get(n, 2), n))
    if not dir_names:
        return CheckResult("projection", "skip", "no direction to project on: give --directions, --config with measurements, or --harmful/--harmless", [], {})
    findings: list[Finding] = []
    data: dict = {"matrices": {}, "tables": {}, "classes": {}, "writes_before": {}, "writes_after": {}, "reads_before": {}, "reads_after": {}}
    main = dir_names[0]
    mod_layers = {r.layer for r in recs if r.changed and r.layer is not None}
    n_layers = max([r.layer + 1 for r in recs if r.layer is not None] + [0])

    for dn in dir_names:
        per_group_before: dict[str, list] = defaultdict(lambda: [0.0] * n_layers)
        per_group_after: dict[str, list] = defaultdict(lambda: [0.0] * n_layers)
        counts: dict[str, int] = defaultdict(int)
        by_class: dict[str, list[TensorProjection]] = defaultdict(list)
        expert_left: dict[str, dict[int, list]] = defaultdict(dict)
        expert_before: dict[str, dict[int, list]] = defaultdict(dict)
        router_before: dict[int, list] = {}
        router_after: dict[int, list] = {}
        for r in recs:
            ds = r.dirs.get(dn)
            if ds is None:
                continue
            cls = classify(ds, r.changed, tol)
            counts[cls] += 1
            by_class[cls].append(r)
            layer = 0 if r.layer is None else r.layer
            for t in r.targets:
                if layer < n_layers:
                    per_group_before[t][layer] += ds.before
                    per_group_after[t][layer] += ds.after
            if r.component == "experts" and n_experts:
                name = f"experts_{r.projection}"
                if ds.per_expert is not None:
                    b, a = ds.per_expert["before"], ds.per_expert["after"]
                    expert_left[name][layer] = [a[e] / b[e] if b[e] > 0 else None for e in range(min(len(b), n_experts))]
                    expert_before[name][layer] = list(b[:n_experts])
                elif r.expert is not None and r.expert < n_experts:
                    expert_left[name].setdefault(layer, [None] * n_experts)[r.expert] = ds.share_left
                    expert_before[name].setdefault(layer, [None] * n_experts)[r.expert] = ds.before
            if r.component == "router" and r.projection == "router" and ds.vec_before is not None:
                router_before[layer], router_after[layer] = ds.vec_before, ds.vec_after
        data["classes"][dn] = dict(counts)
        for name, rows in expert_left.items():
            data["matrices"][f"{dn}:{name}:share_left"] = _matrix(
                f"{GROUP_NAMES.get(name, name)}: share of r left, ||r.W'||/||r.W|| ({dn} direction)", rows, n_experts, "E", "share",
                "0 removed, 1 untouched; >1 grew")
        for name, rows in expert_before.items():
            data["matrices"][f"{dn}:{name}:before"] = _matrix(
                f"{GROUP_NAMES.get(name, name)}: ||r.W|| before ablation ({dn} direction)", rows, n_experts, "E", "norm",
                "how much each expert writes (down) or reads (gate/up) along r", vmax=None)
        if router_before:
            nE = max(len(v) for v in router_before.values())
            data["matrices"][f"{dn}:router:sensitivity_before"] = _matrix(f"Router logit sensitivity to r, W_e . r, before ({dn})", router_before, nE, "E", "logit per unit r", "signed", vmax=None)
            data["matrices"][f"{dn}:router:sensitivity_after"] = _matrix(f"Router logit sensitivity to r, W_e . r, after ({dn})", router_after, nE, "E", "logit per unit r", "signed", vmax=None)
            for m in (data["matrices"][f"{dn}:router:sensitivity_before"], data["matrices"][f"{dn}:router:sensitivity_after"]):
                m["vmin"] = None
        # per layer x group share left (sums over the group's tensors)
        groups = [g for g in per_group_before if any(per_group_before[g])]
        rows = {l: [(per_group_after[g][l] / per_group_before[g][l]) if per_group_before[g][l] > 0 else None for g in groups] for l in range(n_layers)}
        data["matrices"][f"{dn}:share_left_by_group"] = {"title": f"Share of r left per layer and group ({dn} direction)", "rows": [f"L{l}" for l in range(n_layers)],
                                                         "cols": groups, "values": [rows[l] for l in range(n_layers)], "vmin": 0.0, "vmax": 1.0, "unit": "share",
                                                         "note": "sum over the group's tensors of ||r.W'|| / sum of ||r.W||"}
        for g in groups:
            key = "writes" if g in WRITER_TARGETS else "reads"
            key = key if dn == main else f"{key}_{dn}"
            data.setdefault(f"{key}_before", {})[g] = [per_group_before[g][l] if per_group_before[g][l] > 0 else None for l in range(n_layers)]
            data.setdefault(f"{key}_after", {})[g] = [per_group_after[g][l] if per_group_before[g][l] > 0 else None for l in range(n_layers)]
        if dn != main:
            continue
        findings += _findings(recs, dn, by_class, per_group_before, per_group_after, mod_layers, tol)

    if direction_cosines:
        data["tables"]["direction_cosines"] = {"title": "Cosine of the ablated direction to each layer's measured direction",
                                               "columns": list(direction_cosines[0].keys()), "rows": [list(d.values()) for d in direction_cosines]}
    if hidden_size:
        data["random_direction_share"] = 1 / math.sqrt(hidden_size)
    status = max((f.severity for f in findings), key=lambda s: {INFO: 0, PASS: 0, WARN: 1, FAIL: 2}[s], default=PASS)
    c = data["classes"].get(main, {})
    summary = f"against the {main} direction: " + ", ".join(f"{c[k]} {k}" for k in CLASSES if c.get(k))
    return CheckResult("projection", status if status != INFO else PASS, summary, findings, data)


def _findings(recs, dn, by_class, before, after, mod_layers, tol) -> list[Finding]:
    out: list[Finding] = []
    # writers / readers still carrying r in the layers the ablation worked on: mechanistic evidence, so it warns (an
    # edited tensor that kept r, a scale that overshot, an untouched writer); whether it matters is for the behavioural
    # checks (refusal, damage) to say, and for the diagnosis to explain when they fail
    for io, code in (("writer", "writer-left"), ("reader", "reader-left")):
        for g in sorted(before):
            if (g in WRITER_TARGETS) != (io == "writer"):
                continue
            layers = [l for l in sorted(mod_layers) if l < len(before[g]) and before[g][l] > 0 and after[g][l] / before[g][l] >= tol]
            edited = {r.layer for r in recs if r.changed and g in r.targets and r.layer in layers}
            for part, ls in (("edited", [l for l in layers if l in edited]), ("untouched", [l for l in layers if l not in edited])):
                if not ls:
                    continue
                sev = WARN
                shares = [after[g][l] / before[g][l] for l in ls]
                experts = sorted({(r.layer, r.expert) for r in recs if r.component == "experts" and r.layer in ls and r.expert is not None
                                  and g in r.targets and r.dirs.get(dn) and (r.dirs[dn].share_left or 0) >= tol})
                out.append(Finding(code, sev, f"{GROUP_NAMES.get(g, g)} ({part}) still {'write' if io == 'writer' else 'read'} {max(shares):.0%} "
                                   f"of their r ({dn} direction) in ablated layers {ranges(ls)}", value=max(shares), threshold=tol, layers=ls,
                                   experts=[list(e) for e in experts[:200]],
                                   evidence={"targets": [g], "edited": part == "edited", "share_left": dict(zip(map(str, ls), shares))}))
    rnd = by_class.get("rounding", [])
    if rnd:
        worst = max(rnd, key=lambda r: r.dirs[dn].share_left or 0)
        quantized = worst.dtype.startswith(("FP8", "MXFP4"))  # a block-scaled format (audit/model/logical.py labels): re-rounding undoes edits
        fix = ("an edit re-quantized into it is largely rounded back onto the original grid: store the ablation dequantized "
               "(`audit ablate` without --keep-quantization writes bfloat16)" if quantized else
               "this GGUF type's rounding cannot hold the edit: convert the ablation to a wider type (Q8_0, Q6_K), or accept the residue"
               if worst.dtype.startswith("GGUF") else "compute in float32 and store a wider dtype, or accept the residue")
        out.append(Finding("precision-loss", WARN, f"{len(rnd)} tensor(s) keep up to {worst.dirs[dn].share_left:.1%} of r, which is what rounding to "
                           f"{worst.dtype} leaves (e.g. {worst.key}); {fix}",
                           value=worst.dirs[dn].share_left, threshold=tol, layers=sorted({r.layer for r in rnd if r.layer is not None}),
                           evidence={"keys": [r.key for r in rnd[:50]], "dtype": worst.dtype,
                                     "floor_share": max(worst.dirs[dn].floor, worst.dirs[dn].floor_requant or 0.0) / worst.dirs[dn].before}))
    weak = by_class.get("weak-scale", [])
    if weak:
        s_eff = sorted(1 - (r.dirs[dn].signed_left or 0) for r in weak)
        med = s_eff[len(s_eff) // 2]
        out.append(Finding("weak-scale", WARN, f"{len(weak)} tensor(s) reduced but not removed along r: effective scale ~{med:.2f} "
                           f"(share left ~{1 - med:.0%}); raise scale to 1.0 or lower sparsity", value=med, threshold=1.0,
                           layers=sorted({r.layer for r in weak if r.layer is not None}), evidence={"keys": [r.key for r in weak[:50]], "effective_scale": med}))
    refl = by_class.get("reflected", [])
    if refl:
        signed = sorted(r.dirs[dn].signed_left for r in refl)
        med = signed[len(signed) // 2]
        out.append(Finding("reflected", WARN, f"{len(refl)} tensor(s) have r flipped, not removed: r.W' = {med:+.2f} x r.W (median; effective scale "
                           f"~{1 - med:.2f}, 1 removes r): the edit overshot, was applied twice or as a reflection; r is still written, with its "
                           "sign reversed", value=med, threshold=0.0, layers=sorted({r.layer for r in refl if r.layer is not None}),
                           evidence={"keys": [r.key for r in refl[:50]], "signed_share_left": med, "effective_scale": 1 - med}))
    return out
