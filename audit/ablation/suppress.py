"""Expert suppression at the router (``router_mode: suppress``): lower chosen experts' selection score by a weight edit.

The other side of an ablation: instead of removing r from what the refusal experts write, the router stops choosing
them. How a family's selection is lowered, and the unit of the strength, is checks/layout.py's SUPPRESS_RULES; the
arithmetic lives here once (``edited``) and serves both the weights (audit/ablation/ablate.py) and the hooks
(audit/forward/intervene.py), so the simulated fix is the applied one. ``suppress_experts: auto`` is resolved here too: the
experts the routing check (checks/routing.py) finds significantly more selected on harmful prompts at the last prompt
token (risk difference > 0, Benjamini-Hochberg q < 0.05), measured on the base with the probe audit run uses.

Trade-off against projecting r out of the experts (``components: [experts_down]``): suppression leaves every weight
that writes r in place and only changes which experts run, so harmless prompts that used those experts are routed
elsewhere too (the KL the report shows), and any expert the router falls back to that also carries r keeps refusal
alive; projection keeps routing as it was and removes r wherever it is written, but must reach every expert that writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from audit.forward.probe import probe
from audit.model.directory import ModelDir
from audit.model.prompts import load_prompts
from checks.errors import AuditError
from checks.layout import SUPPRESS_TENSOR, SUPPRESS_UNITS, Layout, suppress_rule
from checks.routing import routing_check


@dataclass
class SuppressEdit:
    """One router tensor's suppression: ``experts`` of ``layer`` lose ``strength`` (rule's unit) of their selection score."""

    key: str
    layer: int
    experts: tuple[int, ...]
    strength: float
    rule: str  # a SUPPRESS_RULES value
    direction: torch.Tensor | None = None  # row_along_mean: the unit mean router input u [hidden], float32
    direction_index: int | None = None
    why: dict | None = None  # auto: the routing evidence per expert

    def to_dict(self) -> dict:
        return {"key": self.key, "layer": self.layer, "experts": list(self.experts), "strength": self.strength, "rule": self.rule,
                "unit": SUPPRESS_UNITS[self.rule], "direction_index": self.direction_index, "why": self.why}


def edited(t: torch.Tensor, rule: str, experts, strength: float, direction: torch.Tensor | None = None) -> torch.Tensor:
    """The suppressed copy of a router tensor (same dtype): float32 arithmetic, cast back once.

    correction_bias / router_bias: ``t[e] - strength``; row_along_mean: ``w_e - strength u`` for each listed row.
    """
    w = t.detach().to(torch.float32).clone()
    idx = torch.as_tensor(list(experts), dtype=torch.long, device=w.device)
    if rule in ("correction_bias", "router_bias"):
        w[idx] -= float(strength)
    elif rule == "row_along_mean":
        w[idx] -= float(strength) * direction.to(device=w.device, dtype=torch.float32)
    else:
        raise AuditError(f"unknown suppress rule {rule!r}")
    return w.to(t.dtype)


def _router_keys(layout: Layout, layer: int, projection: str) -> list[str]:
    return sorted(k for k, r in layout.roles.items() if r.layer == layer and r.component == "router" and r.projection == projection)


def mean_input_direction(mean: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """u: the unit mean router input, the residual mean times the norm weight the router input passes through."""
    u = mean.double() * (norm_weight.double() if norm_weight is not None else 1.0)
    n = u.norm()
    if not torch.isfinite(n) or n == 0:
        raise AuditError("the mean router input is zero or not finite: the bias-free fallback has no direction to shift along")
    return (u / n).float()


def norm_key(layout: Layout, layer: int) -> str | None:
    """The key of the norm a layer's router input passes through (post_attention_layernorm), if the checkpoint has one."""
    keys = [k for k, r in layout.roles.items() if r.layer == layer and r.component == "norm" and "post_attention_layernorm" in k
            and k.endswith("weight")]
    return keys[0] if keys else None


def plan_suppress(config, layout: Layout, directions=None, norm_weight=None) -> list[SuppressEdit]:
    """The router edits of a ``router_mode: suppress`` config (explicit experts) on ``layout``; [] for other modes.

    AuditError when the family's router cannot be edited this way, a layer is not a MoE layer, an expert is out of range,
    or the tensor the rule edits is missing (a GLM checkpoint without e_score_correction_bias). ``norm_weight(layer)``:
    the router input's norm weight (row_along_mean; None: the mean residual alone).
    """
    if config.router_mode != "suppress":
        return []
    if isinstance(config.suppress_experts, str):
        raise AuditError(f"{config.source}: suppress_experts: auto must be resolved on the base first (audit ablate does it with a "
                         "forward pass on the harmful and harmless prompts)")
    rule = suppress_rule(layout.family)
    out = []
    for layer, experts in config.suppressed().items():
        if layer not in layout.moe_layers:
            raise AuditError(f"{config.source}: suppress_experts names layer {layer}, which is not a MoE layer of this {layout.family} "
                             f"model (MoE layers: {layout.moe_layers[0] if layout.moe_layers else '-'}..{layout.moe_layers[-1] if layout.moe_layers else '-'})")
        n = layout.n_routed_experts
        bad = [e for e in experts if not 0 <= e < n]
        if bad:
            raise AuditError(f"{config.source}: suppress_experts at layer {layer}: experts {bad} out of range; it has experts 0..{n - 1}")
        if layout.top_k and n - len(experts) < layout.top_k:
            raise AuditError(f"{config.source}: suppressing {len(experts)} of {n} experts at layer {layer} leaves fewer than top_k={layout.top_k}")
        keys = [k for k in _router_keys(layout, layer, SUPPRESS_TENSOR[rule]) if rule != "row_along_mean" or k.endswith("weight")]
        if not keys:
            what = {"correction_bias": "e_score_correction_bias", "router_bias": "router bias", "row_along_mean": "router weight"}[rule]
            raise AuditError(f"{config.source}: layer {layer} has no {what} to edit (suppress on {layout.family} edits it); is this checkpoint complete?")
        r = index = None
        if rule == "row_along_mean" and directions is not None:
            index, mean = suppress_direction(config, layer, directions)
            r = mean_input_direction(mean, norm_weight(layer) if norm_weight is not None else None)
        out.append(SuppressEdit(keys[0], layer, tuple(experts), float(config.suppress_strength), rule, r, index))
    return out


