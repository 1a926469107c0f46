"""Key diff of base vs ablated weights, judged against the intent: what changed, what was meant to.

Input: one ``TensorDiff`` per key (built by audit/weights/compare.py from a streamed pair) and an ``Intent``
(from our manifest, a YAML config's plan, or inferred from what changed). Output: the "weights"
CheckResult with findings ``no-change``, ``intended-untouched``, ``unintended-modified`` (with a
``prefix_collision`` flag when an entry for layer N seems to have rewritten layers N0-N9),
``layer-gap``, ``nan-inf``, ``shape-changed``, ``dtype-changed``, ``missing``, ``added``, ``dequantized``
(quantized base tensors stored plain in the ablated model, judged by value), ``gguf-types`` (a GGUF file's tensors,
judged by value up to their type's rounding), and a layer x target-group grid (intended vs actual) for the report.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from checks.conditions import Condition, Measured
from checks.findings import FAIL, INFO, PASS, WARN, CheckResult, Finding, ranges
from checks.layout import TARGETS

GROUP_NAMES = {
    "embed": "embeddings", "attn_out": "attention o_proj", "attn_in": "attention q/k/v", "mlp_down": "dense MLP down_proj",
    "mlp_gate": "dense MLP gate_proj", "mlp_up": "dense MLP up_proj", "experts_down": "routed experts' down_proj",
    "experts_gate": "routed experts' gate_proj", "experts_up": "routed experts' up_proj", "shared_down": "shared experts' down_proj",
    "shared_gate": "shared experts' gate_proj", "shared_up": "shared experts' up_proj", "router": "router",
}
STATUSES = ("unchanged", "changed", "missing", "added", "shape-changed", "dtype-changed")


def _modified_groups(result: dict) -> Measured:
    modified = (result.get("data") or {}).get("modified")
    return Measured(None, "weights not compared in this run") if modified is None else Measured(sorted(t for t, ls in modified.items() if ls))


HOW_TO_STATE_INTENT = ("pass --config (the ablation's YAML; `audit run` writes what reached the weights as reached-config.yaml, "
                       "which a later run can be held to), or audit a model made by `audit ablate` (its manifest states the intent)")


def _intent_stated(result: dict) -> str | None:
    """Why intent conditions do not apply: no manifest, no config (the key diff is shown as evidence, not judged)."""
    if ((result.get("data") or {}).get("intent") or {}).get("source") in (None, "inferred"):
        return f"no intent was stated, so nothing can be called unintended; to judge it, {HOW_TO_STATE_INTENT}"
    return None


def _unintended(result: dict) -> Measured:
    why_not = _intent_stated(result)
    if why_not:
        return Measured(None, why_not)
    bad = [f for f in result.get("findings", []) if f.get("code") == "unintended-modified"]
    return Measured(sum(int(f.get("value") or len(f.get("evidence", {}).get("keys", [])) or 1) for f in bad))


CONDITIONS = (
    Condition("must_ablate", "weights", "subset", (), "target groups that must be modified", _modified_groups),
    Condition("forbid_unintended", "weights", "none", True, "tensors changed outside the stated intent", _unintended, applies=_intent_stated),
)


@dataclass
class TensorDiff:
    """One key's comparison. ``changed_targets``: the target groups whose part of the tensor changed."""

    key: str
    status: str  # one of STATUSES
    layer: int | None = None
    component: str | None = None
    projection: str | None = None
    expert: int | None = None
    io: str | None = None
    targets: tuple[str, ...] = ()
    changed_targets: tuple[str, ...] = ()
    rel_change: float | None = None
    nonfinite_base: int = 0
    nonfinite_ablated: int = 0
    base_shape: tuple | None = None
    ablated_shape: tuple | None = None
    base_dtype: str | None = None
    ablated_dtype: str | None = None
    expert_rel_change: list[float] | None = None
    dtype_changed: bool = False  # stored in another dtype than the base (status says whether the values changed)
    rounded: bool = False  # a quantized copy (GGUF) called unchanged because it differs from the base only by its type's rounding

    @property
    def changed(self) -> bool:
        return self.status == "changed"


