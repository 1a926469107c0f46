"""The direction, scale and shape of an ablation, read back from the weights alone.

An orthogonalization W' = W - s r r^T W (writer) or W - s (W r) r^T (reader) changes a tensor by a
rank-one matrix whose singular vector on the residual axis is r. audit/weights/pair_stats.py recovers per
changed tensor that vector, the share of the change's energy it holds (1 for an exact projection,
a little less for norm-preserving edits or rounding) and the effective scale s along it (1: removed,
2: reflected, as a Householder bug or a double application does). Here the tensors are grouped by
direction (|cos| >= 0.99), the pattern is named (one global direction, one per layer, mixed, noise),
and the groups are compared with the intent and with the directions measured on the base: which
measurement index each group matches, its cosine to the best-separating index (where a separating
ablation should measure), and which config entry wrote the tensors of an unintended layer.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from checks.findings import FAIL, INFO, PASS, WARN, CheckResult, Finding
from checks.projection import DirStats
from checks.weights import ranges

GROUP_COS = 0.99  # same direction
MIN_RANK1 = 0.5  # below: the change is not a directional edit
MISMATCH_COS = 0.9  # |cos(ablated, separating)| below this: direction-mismatch
REFLECTED = (1.5, 2.5)


@dataclass
class EditRecovery:
    """The dominant direction of a change D = W' - W on the residual axis."""

    direction: torch.Tensor  # unit [H] float32, sign: largest |component| positive
    rank1_share: float  # sigma_1^2 / ||D||_F^2: 1 for an exact rank-one edit
    scale: float | None  # effective s along the direction over the edited columns: 1 - <u.W', u.W>/||u.W||^2 (1 removed, 2 reflected)
    sigma1: float
    along: DirStats | None = None  # the tensor against its own recovered direction (edited columns only)


@dataclass
class TensorRecovery:
    key: str
    layer: int | None
    component: str
    projection: str
    io: str
    recovery: EditRecovery
    expert: int | None = None


def group_directions(recs: list[TensorRecovery], cos: float = GROUP_COS, min_share: float = MIN_RANK1) -> tuple[list[dict], list[TensorRecovery]]:
    """Greedy grouping by |cos| to each group's first member; returns (groups, noise members)."""
    groups: list[dict] = []
    noise = []
    reps: list[torch.Tensor] = []
    for r in recs:
        if r.recovery.rank1_share < min_share:
            noise.append(r)
            continue
        u = r.recovery.direction
        if reps:
            c = torch.stack(reps) @ u
            j = int(c.abs().argmax())
            if abs(float(c[j])) >= cos:
                g = groups[j]
                g["members"].append(r)
                g["sum"] += u * (1.0 if c[j] >= 0 else -1.0)
                continue
        reps.append(u)
        groups.append({"members": [r], "sum": u.clone()})
    for i, g in enumerate(groups):
        s = g.pop("sum")
        g["id"] = i
        g["direction"] = s / s.norm()
        g["layers"] = sorted({m.layer for m in g["members"] if m.layer is not None})
    return groups, noise


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    m = m.double()
    n = m.norm(dim=1, keepdim=True)
    return torch.where(n > 0, m / n.clamp_min(1e-300), torch.zeros_like(m))


def pattern(groups: list[dict], changed_layers: list[int]) -> str:
    """global / per-layer / mixed / noise / none."""
    if not changed_layers:
        return "none"
    if not groups:
        return "noise"
    main_by_layer = {}
    for l in changed_layers:
        c = Counter(g["id"] for g in groups for m in g["members"] if m.layer == l)
        if c:
            main_by_layer[l] = c.most_common(1)[0][0]
    ids = set(main_by_layer.values())
    if len(ids) == 1 and len(main_by_layer) == len(changed_layers):
        return "global"
    if len(ids) == len(main_by_layer) == len(changed_layers) and len(ids) > 1:
        return "per-layer"
    return "mixed"


