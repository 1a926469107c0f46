"""What really reached the weights, written down as a config our ablation and the simulator reproduce.

Fixes start from this, never from a group-level summary: a fix for an ablation that edited one routed
expert of a layer must keep the other seven untouched unless the fix itself says otherwise. Per
changed tensor (from the static audit's records) it takes

- the target groups whose part changed (a fused gate_up edited on one half counts for that half),
- the experts that changed (a per-expert key, or the changed slices of a fused tensor),
- the direction: the planned one (manifest or stated config) when the change is along it, else the
  change's own recovered direction (an edit that is not rank-one cannot be reproduced: it is listed),
- the effective scale along that direction, 1 - <r.W', r.W> / ||r.W||^2 (per expert for fused tensors).

Router entries a suppression lowered (``router_mode: suppress``: the correction bias, the router bias, or router
rows shifted along the mean router input) are read back from both checkpoints (small tensors) and written down as
``suppress_experts`` with the strength that reached them (the median over the experts of each one's drop).

Directions that match a measured index (|cos| >= 0.99) use it; others are appended to the directions
as extra rows, so the config can name them. Entries group edits of one layer that share direction,
scale and experts; one layer may have several (disjoint components or experts).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from audit.intent.config import EXPERT_TARGETS, MAX_SCALE, AblationConfig, Entry
from audit.intent.directions import Directions
from audit.model.directory import ModelDir

MATCH_COS = 0.99  # a direction is the measured one at an index
SCALE_STEP = 0.02  # scales are grouped to this step (rounding and bf16 leave ~1e-3)
MIN_RANK1 = 0.5  # below: the change is not a directional edit; it cannot be reproduced by a projection


@dataclass
class Reached:
    """The reached ablation: ``config`` over ``directions`` (the measured ones plus any extra rows), and what it leaves out."""

    config: AblationConfig | None
    directions: object  # audit.forward.measure.Directions
    extra_rows: dict[int, str] = field(default_factory=dict)  # index -> where the direction came from
    unreproduced: list[str] = field(default_factory=list)  # changed tensors no projection reproduces (noise, non-rank-one)
    n_edits: int = 0
    unmeasured_scale: list[str] = field(default_factory=list)  # directional edits whose scale could not be measured (never taken as 1)

    def to_dict(self) -> dict:
        return {"entries": len(self.config.entries) if self.config else 0, "edits": self.n_edits, "extra_directions": self.extra_rows,
                "unreproduced": self.unreproduced[:50], "n_unreproduced": len(self.unreproduced),
                "unmeasured_scale": self.unmeasured_scale[:50], "n_unmeasured_scale": len(self.unmeasured_scale)}

    def summary(self) -> dict:
        """What the diagnosis reads (checks/diagnosis/evidence.py): each entry's layer, index, effective scale, components and
        experts; the router suppression; the edits whose scale is unmeasured; whether any projection reached the weights."""
        cfg = self.config
        entries = [{"layer": e.layer, "measurement": e.measurement, "scale": e.scale * cfg.scale,
                    "components": list(e.components if e.components is not None else cfg.components),
                    "experts": list(e.experts) if e.experts is not None else None} for e in (cfg.entries if cfg else [])]
        sup = cfg.suppressed() if cfg is not None else {}
        return {"entries": entries, "unmeasured_scale": list(self.unmeasured_scale), "projected": bool(entries or self.unmeasured_scale),
                "suppressed": {"experts": [[l, e] for l, es in sup.items() for e in es], "strength": cfg.suppress_strength} if sup else None}


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = v.float().flatten()
    n = v.norm()
    return v / n if n > 0 else v


def _scale_of(ds) -> float | None:
    s = ds.signed_left if ds is not None else None
    return None if s is None else 1.0 - s


def _round(s: float) -> float:
    return round(round(s / SCALE_STEP) * SCALE_STEP, 4)


def reached(record: dict, directions) -> Reached:
    """The reached ablation from ``static_audit(..., record=...)``'s records and the measured ``directions``."""
    diffs, projections, recoveries = record["diffs"], record["projections"], record["recoveries"]
    planned = record.get("planned") or {}
    proj = {p.key: p for p in projections}
    rec = {r.key: r for r in recoveries}
    rows = [_unit(v) for v in directions.refusal_dir]
    extra: list[torch.Tensor] = []
    extra_src: dict[int, str] = {}

    def index_of(u: torch.Tensor, where: str) -> int:
        for i, row in enumerate(rows + extra):
            if row.norm() > 0 and abs(float(row @ u)) >= MATCH_COS:
                return i
        extra.append(u)
        extra_src[len(rows) + len(extra) - 1] = where
        return len(rows) + len(extra) - 1

    items = []  # (layer, target, experts (frozenset) or None for the whole tensor, (index, scale, sparsity), is_bias)
    unreproduced, unmeasured, n = [], [], 0
    supp_keys = set(record.get("suppressed_keys") or [])
    layout = record.get("layout")
    for d in diffs:
        role = layout.roles.get(d.key) if layout is not None else None
        if d.changed and role is not None and (d.key in supp_keys or role.projection in ("correction_bias", "router_bias")):
            supp_keys.add(d.key)
            continue
        if not d.changed or not d.changed_targets:
            continue
        layer = 0 if d.layer is None else d.layer
        pe, p, r = planned.get(d.key), proj.get(d.key), rec.get(d.key)
        along = p.dirs.get("ablated") if p is not None else None
        use_plan = pe is not None and pe.direction is not None and along is not None and (
            r is None or r.recovery.rank1_share < MIN_RANK1 or abs(float(_unit(r.recovery.direction) @ _unit(pe.direction))) >= 0.98)
        if use_plan:
            idx, sparsity, stats = pe.direction_index, pe.sparsity, along
        elif r is not None and r.recovery.rank1_share >= MIN_RANK1:
            idx, sparsity, stats = index_of(_unit(r.recovery.direction), d.key), 0.0, r.recovery.along
        else:
            unreproduced.append(d.key)
            continue
        whole = _scale_of(stats) if stats is not None else (r.recovery.scale if r is not None else None)
        if whole is None:  # a directional edit whose size along it could not be measured: reported as such, never taken as 1
            unmeasured.append(d.key)
            continue
        bias = d.key.endswith("bias")
        n += 1
        if d.component == "experts" and d.expert is not None:
            parts = [(frozenset([d.expert]), whole)]
        elif d.component == "experts" and d.expert_rel_change:
            per = (stats.per_expert if stats is not None else None) or {}
            before, dot = per.get("before") or [], per.get("dot") or []
            parts = [(frozenset([e]), (1.0 - dot[e] / before[e] ** 2) if e < len(before) and before[e] else whole)
                     for e, v in enumerate(d.expert_rel_change) if v and v > 0]
        else:
            parts = [(None, whole)]
        if any(not 0.0 <= sc <= MAX_SCALE for _, sc in parts):  # NaN/Inf weights, r added or blown up: no config of ours reproduces them
            unreproduced.append(d.key)
            n -= 1
            continue
        for experts, sc in parts:
            for t in d.changed_targets:
                items.append((layer, t, experts if t in EXPERT_TARGETS else None, (idx, _round(sc), round(sparsity, 4)), bias))
    n_experts = getattr(record.get("layout"), "n_routed_experts", 0) or 0
    chosen: dict[tuple, dict] = {}  # (layer, target) -> {expert or None: (index, scale, sparsity)}
    for layer, t, experts, how, bias in sorted(items, key=lambda x: x[4]):  # weights before biases: a tensor's bias follows its weight
        slot = chosen.setdefault((layer, t), {})
        for e in (sorted(experts) if experts is not None else [None]):
            slot.setdefault(e, how)
    groups: dict[tuple, list[str]] = defaultdict(list)  # (layer, index, scale, sparsity, experts) -> targets
    for (layer, t), slot in chosen.items():
        if None in slot or t not in EXPERT_TARGETS:
            how = slot.get(None) or Counter(slot.values()).most_common(1)[0][0]
            groups[(layer, *how, None)].append(t)
            continue
        by_how: dict[tuple, list[int]] = defaultdict(list)
        for e, how in slot.items():
            by_how[how].append(e)
        for how, es in by_how.items():
            every = n_experts and len(by_how) == 1 and sorted(es) == list(range(n_experts))
            groups[(layer, *how, None if every else tuple(sorted(es)))].append(t)
    dirs = directions
    if extra:
        pad = torch.zeros(len(extra), directions.hidden_size)
        dirs = Directions(torch.cat([directions.refusal_dir.float(), torch.stack(extra)]), torch.cat([directions.harmful_mean.float(), pad]),
                          torch.cat([directions.harmless_mean.float(), pad]), metadata=dict(directions.metadata or {}))
    entries = [Entry(layer, idx, sc, sp, tuple(dict.fromkeys(targets)), experts)
               for (layer, idx, sc, sp, experts), targets in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][4] or (), kv[0][1], kv[0][2]))]
    cfg = None
    pairs, strength = _suppressed(record, sorted(k for k in supp_keys if any(d.key == k and d.changed for d in diffs)))
    if entries or pairs:
        src = record.get("config")
        cfg = AblationConfig(entries, tuple(dict.fromkeys(t for e in entries for t in e.components)) or ("experts_down",),
                             biprojection=bool(src.biprojection) if src is not None else False,
                             router_mode="suppress" if pairs else "input", source="what reached the weights",
                             suppress_experts=tuple(pairs) if pairs else None, suppress_strength=strength,
                             suppress_measurement=getattr(src, "suppress_measurement", None) if pairs else None)
        cfg = AblationConfig.from_dict(cfg.to_dict(), source=cfg.source)
        n += len(pairs)
    return Reached(cfg, dirs, extra_src, unreproduced, n, unmeasured)


def _suppressed(record: dict, keys: list[str]) -> tuple[list[tuple[int, int]], float | None]:
    """(layer, expert) pairs whose router entry dropped, and the strength that reached them (median drop; for router rows
    the norm of each row's change, the shift along the unit mean input)."""
    if not keys or not record.get("paths"):
        return [], None
    abl, base = (ModelDir(p) for p in record["paths"])
    layout = record["layout"]
    pairs, drops = [], []
    for k in keys:
        role = layout.roles[k]
        a, b = abl.tensor(k).double(), base.tensor(k).double()
        delta = (b - a) if a.ndim == 1 else (b - a).norm(dim=-1)
        tol = 1e-6 + 8e-3 * b.abs().reshape(len(b), -1).max(dim=-1).values  # the stored dtype's rounding is not an edit
        for e in torch.nonzero(delta.abs() > tol).flatten().tolist():
            pairs.append((role.layer, e))
            drops.append(float(delta[e]))
    abl.close()
    base.close()
    if not pairs:
        return [], None
    return sorted(pairs), round(float(torch.tensor(drops).median()), 3)