def suppress_direction(config, layer: int, directions) -> tuple[int, torch.Tensor]:
    """(index, mean residual) the bias-free fallback shifts along at ``layer``: the mean of the harmful and harmless means at
    ``suppress_measurement``, else at the layer's own index (hidden_states[layer], the stream its router reads)."""
    index = layer if config.suppress_measurement is None else config.suppress_measurement
    if index >= directions.n:
        raise AuditError(f"{config.source}: suppress direction index {index} (layer {layer}) is not in the directions file "
                         f"(indices 0..{directions.n - 1}); set suppress_measurement")
    mean = (directions.harmful_mean[index].double() + directions.harmless_mean[index].double()) / 2
    if not torch.isfinite(mean.norm()) or mean.norm() == 0:
        raise AuditError(f"{config.source}: the mean residual at index {index} is zero; set suppress_measurement to another index")
    return index, mean.float()


def auto_experts(harmful_probe, harmless_probe, alpha: float = 0.05) -> list[dict]:
    """The routing check's refusal-associated experts (harmful vs harmless on the base, last prompt token, BH q < alpha)."""
    res = routing_check(harmful_probe, harmless_probe, alpha=alpha, position="last")
    return list(res.data.get("refusal_experts") or [])


def resolve_auto(config, base_dir, directions, harmful=None, harmless=None, batch_size: int = 16, progress: bool | None = None,
                 sources: dict | None = None):
    """``config`` with ``suppress_experts: auto`` replaced by the measured experts, and the evidence per expert.

    Prompts: the given lists (``sources`` says where they came from, for the manifest), else the base directory's
    prompts/train_{kind}.txt or prompts/{kind}.txt, else the embedded sets.
    """
    md = base_dir if isinstance(base_dir, ModelDir) else ModelDir(base_dir)

    def source(kind):
        for name in (f"train_{kind}.txt", f"{kind}.txt"):
            p = md.path / "prompts" / name
            if p.is_file():
                return str(p)
        return None

    sources = dict(sources or {})
    for kind in ("harmful", "harmless"):
        if (harmful if kind == "harmful" else harmless) is None:
            sources[kind] = source(kind) or "embedded"
    harmful = harmful if harmful is not None else load_prompts(source("harmful"), "harmful")
    harmless = harmless if harmless is not None else load_prompts(source("harmless"), "harmless")
    model = md.load_model()
    tok = md.tokenizer()
    r = directions.refusal_dir[directions.separating_index()]  # routing does not depend on it; the probe records writes along it too
    bar = tqdm(total=len(harmful) + len(harmless), unit="prompt", desc="suppress_experts: auto", disable=None if progress is None else not progress)
    try:
        ph = probe(model, tok, harmful, r, batch_size=batch_size, progress=lambda done, n: bar.update(done - bar.n))
        pa = probe(model, tok, harmless, r, batch_size=batch_size, progress=lambda done, n: bar.update(len(harmful) + done - bar.n))
    finally:
        bar.close()
        del model
    rows = auto_experts(ph, pa)
    if not rows:
        raise AuditError(f"{config.source}: suppress_experts: auto found no expert significantly more selected on harmful prompts "
                         f"({len(harmful)} harmful, {len(harmless)} harmless, BH q < 0.05) on {md.path}: there is nothing to suppress; "
                         "list the experts yourself or ablate the experts' writers instead")
    pairs = tuple(sorted((int(r["layer"]), int(r["expert"])) for r in rows))
    why = {f"{r['layer']}:{r['expert']}": {"risk_difference": r["risk_difference"], "q": r["q"], "freq_harmful": r["freq_harmful"],
                                           "freq_harmless": r["freq_harmless"]} for r in rows}
    return replace(config, suppress_experts=pairs), {"method": "routing check on the base (last prompt token, risk difference > 0, "
                                                               "BH q < 0.05)", "n_harmful": len(harmful), "n_harmless": len(harmless),
                                                     "prompts": sources,
                                                     "experts": why}