def check_recovery(recs: list[TensorRecovery], measured: torch.Tensor | None = None, quality: list[dict] | None = None,
                   intended: dict[int, dict] | None = None, n_changed: int | None = None) -> CheckResult:
    """Group recovered directions and compare them with the measured per-layer directions and the intent.

    ``measured``: refusal directions [n, H] (index i = input of layer i). ``quality``: rows of
    Directions.quality_table() (``index``, ``quality``). ``intended``: layer -> {"direction": unit [H]
    or None, "measurement": int, "scale": float} from the config or manifest.
    """
    findings: list[Finding] = []
    groups, noise = group_directions(recs)
    changed_layers = sorted({r.layer for r in recs if r.layer is not None})
    pat = pattern(groups, changed_layers)
    separating = None
    if quality:  # the best-separating index, skipping the embeddings (0) and the final normed output (last)
        inner = [q for q in quality if 0 < q["index"] < len(quality) - 1] or quality
        separating = int(max(inner, key=lambda q: q.get("quality") or -math.inf)["index"])
    mrows = _unit_rows(measured) if measured is not None else None
    intended = intended or {}
    int_dirs = {l: e["direction"] for l, e in intended.items() if e.get("direction") is not None}

    table_rows, curves = [], {}
    for g in groups:
        d = g["direction"].double()
        mem = g["members"]
        scales = [m.recovery.scale for m in mem]
        info = {"group": g["id"], "layers": ranges(g["layers"]), "tensors": len(mem), "scale": _median(scales),
                "rank1_share_min": min(m.recovery.rank1_share for m in mem), "best_index": None, "cos_best": None, "cos_separating": None,
                "intended_layers": None}
        if mrows is not None and mrows.shape[1] == d.numel():
            cs = (mrows @ d).abs()
            bi = int(cs.argmax())
            info["best_index"], info["cos_best"] = bi, float(cs[bi])
            if separating is not None and separating < len(cs):
                info["cos_separating"] = float(cs[separating])
            curves[f"group {g['id']} (layers {info['layers']})"] = cs.tolist()
        if int_dirs:
            match = [l for l, v in int_dirs.items() if v.numel() == d.numel() and abs(float(v.double() @ d)) >= GROUP_COS]
            info["intended_layers"] = ranges(match) if match else None
            g["entries"] = match
        g["info"] = info
        table_rows.append(info)

    # which entry wrote the tensors of each layer (intended ones and strays)
    per_layer = []
    for l in changed_layers:
        c = Counter(g["id"] for g in groups for m in g["members"] if m.layer == l)
        n_noise = sum(1 for m in noise if m.layer == l)
        gid = c.most_common(1)[0][0] if c else None
        row = {"layer": l, "group": gid, "groups": len(c), "noise_tensors": n_noise, "intended": l in intended,
               "cos_intended": None, "written_by_entry": None, "scale": None, "cos_measured_local": None}
        if gid is not None:
            g = groups[gid]
            d = g["direction"].double()
            row["scale"] = _median([m.recovery.scale for m in g["members"] if m.layer == l])
            if l in int_dirs and int_dirs[l].numel() == d.numel():
                row["cos_intended"] = abs(float(int_dirs[l].double() @ d))
            ents = g.get("entries")
            if ents is None:  # no intended directions: the entry whose layer shares the group
                ents = [x for x in intended if any(m.layer == x for m in g["members"])]
            if ents:
                row["written_by_entry"] = l if l in ents else min(ents, key=lambda x: (not str(l).startswith(str(x)), x))
            if mrows is not None and l < mrows.shape[0] and mrows.shape[1] == d.numel():
                row["cos_measured_local"] = abs(float(mrows[l] @ d))
        per_layer.append(row)

    # findings
    for g in groups:
        info = g["info"]
        if info["cos_separating"] is not None and info["cos_separating"] < MISMATCH_COS:
            findings.append(Finding(
                "direction-mismatch", WARN,
                f"the direction ablated in layers {info['layers']} matches measurement index {info['best_index']} (|cos| {info['cos_best']:.3f}) "
                f"but refusal is best separated at index {separating}: |cos| to it = {info['cos_separating']:.3f}; set measurement: {separating}",
                value=info["cos_separating"], threshold=MISMATCH_COS, layers=g["layers"],
                evidence={"cosine": info["cos_separating"], "separating_index": separating, "ablated_index": info["best_index"], "group": g["id"]}))
    refl = [m for g in groups for m in g["members"] if m.recovery.scale is not None and REFLECTED[0] <= m.recovery.scale <= REFLECTED[1]]
    if refl:
        findings.append(Finding("reflected", WARN, f"{len(refl)} tensor(s) in layers {ranges(m.layer for m in refl)} were reflected along their edit direction "
                                f"(effective scale ~{_median([m.recovery.scale for m in refl]):.2f}): r is flipped, not removed -- the edit was applied "
                                "twice or as a Householder reflection", value=_median([m.recovery.scale for m in refl]), threshold=1.0,
                                layers=sorted({m.layer for m in refl if m.layer is not None}), evidence={"keys": [m.key for m in refl[:50]]}))
    if noise:
        findings.append(Finding("noise-edit", WARN, f"{len(noise)} changed tensor(s) in layers {ranges(m.layer for m in noise) or '-'} were not edited along "
                                f"one direction (largest singular value holds < {MIN_RANK1:.0%} of the change): not a directional ablation",
                                value=max(m.recovery.rank1_share for m in noise), threshold=MIN_RANK1,
                                layers=sorted({m.layer for m in noise if m.layer is not None}), evidence={"keys": [m.key for m in noise[:50]]}))
    strays = [r for r in per_layer if intended and not r["intended"] and r["written_by_entry"] is not None]
    if strays:
        by = defaultdict(list)
        for r in strays:
            by[r["written_by_entry"]].append(r["layer"])
        findings.append(Finding("unintended-direction", WARN, "; ".join(f"layers {ranges(ls)} were edited with the direction of the entry for layer {e}"
                                                                         for e, ls in sorted(by.items())),
                                layers=sorted(r["layer"] for r in strays), evidence={"entries": {str(e): ls for e, ls in by.items()}}))

    data = {
        "pattern": pat, "separating_index": separating,
        "groups": [{k: v for k, v in g["info"].items()} for g in groups],
        "tables": {
            "groups": {"title": "Directions recovered from the weights (tensors grouped at |cos| >= 0.99)",
                       "columns": list(table_rows[0].keys()) if table_rows else [], "rows": [list(r.values()) for r in table_rows]},
            "layers": {"title": "Per layer: recovered direction, scale, which entry wrote it",
                       "columns": list(per_layer[0].keys()) if per_layer else [], "rows": [list(r.values()) for r in per_layer]},
        },
        "curves": {},
    }
    if curves:
        data["curves"]["cos_to_measured"] = {"title": "|cos| of each recovered direction to the measured direction at each index",
                                             "x": list(range(mrows.shape[0])), "xlabel": "measurement index (input of layer i)", "series": curves}
    if quality:
        data["tables"]["signal_quality"] = {"title": "Signal quality of the measured directions (best index marked)",
                                           "columns": ["index", "quality", "snr", "cos", "purity", "best"],
                                           "rows": [[q.get("index"), q.get("quality"), q.get("snr"), q.get("cos"), q.get("purity"), q.get("index") == separating] for q in quality]}
        data["suggested_measurement"] = separating
    status = max((f.severity for f in findings), key=lambda s: {INFO: 0, PASS: 0, WARN: 1, FAIL: 2}[s], default=PASS)
    summary = (f"{len(recs)} changed tensors: {len(groups)} direction group(s), pattern {pat}"
               + (f"; {len(noise)} noise" if noise else "") + (f"; best measurement index {separating}" if separating is not None else ""))
    if not recs:
        summary = "no changed tensor to recover a direction from"
    return CheckResult("recovery", status if status != INFO else PASS, summary, findings, data)
