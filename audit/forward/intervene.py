"""In-memory interventions: the inference-time counterpart of one ablation config change, with hooks, no weight copies.

A diagnosis proposes a fix ("also ablate the shared expert", "project r out of the experts' inputs",
"use the direction measured at another index"); before anyone writes weights, the suite runs the
ablated model *under* the fix and measures refusal. Every intervention here equals, up to float
rounding, the weight edit of checks/linalg.project_out on the same tensors (tests prove it per
component type, fused experts included):

- writers (embeddings, attention o_proj, dense / shared down_proj, routed experts' down_proj and its
  bias): r is projected out of the module's *output*, x - s r (r.x) == (W - s r r^T W) h + (b - s r r^T b);
- readers (q/k/v, gate/up, the router): r is projected out of the module's *input*,
  W (h - s r r^T h) == (W - s W r r^T) h;
- a subset of routed experts of a layer: the selected experts' part of the output is computed again
  from the recorded inputs, router indices and weights, and replaced by its edited version; one
  half of a fused gate_up (gate only / up only) is recomputed per expert;
- ``avoid_experts`` steers routing as if those experts were removed: GLM/DeepSeek routers get their
  correction bias (a buffer, not a weight) pushed to -1e9 for them, softmax / top-k routers have
  their top-k recomputed from their own logits with those experts masked;
- ``suppress`` lowers those experts' selection score by ``suppress_strength`` exactly as ``router_mode: suppress``
  edits the weights (audit/ablation/suppress.py's arithmetic on the router's own tensor, swapped in for the block and put back):
  the correction bias, the router bias, or (no bias) the router rows shifted along the mean router input, by family
  (checks/layout.py); ``direction`` then holds the mean residual per layer (audit/ablation/suppress.py suppress_direction).

Interventions compose in list order, like applying their configs one after the other (two
interventions on *overlapping expert subsets* of one layer compose only approximately).
``method: norm_preserving`` has no linear counterpart and is refused.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from audit.ablation.suppress import edited, mean_input_direction, norm_key, plan_suppress, suppress_direction
from audit.intent.config import AblationConfig, entry_direction
from audit.model.loading import weights_on
from checks.errors import AuditError
from checks.findings import ranges
from checks.layout import INTERLEAVED_GATE_UP, READER, TARGETS, WRITER, Layout, build_layout, targets_of
from checks.linalg import unit

EXPERT_TARGETS = ("experts_down", "experts_gate", "experts_up")
_AVOID_BIAS = -1e9
# How a router without a correction bias picks experts from its logits (class name -> rule).
_ROUTER_RULES = {
    "MixtralTopKRouter": "softmax_topk", "Qwen2MoeTopKRouter": "softmax_topk", "Qwen3MoeTopKRouter": "softmax_topk",
    "OlmoeTopKRouter": "softmax_topk", "GptOssTopKRouter": "topk_softmax", "GraniteMoeTopKRouter": "topk_softmax",
    "Llama4Router": "llama4",
}


@dataclass
class Intervention:
    """One config change, applied at inference time.

    targets: subset of checks.layout.TARGETS; layers: decoder layers it acts on ("embed" acts on
    the embeddings whatever the layers, with the layer-0 direction, as configs do); direction: one
    vector [H] for every layer, or {layer: vector}; experts: {layer: [ids]} restricts the expert
    targets at that layer to those experts (layers not listed: all experts); avoid_experts:
    {layer: [ids]} steers routing away from those experts.
    """

    targets: tuple[str, ...] = ()
    layers: list[int] = field(default_factory=list)
    direction: torch.Tensor | dict[int, torch.Tensor] | None = None
    scale: float = 1.0
    experts: dict[int, list[int]] | None = None
    avoid_experts: dict[int, list[int]] | None = None
    suppress: dict[int, list[int]] | None = None  # {layer: [ids]} whose selection score loses suppress_strength
    suppress_strength: float = 0.0
    name: str = ""
    strict: bool = True  # a target that matches no tensor is an error (configs set False: their components span dense and MoE layers)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise AuditError(f"intervention {self.name!r}: unknown target(s) {bad}; known: {', '.join(TARGETS)}")
        self.layers = [int(x) for x in self.layers]
        if self.targets and self.direction is None:
            raise AuditError(f"intervention {self.name!r}: targets {list(self.targets)} need a direction")
        if self.suppress and not self.suppress_strength > 0:
            raise AuditError(f"intervention {self.name!r}: suppress needs a positive suppress_strength, got {self.suppress_strength!r}")
        if not self.targets and not self.avoid_experts and not self.suppress:
            raise AuditError(f"intervention {self.name!r} does nothing: give targets (with a direction), avoid_experts or suppress")

    def direction_at(self, layer: int | None) -> torch.Tensor:
        """The unit direction (float32) used at decoder ``layer``; None (the embeddings) uses layer 0's."""
        d = self.direction
        if isinstance(d, dict):
            key = 0 if layer is None else layer
            if key not in d:
                what = "the embeddings (they use the layer-0 direction)" if layer is None else f"layer {layer}"
                raise AuditError(f"intervention {self.name!r}: no direction for {what}; give direction[{key}]")
            d = d[key]
        d = torch.as_tensor(d)
        if d.ndim != 1:
            raise AuditError(f"intervention {self.name!r}: a direction must be a vector [hidden], got shape {tuple(d.shape)}")
        try:
            return unit(d).float()
        except ValueError as e:
            raise AuditError(f"intervention {self.name!r}: bad direction at layer {layer}: {e}") from None

    def describe(self) -> str:
        parts = []
        if self.targets:
            parts.append(f"project r out of {'+'.join(self.targets)} at layers {ranges(self.layers)} (scale {self.scale:g})")
        if self.experts:
            parts.append("experts " + "; ".join(f"L{k}:{sorted(v)}" for k, v in sorted(self.experts.items())))
        if self.avoid_experts:
            parts.append("route away from " + "; ".join(f"L{k}:{sorted(v)}" for k, v in sorted(self.avoid_experts.items())))
        if self.suppress:
            parts.append(f"suppress at the router (strength {self.suppress_strength:g}) " + "; ".join(f"L{k}:{sorted(v)}" for k, v in sorted(self.suppress.items())))
        return ", ".join(parts)