@dataclass
class Intent:
    """What the ablation meant to touch: target group -> layers; exact keys when known; config entries."""

    source: str  # manifest / config / inferred
    targets: dict[str, set[int]] = field(default_factory=dict)
    keys: set[str] | None = None
    entries: list[dict] = field(default_factory=list)  # {"layer", "measurement", "scale", "targets"}
    note: str = ""

    def intends(self, target: str, layer: int | None) -> bool:
        return layer is not None and layer in self.targets.get(target, set())

    def to_dict(self) -> dict:
        return {"source": self.source, "targets": {t: sorted(v) for t, v in self.targets.items()}, "entries": self.entries,
                "n_keys": None if self.keys is None else len(self.keys), "note": self.note}


def modified_groups(diffs: list[TensorDiff]) -> dict[str, set[int]]:
    """Target group -> layers where some tensor of the group changed (embeddings: layer 0)."""
    out: dict[str, set[int]] = defaultdict(set)
    for d in diffs:
        if d.changed:
            for t in d.changed_targets:
                out[t].add(0 if d.layer is None else d.layer)
    return dict(out)


def present_groups(diffs: list[TensorDiff]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = defaultdict(set)
    for d in diffs:
        if d.status != "added":
            for t in d.targets:
                out[t].add(0 if d.layer is None else d.layer)
    return dict(out)


def inferred_intent(diffs: list[TensorDiff]) -> Intent:
    """No manifest, no config: the intent is exactly what the edits show (each changed group at the layers it changed).

    Nothing is invented: a group the edits never touched was not "meant", so nothing is "intended but untouched" and
    nothing "unintended" (the gate's intent conditions do not apply; checks/weights.py ``_intent_stated``).
    """
    mod = modified_groups(diffs)
    layers = sorted({l for ls in mod.values() for l in ls})
    if not layers:
        return Intent("inferred", {}, None, [], "nothing changed, so no intent can be inferred")
    return Intent("inferred", {t: set(ls) for t, ls in mod.items() if ls}, None, [],
                  f"what the edits show: {', '.join(f'{t} {ranges(ls)}' for t, ls in sorted(mod.items()) if ls)} (nothing stated, nothing claimed)")


def _collision_entries(layer: int, entry_layers: list[int]) -> list[int]:
    """Entries whose layer number is a string prefix of ``layer`` (1 -> 10..19, 100..): what key.startswith matches."""
    s = str(layer)
    return [n for n in entry_layers if n != layer and s.startswith(str(n))]


def check_weights(diffs: list[TensorDiff], intent: Intent, layers_total: int | None = None, suppressed: list[dict] | None = None) -> CheckResult:
    """The key diff judged against ``intent``; see the module docstring for the findings.

    ``suppressed``: the router entries the intent lowers (``router_mode: suppress``), one row per tensor with its layer,
    experts, strength, unit, rule and reason (and values before / after when a manifest recorded them).
    """
    findings: list[Finding] = []
    n_changed = sum(d.changed for d in diffs)
    mod = modified_groups(diffs)
    present = present_groups(diffs)

    # structural problems first
    for status, code, sev in (("missing", "missing", FAIL), ("added", "added", WARN), ("shape-changed", "shape-changed", FAIL), ("dtype-changed", "dtype-changed", WARN)):
        ds = [d for d in diffs if d.status == status]
        if ds:
            what = {"missing": "in the base but not in the ablated model", "added": "in the ablated model but not in the base",
                    "shape-changed": "with a different shape", "dtype-changed": "stored with a different dtype"}[status]
            detail = [f"{d.key} {d.base_shape}->{d.ablated_shape}" if status == "shape-changed" else
                      f"{d.key} {d.base_dtype}->{d.ablated_dtype}" if status == "dtype-changed" else d.key for d in ds[:20]]
            findings.append(Finding(code, sev, f"{len(ds)} tensor(s) {what}: {', '.join(detail[:5])}{' ...' if len(ds) > 5 else ''}",
                                    value=float(len(ds)), layers=sorted({d.layer for d in ds if d.layer is not None}), evidence={"keys": detail}))
    recast = [d for d in diffs if d.dtype_changed and d.status in ("changed", "unchanged") and not (d.ablated_dtype or "").startswith("GGUF ")]
    if recast:
        kinds = sorted({f"{d.base_dtype}->{d.ablated_dtype}" for d in recast})
        same = [d for d in recast if d.status == "unchanged"]
        findings.append(Finding("dtype-changed", WARN, f"{len(recast)} tensor(s) stored in another dtype than the base ({', '.join(kinds)}): "
                                f"{len(recast) - len(same)} with changed values, {len(same)} equal to the base after rounding (re-saved, not edited)",
                                value=float(len(recast)), layers=sorted({d.layer for d in recast if d.layer is not None}),
                                evidence={"keys": [f"{d.key} {d.base_dtype}->{d.ablated_dtype}" for d in recast[:50]], "conversions": kinds,
                                          "unchanged_after_rounding": len(same)}))
    conv = [d for d in diffs if d.status in ("changed", "unchanged") and (d.ablated_dtype or "").startswith("GGUF ")]
    if conv:  # audit/weights/compare.py: a GGUF tensor within its type's rounding of the base is unchanged (checks/conversion.py)
        kinds = sorted({d.ablated_dtype.removeprefix("GGUF ") for d in conv})
        same = sum(d.status == "unchanged" for d in conv)
        findings.append(Finding("gguf-types", INFO, f"{len(conv)} tensor(s) are stored as GGUF types ({', '.join(kinds)}); compared by value: "
                                f"{same} equal the base up to their type's rounding (unchanged), {len(conv) - same} differ beyond it (changed)",
                                value=float(len(conv)), evidence={"types": kinds, "unchanged": same}))
    deq = [d for d in diffs if d.status in ("changed", "unchanged") and not d.dtype_changed and d.base_dtype and d.ablated_dtype
           and d.base_dtype != d.ablated_dtype and not d.ablated_dtype.startswith("GGUF ")]
    if deq:  # audit/weights/compare.py: a plain copy holding exactly the quantized base's values cast to its dtype is unchanged
        kinds = sorted({f"{d.base_dtype} -> {d.ablated_dtype}" for d in deq})
        findings.append(Finding("dequantized", INFO, f"{len(deq)} quantized tensor(s) of the base are stored plain ({'; '.join(kinds)}); compared by value: "
                                "one holding exactly the base's values cast to its dtype counts as unchanged", value=float(len(deq)),
                                layers=sorted({d.layer for d in deq if d.layer is not None}), evidence={"kinds": kinds, "keys": [d.key for d in deq[:20]]}))
    bad = [d for d in diffs if d.nonfinite_ablated > d.nonfinite_base]
    if bad:
        findings.append(Finding("nan-inf", FAIL, f"NaN/Inf introduced in {len(bad)} tensor(s): {', '.join(d.key for d in bad[:5])}",
                                value=float(sum(d.nonfinite_ablated - d.nonfinite_base for d in bad)), layers=sorted({d.layer for d in bad if d.layer is not None}),
                                evidence={"keys": [d.key for d in bad[:50]]}))

    if n_changed == 0:
        findings.append(Finding("no-change", FAIL, "no tensor changed: the ablated model's weights are bit-identical to the base"
                                + (" or differ from it only by their format's rounding" if any(d.rounded for d in diffs) else ""),
                                value=0.0, evidence={"targets": sorted(intent.targets), "source": intent.source}))

    # intended but untouched: one finding per set of groups sharing the same untouched layers
    untouched: dict[str, list[int]] = {}
    if n_changed:
        for t, layers in intent.targets.items():
            have = present.get(t, set())
            miss = sorted(l for l in layers if l in have and l not in mod.get(t, set()))
            if miss:
                untouched[t] = miss
    by_layers: dict[tuple, list[str]] = defaultdict(list)
    for t, ls in untouched.items():
        by_layers[tuple(ls)].append(t)
    sev_untouched = WARN if intent.source == "inferred" else FAIL
    for ls, ts in sorted(by_layers.items(), key=lambda kv: (kv[0], kv[1])):
        ts = sorted(ts, key=TARGETS.index)
        names = " and ".join(GROUP_NAMES.get(t, t) for t in ts)
        all_layers = sorted(set().union(*(present.get(t, set()) for t in ts)))
        where = "anywhere" if list(ls) == all_layers and not any(mod.get(t) for t in ts) else f"in layers {ranges(ls)}"
        untouched_keys = [d.key for d in diffs if d.layer in ls and not d.changed and set(d.targets) & set(ts)][:20]
        findings.append(Finding("intended-untouched", sev_untouched, f"{names} untouched {where} ({'inferred intent' if intent.source == 'inferred' else intent.source})",
                                value=float(len(ls)), layers=list(ls), evidence={"targets": ts, "layers": list(ls), "keys": untouched_keys, "source": intent.source}))

    # touched but not intended
    if intent.source != "inferred":
        stray = [d for d in diffs if d.changed and (
            (intent.keys is not None and d.key not in intent.keys) or
            (intent.keys is None and not any(intent.intends(t, 0 if d.layer is None else d.layer) for t in d.changed_targets)))]
        if stray:
            layers = sorted({d.layer for d in stray if d.layer is not None})
            entry_layers = sorted({int(e["layer"]) for e in intent.entries if e.get("layer") is not None} | {l for ls in intent.targets.values() for l in ls})
            culprits = {l: _collision_entries(l, entry_layers) for l in layers}
            collided = {l: c for l, c in culprits.items() if c}
            by_entry: dict[int, list[int]] = defaultdict(list)
            for l, c in collided.items():
                by_entry[max(c, key=lambda n: len(str(n)))].append(l)
            msg = f"{len(stray)} tensor(s) changed that the {intent.source} does not name, in layers {ranges(layers) or 'outside the layers'}"
            if by_entry:
                msg += "; " + "; ".join(f"the entry for layer {n} also matched layers {ranges(ls)} (prefix collision: 'layers.{n}' is a string prefix of 'layers.{ls[0]}')"
                                        for n, ls in sorted(by_entry.items()))
            findings.append(Finding("unintended-modified", FAIL, msg, value=float(len(stray)), layers=layers,
                                    evidence={"layers": layers, "keys": [d.key for d in stray[:50]], "targets": sorted({t for d in stray for t in d.changed_targets}),
                                              "prefix_collision": bool(by_entry), "collisions": {str(n): ls for n, ls in by_entry.items()}}))

    # layers left out between ablated ones
    mod_layers = sorted({l for ls in mod.values() for l in ls})
    if len(mod_layers) >= 2:
        gaps = [l for l in range(mod_layers[0], mod_layers[-1] + 1) if l not in mod_layers]
        if gaps:
            intended_layers = {l for ls in intent.targets.values() for l in ls} if intent.source != "inferred" else set()
            meant = [l for l in gaps if l in intended_layers]
            findings.append(Finding("layer-gap", WARN, f"layers {ranges(gaps)} left unmodified between the ablated layers {ranges(mod_layers)}"
                                    + (f" (the intent names {ranges(meant)})" if meant else ""), value=float(len(gaps)), layers=gaps,
                                    evidence={"gaps": gaps, "modified_layers": mod_layers, "intended": meant}))

    if suppressed:
        changed = {d.key for d in diffs if d.changed}
        rows = [{"key": r["key"], "layer": r["layer"], "experts": r["experts"], "strength": r["strength"], "unit": r.get("unit"),
                 "rule": r.get("rule"), "changed": r["key"] in changed, "before": r.get("before"), "after": r.get("after"),
                 "why": r.get("reason") or "named in the config"} for r in suppressed]
        n_exp = sum(len(r["experts"]) for r in rows)
        strengths = ", ".join(sorted({format(r["strength"], "g") for r in rows}))
        left = [r["key"] for r in rows if not r["changed"]]
        findings.append(Finding("router-suppressed", FAIL if left else INFO,
                                f"router selection lowered for {n_exp} expert(s) in {len(rows)} tensor(s) (router_mode: suppress, strength "
                                f"{strengths} {rows[0]['unit'] or ''}): {rows[0]['why']}"
                                + (f"; {len(left)} of them unchanged: {', '.join(left[:5])}" if left else ""),
                                value=float(n_exp), layers=sorted({r["layer"] for r in rows}),
                                experts=[[r["layer"], e] for r in rows for e in r["experts"]], evidence={"tensors": rows}))
    data = _grid(diffs, intent, mod, present, layers_total)
    if suppressed:
        data.setdefault("tables", {})["router-suppressed"] = {
            "title": "Router entries lowered (router_mode: suppress): which, by how much, and why",
            "columns": ["key", "layer", "experts", "strength", "unit", "rule", "changed", "before", "after", "why"], "rows": rows}
    data["counts"] = {s: sum(d.status == s for d in diffs) for s in STATUSES}
    data["intent"] = intent.to_dict()
    data["modified"] = {t: sorted(v) for t, v in mod.items()}
    data["present"] = {t: sorted(v) for t, v in present.items()}
    data["intended"] = {t: sorted(v) for t, v in intent.targets.items()}
    status = max((f.severity for f in findings), key=lambda s: {INFO: 0, PASS: 0, WARN: 1, FAIL: 2}[s], default=PASS)
    summary = (f"{n_changed} of {len(diffs)} tensors changed in layers {ranges(mod_layers) or '-'}; intent from {intent.source}; "
               + ("; ".join(f.message for f in findings if f.severity == FAIL)[:300] or "changes match the intent"))
    return CheckResult("weights", status if status != INFO else PASS, summary, findings, data)


def _grid(diffs, intent: Intent, mod, present, layers_total) -> dict:
    """Matrices for the report: intent vs actual per layer x target group, relative change, changed experts."""
    groups = [t for t in TARGETS if t in present or t in intent.targets]
    n_layers = max([layers_total or 0] + [d.layer + 1 for d in diffs if d.layer is not None])
    code = {(True, True): 2.0, (False, True): 1.0, (True, False): -1.0, (False, False): 0.0}
    vals, rel = [], []
    relmax: dict[tuple[int, str], float] = {}
    for d in diffs:
        if d.rel_change is not None:
            for t in d.targets:
                k = (0 if d.layer is None else d.layer, t)
                relmax[k] = max(relmax.get(k, 0.0), d.rel_change)
    for l in range(n_layers):
        row, rrow = [], []
        for t in groups:
            if l not in present.get(t, set()):
                row.append(None)
                rrow.append(None)
                continue
            row.append(code[(intent.intends(t, l), l in mod.get(t, set()))])
            rrow.append(relmax.get((l, t)))
        vals.append(row)
        rel.append(rrow)
    rows = [f"L{l}" for l in range(n_layers)]
    mats = {
        "intent_vs_actual": {"title": "Intended vs modified, per layer and target group", "rows": rows, "cols": groups, "values": vals,
                             "vmin": -1, "vmax": 2, "unit": "code",
                             "note": "2 intended and modified; 1 modified, not intended; -1 intended, untouched; 0 neither; empty: not in the model"},
        "rel_change": {"title": "Largest relative change ||W'-W||/||W|| per layer and group", "rows": rows, "cols": groups, "values": rel,
                       "vmin": 0.0, "vmax": None, "unit": "ratio", "note": "0: bit-identical"},
    }
    n_exp = max([d.expert + 1 for d in diffs if d.expert is not None] + [len(d.expert_rel_change) for d in diffs if d.expert_rel_change] + [0])
    if n_exp:
        grid: dict[int, list] = {}
        for d in diffs:
            if d.component != "experts" or d.layer is None or d.rel_change is None:
                continue
            row = grid.setdefault(d.layer, [None] * n_exp)
            per = d.expert_rel_change if d.expert_rel_change else ([None] * d.expert + [d.rel_change] if d.expert is not None else [])
            for e, v in enumerate(per):
                if v is not None:
                    row[e] = max(row[e] or 0.0, v)
        layers = sorted(grid)
        mats["experts_rel_change"] = {"title": "Routed experts: largest relative change per expert", "rows": [f"L{l}" for l in layers],
                                      "cols": [f"E{e}" for e in range(n_exp)], "values": [grid[l] for l in layers],
                                      "vmin": 0.0, "vmax": None, "unit": "ratio", "note": "0: every tensor of the expert bit-identical"}
    return {"matrices": mats}
