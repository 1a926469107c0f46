"""The evidence the diagnosis reads, typed, built purely from a run's check results and what reached the weights.

``build_evidence`` takes plain data (the checks as ``CheckResult.to_dict()`` gives them, what reached the weights as
audit/intent/reached.py summarizes it, model and direction facts, the gate's limits, the bypass test) and returns
one frozen ``Evidence``. The rules (checks/diagnosis/rules.py) read only this; every field says which measurement it
comes from, and a cause cites that measurement (checks/diagnosis/cause.py ``cite``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from checks.layout import SUPPRESS_RULES, SUPPRESS_STRENGTHS, SUPPRESS_UNITS
from checks.thresholds import DEGENERATE_FIRST, MAX_KL, MAX_REFUSAL_AFTER


@dataclass(frozen=True)
class Evidence:
    # weights check: what changed per target group, what the model has, what was stated
    modified: dict = field(default_factory=dict)  # group -> layers changed
    present: dict = field(default_factory=dict)  # group -> layers the model has it in
    intended: dict = field(default_factory=dict)  # group -> layers a stated intent names ({} without one)
    intent_stated: bool = False
    weight_findings: tuple = ()  # weights + projection findings read by code (weak-scale, precision-loss, intended-untouched, ...)
    # model facts
    n_layers: int = 0
    moe_layers: tuple = ()
    n_experts: int = 0
    suppress_strengths: tuple = ()  # the family's router-suppression strengths, smallest first (none: the router cannot be so edited)
    suppress_unit: str = ""
    # contribution check: the refusal-specific write along r per group and layer, and the residual stream's projection
    writes_before: dict = field(default_factory=dict)
    writes_after: dict = field(default_factory=dict)
    residual_before: tuple = ()
    residual_after: tuple = ()
    # routing check
    refusal_experts: tuple = ()  # [layer, expert] selected significantly more on harmful prompts (base)
    compensation: bool = False  # after ablation harmful prompts moved to other refusal-associated experts
    router_modified: bool = False
    router_unchanged: bool = False  # the router was edited and routing on harmful prompts is shown unchanged (an equivalence test)
    # what reached the weights (audit/intent/reached.py)
    projected: bool = False  # some directional projection reached the weights (not only a router suppression, not nothing)
    partial_experts: dict = field(default_factory=dict)  # layer -> the routed experts edited, where a subset was
    reached_scales: dict = field(default_factory=dict)  # layer -> effective scales along the ablated direction (measured ones only)
    unmeasured_scales: int = 0  # edited tensors whose scale could not be measured (reported, never taken as 1)
    suppressed: dict | None = None  # {"experts": [[l, e]], "strength": s} when a router suppression reached the weights
    # the directions
    separating_index: int | None = None
    ablated_index: int | None = None
    cos_ablated_separating: float | None = None
    quality: dict = field(default_factory=dict)  # index -> signal quality of the direction measured there
    # behaviour (refusal and damage checks, the gate's limits)
    refusal_before: float | None = None
    refusal_after: float | None = None
    refusal_target: float = MAX_REFUSAL_AFTER
    max_kl: float = MAX_KL
    damaged: str | None = None  # why the model counts as damaged (a failed damage threshold or finding), else None
    damage_first: bool = False  # degenerate answers or NaN: damage explains the rest
    degenerate_share: float = 0.0
    nonfinite: bool = False
    # the simulator's bypass test: refusal (and KL) with every residual writer ablated, per measurement index
    bypass: dict | None = None
    bypass_kl: dict | None = None

    @property
    def refusal_gone(self) -> bool:
        return self.refusal_after is not None and self.refusal_after == self.refusal_after and self.refusal_after <= self.refusal_target


def _findings(check: dict | None) -> list[dict]:
    return [f for f in (check or {}).get("findings") or [] if isinstance(f, dict)]


def _data(check: dict | None) -> dict:
    return (check or {}).get("data") or {}


def _rate(refusal: dict | None, key: str) -> float | None:
    r = _data(refusal).get(key) or {}
    if not r.get("n"):
        return None
    state = ((refusal or {}).get("nonfinite") or {}).get(f"data.{key}.rate")
    return float(state) if state else r.get("rate")


DAMAGE_THRESHOLDS = ("max_kl", "max_degenerate", "max_over_refusal", "check:damage")
WEIGHT_CODES = ("weak-scale", "precision-loss", "intended-untouched", "no-change", "unintended-modified")


def build_evidence(checks: dict, reached: dict | None = None, model: dict | None = None, directions: dict | None = None,
                   gate: dict | None = None, limits: dict | None = None, bypass: dict | None = None) -> Evidence:
    """Evidence from plain data.

    ``checks``: name -> check dict. ``reached``: {"entries": [{layer, measurement, scale, components, experts}],
    "suppressed": {...} | None, "unmeasured_scale": [keys]} (audit/intent/reached.py ``Reached.summary()``).
    ``model``: {"family", "num_layers", "moe_layers", "n_routed_experts"}. ``directions``: {"separating_index",
    "ablated_index", "cos_ablated_separating", "quality": [{index, quality}]}. ``gate``: the evaluated gate (its failed
    damage rows say the model is damaged); ``limits``: the gate's limits (the refusal target, the KL bound).
    ``bypass``: {index: {"rate", "kl"}} from the simulator.
    """
    model, directions, reached, limits = model or {}, directions or {}, reached or {}, limits or {}
    weights, contribution, routing = checks.get("weights"), checks.get("contribution"), checks.get("routing")
    refusal, damage = checks.get("refusal"), checks.get("damage")
    w = _data(weights)
    gw = _data(contribution).get("group_writes") or {}
    codes = {f.get("code") for f in _findings(routing)}
    rule = SUPPRESS_RULES.get(model.get("family") or "")

    partial: dict[int, set[int]] = {}
    scales: dict[int, list[float]] = {}
    for e in reached.get("entries") or []:
        if e.get("scale") is not None:
            scales.setdefault(int(e["layer"]), []).append(float(e["scale"]))
        comps = set(e.get("components") or ())
        if e.get("experts") is not None and comps & {"experts_down", "experts_gate", "experts_up"}:
            partial.setdefault(int(e["layer"]), set()).update(int(x) for x in e["experts"])
    sup = reached.get("suppressed")

    dmg = _data(damage)
    degenerate = float((dmg.get("degenerate") or {}).get("rate") or 0.0)
    nonfinite = any(f.get("code") == "nan-inf" for c in (weights, damage, contribution, checks.get("projection")) for f in _findings(c))
    failed = [t for t in (gate or {}).get("thresholds") or [] if t.get("passed") is False and t.get("name") in DAMAGE_THRESHOLDS]
    damaged = next((f["message"] for f in _findings(damage) if f.get("severity") == "fail"), None) or (
        "; ".join(t.get("message", t["name"]) for t in failed) if failed else None)
    if nonfinite and not damaged:
        damaged = "NaN/Inf in the ablated weights, its activations or its outputs"

    quality = {int(q["index"]): float(q["quality"]) for q in directions.get("quality") or [] if q.get("quality") is not None}
    byp = {int(k): v.get("rate") for k, v in (bypass or {}).items()} if bypass else None
    byp_kl = {int(k): v.get("kl") for k, v in (bypass or {}).items()} if bypass else None
    target = limits.get("max_refusal_after")
    max_kl = limits.get("max_kl")
    return Evidence(
        modified={k: sorted(v) for k, v in (w.get("modified") or {}).items() if v}, present={k: sorted(v) for k, v in (w.get("present") or {}).items()},
        intended={k: sorted(v) for k, v in (w.get("intended") or {}).items()} if (w.get("intent") or {}).get("source") not in (None, "inferred") else {},
        intent_stated=(w.get("intent") or {}).get("source") not in (None, "inferred"),
        weight_findings=tuple(f for c in (weights, checks.get("projection")) for f in _findings(c) if f.get("code") in WEIGHT_CODES),
        n_layers=int(model.get("num_layers") or 0), moe_layers=tuple(model.get("moe_layers") or ()), n_experts=int(model.get("n_routed_experts") or 0),
        suppress_strengths=tuple(SUPPRESS_STRENGTHS[rule]) if rule else (), suppress_unit=SUPPRESS_UNITS[rule] if rule else "",
        writes_before=gw.get("before") or {}, writes_after=gw.get("after") or {},
        residual_before=tuple(gw.get("residual_before") or ()), residual_after=tuple(gw.get("residual_after") or ()),
        refusal_experts=tuple(tuple(x) for f in _findings(routing) if f.get("code") == "refusal-experts" for x in f.get("experts") or []),
        compensation="routing-compensation" in codes, router_modified=bool((w.get("modified") or {}).get("router")),
        router_unchanged="router-ineffective" in codes,
        projected=bool(reached.get("projected", reached.get("entries"))),
        partial_experts={l: sorted(es) for l, es in partial.items()}, reached_scales=scales,
        unmeasured_scales=len(reached.get("unmeasured_scale") or []),
        suppressed={"experts": [list(x) for x in sup["experts"]], "strength": sup["strength"]} if sup else None,
        separating_index=directions.get("separating_index"), ablated_index=directions.get("ablated_index"),
        cos_ablated_separating=directions.get("cos_ablated_separating"), quality=quality,
        refusal_before=_rate(refusal, "before"), refusal_after=_rate(refusal, "after"),
        refusal_target=MAX_REFUSAL_AFTER if target is None else float(target), max_kl=math.inf if max_kl is None else float(max_kl),
        damaged=damaged, damage_first=degenerate >= DEGENERATE_FIRST or nonfinite, degenerate_share=degenerate, nonfinite=nonfinite,
        bypass=byp, bypass_kl=byp_kl)