def from_config(config, directions) -> list[Intervention]:
    """One Intervention per entry of an audit.intent.config.AblationConfig (standard method only)."""
    if config.method != "standard":
        raise AuditError(f"{config.source}: method {config.method!r} has no inference-time counterpart; only 'standard' projection does")
    out = []
    for e in config.entries:
        comps = list(e.components if e.components is not None else config.components)
        if config.router_mode in ("none", "suppress"):
            comps = [c for c in comps if c != "router"]
        if "embed" in comps and e.layer != 0:
            comps.remove("embed")
        r = entry_direction(directions, e, config.biprojection)
        if comps:
            experts = {e.layer: list(e.experts)} if getattr(e, "experts", None) is not None else None
            out.append(Intervention(tuple(comps), [e.layer], {e.layer: r}, e.scale * config.scale, experts=experts,
                                    name=f"layer {e.layer}" + (f" experts {ranges(e.experts)}" if experts else ""), strict=False))
    sup = config.suppressed()
    if config.router_mode == "suppress" and not sup:
        raise AuditError(f"{config.source}: suppress_experts: auto has no inference-time counterpart until it is resolved on the base; list the experts")
    if sup:
        dirs = {l: suppress_direction(config, l, directions)[1] for l in sup}
        out.append(Intervention((), list(sup), dirs, suppress=sup, suppress_strength=float(config.suppress_strength),
                                name="suppress " + "; ".join(f"L{l}:{es}" for l, es in sup.items())))
    return out


class _Proj:
    """x -> x - s r (r.x) on the last axis, in float32 (float64 stays), cast back to x's dtype."""

    def __init__(self, r: torch.Tensor, scale: float):
        self.r, self.scale, self._on = r, float(scale), {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()
        key = (xf.device, xf.dtype)
        if key not in self._on:
            self._on[key] = self.r.to(device=xf.device, dtype=xf.dtype)
        r = self._on[key]
        return (xf - self.scale * (xf @ r).unsqueeze(-1) * r).to(x.dtype)


def _replace_first(args, kwargs, fn):
    """Apply fn to the first input (positional, or the hidden_states keyword)."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    for k in ("hidden_states", "input", "x"):
        if k in kwargs:
            return args, {**kwargs, k: fn(kwargs[k])}
    raise AuditError("intervention: cannot find the hidden-state input of a hooked module")


def _reader_hook(proj: _Proj):
    def hook(module, args, kwargs):
        return _replace_first(args, kwargs, proj)
    return hook


def _writer_hook(proj: _Proj):
    def hook(module, args, output):
        if isinstance(output, tuple):  # modules returning (hidden, extra): the hidden part is written
            return (proj(output[0]),) + tuple(output[1:])
        return proj(output)
    return hook


# -- routed experts -------------------------------------------------------------------------------


def _routed_style(module) -> bool:
    """True for experts modules called as (hidden, top_k_index, top_k_weights); False for Llama-4 style blocks."""
    try:
        n = len(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        n = 3
    return n >= 3


def _inputs(args, kwargs):
    vals = list(args) + [kwargs[k] for k in kwargs]
    if len(vals) < 3:
        raise AuditError("intervention: the experts module was not called with (hidden, indices, weights)")
    return vals[0], vals[1], vals[2]


def _half_forward(module, h_gate, h_up, idx, w, interleaved: bool, in_out: bool) -> torch.Tensor:
    """The experts' output with the gate half reading h_gate and the up half reading h_up (eager, per expert).

    ``in_out``: gate_up is [E, H, 2I] (gpt-oss, Llama-4) rather than [E, 2I, H]; from the layout, never guessed from shapes.
    Offloaded experts (accelerate) have their weights loaded for this (audit.model.directory.weights_on).
    """
    with weights_on(module):
        return _half_forward_loaded(module, h_gate, h_up, idx, w, interleaved, in_out)


def _half_forward_loaded(module, h_gate, h_up, idx, w, interleaved: bool, in_out: bool) -> torch.Tensor:
    gu, down = module.gate_up_proj, module.down_proj
    gu_b, down_b = getattr(module, "gate_up_proj_bias", None), getattr(module, "down_proj_bias", None)
    n_exp = gu.shape[0]
    out = torch.zeros_like(h_gate)
    for e in torch.unique(idx).tolist():
        if e < 0 or e >= n_exp:
            continue
        tok, k = torch.where(idx == e)
        W = gu[e] if in_out else gu[e].t()  # as [H, 2I]
        a_g, a_u = h_gate[tok] @ W, h_up[tok] @ W
        if gu_b is not None:
            a_g, a_u = a_g + gu_b[e], a_u + gu_b[e]
        if interleaved:
            mixed = a_g.clone()
            mixed[..., 1::2] = a_u[..., 1::2]
            if not hasattr(module, "_apply_gate"):
                raise AuditError(f"intervention: {type(module).__name__} has interleaved gate_up but no _apply_gate")
            act = module._apply_gate(mixed)
        else:
            i = a_g.shape[-1] // 2
            if not hasattr(module, "act_fn"):
                raise AuditError(f"intervention: {type(module).__name__} has no act_fn; gate-only / up-only needs it")
            act = module.act_fn(a_g[..., :i]) * a_u[..., i:]
        y = act @ down[e] if in_out else F.linear(act, down[e])
        if down_b is not None:
            y = y + down_b[e]
        out.index_add_(0, tok, (y * w[tok, k, None]).to(out.dtype))
    return out


def _experts_hooks(module, proj: _Proj, down: bool, gate: bool, up: bool, subset, interleaved: bool, in_out: bool, where: str):
    """(pre_hook, post_hook, post_takes_kwargs) equal to editing the fused expert tensors (all experts or ``subset``)."""
    half = gate != up
    if not _routed_style(module):  # Llama-4: input/output rows come in per-expert blocks [E * tokens, H]
        if half:
            raise AuditError(f"{where}: gate-only / up-only is not supported for {type(module).__name__}; target experts_gate and experts_up together")
        n_exp = module.gate_up_proj.shape[0]
        sel = torch.zeros(n_exp, dtype=torch.bool)
        sel[list(subset) if subset is not None else slice(None)] = True

        def blocks(x):
            xb = x.view(n_exp, -1, x.shape[-1])
            m = sel.to(x.device).view(n_exp, 1, 1)
            return torch.where(m, proj(xb), xb).view_as(x)

        pre = (lambda m_, a, kw: _replace_first(a, kw, blocks)) if gate else None
        post = (lambda m_, a, o: blocks(o)) if down else None
        return pre, post, False
    if subset is None and not half:
        pre = _reader_hook(proj) if gate else None
        post = _writer_hook(proj) if down else None
        return pre, post, False
    subset_t = None if subset is None else torch.tensor(sorted(subset), dtype=torch.long)

    def post(mod, args, kwargs, output):
        h, idx, w = _inputs(args, kwargs)
        w_sel = w
        if subset_t is not None:
            w_sel = w * torch.isin(idx, subset_t.to(idx.device)).to(w.dtype)
        hg, hu = (proj(h) if gate else h), (proj(h) if up else h)
        if half:
            new = _half_forward(mod, hg, hu, idx, w_sel, interleaved, in_out)
        else:
            new = mod.forward(hg, idx, w_sel)  # forward, not __call__: no hooks re-entered
        if down:
            new = proj(new)
        if subset_t is None:
            return new.to(output.dtype)
        return (output.float() - mod.forward(h, idx, w_sel).float() + new.float()).to(output.dtype)

    return None, post, True


# -- routing --------------------------------------------------------------------------------------


def reroute(module, output, avoid: list[int]):
    """The router's output recomputed from its own logits with ``avoid`` experts masked (softmax / top-k routers)."""
    rule = _ROUTER_RULES.get(type(module).__name__)
    if rule is None:
        raise AuditError(f"steering routing is not supported for {type(module).__name__}; supported: {', '.join(sorted(_ROUTER_RULES))} and routers with e_score_correction_bias")
    k = module.top_k
    if rule == "llama4":
        scores, logits = output
        lf = logits.float().clone()
        lf[..., avoid] = float("-inf")
        v, i = torch.topk(lf, k, dim=1)
        new = torch.full_like(lf, float("-inf")).scatter_(1, i, v).sigmoid()
        return new.to(scores.dtype), logits
    logits, weights, _ = output
    lf = logits.float().clone()
    lf[..., avoid] = float("-inf")
    if rule == "softmax_topk":
        v, i = torch.topk(torch.softmax(lf, dim=-1), k, dim=-1)
        if getattr(module, "norm_topk_prob", True):
            v = v / v.sum(dim=-1, keepdim=True)
    else:  # topk_softmax
        v, i = torch.topk(lf, k, dim=-1)
        v = torch.softmax(v, dim=-1)
    return logits, v.to(weights.dtype), i


def _steer(module, avoid: list[int], where: str, handles: list, restores: list) -> None:
    n_exp = getattr(module, "num_experts", None) or getattr(module, "n_routed_experts", None)
    top_k = getattr(module, "top_k", None)
    if n_exp is not None and top_k is not None and n_exp - len(avoid) < top_k:
        raise AuditError(f"{where}: avoiding {len(avoid)} of {n_exp} experts leaves fewer than top_k={top_k}")
    if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
        original = module.e_score_correction_bias
        shifted = original.clone()
        shifted[avoid] = _AVOID_BIAS
        module.e_score_correction_bias = shifted  # replaces the buffer object; the original is put back on exit
        restores.append(lambda: setattr(module, "e_score_correction_bias", original))
    else:
        handles.append(module.register_forward_hook(lambda m, a, o: reroute(m, o, avoid)))

    def check(m, a, o):
        if isinstance(o, tuple) and len(o) == 3 and torch.isin(o[2], torch.tensor(avoid, device=o[2].device)).any():
            raise AuditError(f"{where}: routing still picks avoided experts {avoid} (group-limited routing left too few choices)")
    handles.append(module.register_forward_hook(check))


# -- apply ----------------------------------------------------------------------------------------


def model_layout(model) -> Layout:
    """checks.layout's Layout of a loaded model's in-memory parameter names (fused experts as transformers 5 holds them)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return build_layout(model.config.to_dict(), shapes, source=f"{type(model).__name__} (in memory)")


def _module_path(key: str) -> str:
    return key.rsplit(".", 1)[0]


@contextmanager
def apply(model, interventions: list[Intervention] | Intervention, layout: Layout | None = None):
    """Run ``model`` under ``interventions`` inside the block; every hook and buffer is restored on exit."""
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    layout = layout or model_layout(model)
    handles, restores = [], []
    try:
        for iv in interventions:
            _register(model, layout, iv, handles, restores)
        yield model
    finally:
        for h in reversed(handles):
            h.remove()
        for fn in reversed(restores):
            fn()


def _register(model, layout: Layout, iv: Intervention, handles: list, restores: list) -> None:
    wanted = set(iv.targets)
    layers = set(iv.layers)
    bad = sorted(x for x in layers if not 0 <= x < layout.num_layers)
    if bad:
        raise AuditError(f"intervention {iv.name!r}: layers {bad} out of range 0..{layout.num_layers - 1}")
    for layer, ids in (iv.experts or {}).items():
        if layer not in layers or layer not in layout.moe_layers:
            raise AuditError(f"intervention {iv.name!r}: experts given for layer {layer}, which is not among its layers "
                             f"{ranges(layers)} or not a MoE layer (MoE layers: {ranges(layout.moe_layers)})")
        if not ids or any(not 0 <= int(e) < layout.n_routed_experts for e in ids):
            raise AuditError(f"intervention {iv.name!r}: expert ids {list(ids)} at layer {layer} must be a non-empty subset of 0..{layout.n_routed_experts - 1}")
    plain: dict[tuple[str, str], int | None] = {}  # (module path, writer/reader) -> layer
    fused: dict[str, dict] = {}  # experts module path -> {layer, targets}
    matched = set()
    for key, role in layout.roles.items():
        hit = wanted.intersection(targets_of(role))
        if not hit:
            continue
        if role.component == "embed" or role.component == "lm_head":
            layer = None
        elif role.layer in layers:
            layer = role.layer
        else:
            continue
        if role.component == "experts":
            sub = (iv.experts or {}).get(layer)
            if role.expert_axis is not None:  # fused 3-D tensors
                f = fused.setdefault(_module_path(key), {"layer": layer, "targets": set(), "subset": sub, "in_out": False})
                if role.projection == "gate_up" and not role.is_bias:
                    f["in_out"] = role.resid_axis == 1  # [E, H, 2I]
                f["targets"] |= hit
                matched |= hit
                continue
            if sub is not None and role.expert not in sub:
                continue
        if role.projection == "gate_up" and len(hit) == 1:
            raise AuditError(f"intervention {iv.name!r}: {key} fuses gate and up in one Linear; target both halves ({role.component})")
        plain[(_module_path(key), role.io)] = layer
        matched |= hit
    if model.config.get_text_config().tie_word_embeddings and "embed" in wanted:
        # the weight edit of tied embeddings also edits lm_head's input axis
        lm = layout.keys_where(component="lm_head")
        if lm:
            plain[(_module_path(lm[0]), READER)] = None
    missing = wanted - matched
    if missing and iv.strict:
        raise AuditError(f"intervention {iv.name!r}: target(s) {sorted(missing)} match no tensor of this {layout.family} model at layers {ranges(layers)}")
    for (path, io), layer in plain.items():
        module = model.get_submodule(path)
        proj = _Proj(iv.direction_at(layer), iv.scale)
        if io == WRITER:
            handles.append(module.register_forward_hook(_writer_hook(proj)))
        else:
            handles.append(module.register_forward_pre_hook(_reader_hook(proj), with_kwargs=True))
    interleaved = layout.family in INTERLEAVED_GATE_UP
    for path, f in fused.items():
        module = model.get_submodule(path)
        t = f["targets"]
        pre, post, post_kw = _experts_hooks(module, _Proj(iv.direction_at(f["layer"]), iv.scale), "experts_down" in t,
                                   "experts_gate" in t, "experts_up" in t, f["subset"], interleaved, f["in_out"], f"intervention {iv.name!r}, {path}")
        if pre is not None:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            handles.append(module.register_forward_hook(post, with_kwargs=post_kw))
    for layer, avoid in (iv.avoid_experts or {}).items():
        keys = [k for k in layout.keys_where(component="router", projection="router", layer=int(layer)) if k.endswith("weight")]
        if not keys:
            raise AuditError(f"intervention {iv.name!r}: layer {layer} has no router to steer (MoE layers: {ranges(layout.moe_layers)})")
        avoid = sorted(int(e) for e in avoid)
        if layout.n_routed_experts and any(not 0 <= e < layout.n_routed_experts for e in avoid):
            raise AuditError(f"intervention {iv.name!r}: expert ids {avoid} out of range 0..{layout.n_routed_experts - 1}")
        _steer(model.get_submodule(_module_path(keys[0])), avoid, f"intervention {iv.name!r}, layer {layer}", handles, restores)
    if iv.suppress:
        _suppress(model, layout, iv, restores, handles)


def _offloaded(module) -> bool:
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:  # pragma: no cover
        return False
    return has_offloaded_params(module)


def _shifted_router(edits: list, rule: str):
    """A forward hook giving the router's output with the edited tensor, recomputed from its input (offloaded routers:
    accelerate reloads their weights at every forward, so a swapped tensor would not last). ``edits``: (experts, strength, u)."""
    def hook(module, args, output):
        h = args[0].reshape(-1, module.hidden_dim).float()
        logits = output[0].float().clone()
        for experts, strength, u in edits:
            idx = torch.as_tensor(list(experts), device=logits.device)
            if rule == "row_along_mean":
                logits[:, idx] -= float(strength) * (h @ u.to(h.device)).unsqueeze(-1)
            else:
                logits[:, idx] -= float(strength)
        return reroute(module, (logits.to(output[0].dtype), output[1], output[2]), [])
    return hook


def _suppress(model, layout: Layout, iv: Intervention, restores: list, handles: list | None = None) -> None:
    """Swap each suppressed router tensor for its edited copy (audit/ablation/suppress.py's arithmetic: the weight edit itself);
    a router whose weights accelerate offloads gets a hook that recomputes its output with the edit instead."""
    cfg = AblationConfig([], router_mode="suppress", suppress_experts=tuple((l, e) for l, es in iv.suppress.items() for e in es),
                         suppress_strength=iv.suppress_strength, source=f"intervention {iv.name!r}")
    store = getattr(model.config, "dtype", None)  # the checkpoint's dtype as transformers records it ("auto" loading)
    for se in plan_suppress(cfg, layout):
        module, name = model.get_submodule(_module_path(se.key)), se.key.rsplit(".", 1)[1]
        if se.rule != "correction_bias" and _offloaded(module):  # (buffers are not offloaded; parameters are)
            nk = norm_key(layout, se.layer)
            u = None
            if se.rule == "row_along_mean":
                norm = model.get_submodule(_module_path(nk)) if nk else None
                with weights_on(norm) if norm is not None else _nullcontext():
                    u = mean_input_direction(iv.direction_at(se.layer), norm.weight.detach().float() if norm is not None else None)
            handles.append(module.register_forward_hook(_shifted_router([(se.experts, se.strength, u)], se.rule)))
            continue
        original = getattr(module, name)
        r = None
        if se.rule == "row_along_mean":
            nk = norm_key(layout, se.layer)
            r = mean_input_direction(iv.direction_at(se.layer), model.get_submodule(_module_path(nk)).weight.detach().float() if nk else None)
        data = original.data
        if isinstance(store, torch.dtype) and store.is_floating_point and store.itemsize < data.element_size():
            data = data.to(store)  # a router kept in float32 in memory, stored narrower: edit the stored values, as the weights are
        new = edited(data, se.rule, se.experts, se.strength, r).to(original.dtype)
        if isinstance(original, torch.nn.Parameter):
            setattr(module, name, torch.nn.Parameter(new, requires_grad=False))
        else:
            setattr(module, name, new)  # a buffer: replaces the object, the original is put back on exit
        restores.append(lambda m=module, n_=name, o=original: setattr(m, n_, o))
