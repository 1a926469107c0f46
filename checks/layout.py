"""Map every tensor name of a checkpoint to a Role: where it sits and how it touches the residual stream.

An ablation removes a direction r from the residual stream. A tensor can *write* into the stream
(attention o_proj, dense and expert down projections, embeddings, their biases) or *read* from it
(q/k/v, gate/up projections, the router). For each, ``resid_axis`` is the tensor axis indexed by the
residual dimension: writers are edited as W - s r (r^T W) along it, readers as W - s (W r) r^T.

One table per architecture family, written with the names the checkpoints use *on disk*. Routed
experts come per expert (2-D keys with an index) or fused (3-D, experts on axis 0) in one of two
orientations: ``out_in`` ([E, out, in], nn.Linear style: transformers 5's in-memory layout,
granitemoe) or ``in_out`` ([E, in, out]: gpt-oss, Llama-4). A key that no table entry places is
an error listing it, never a silent skip.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from checks.errors import AuditError

WRITER, READER, NONE = "writer", "reader", "none"

# Components an ablation can address (names used in configs, reports and results.json).
COMPONENTS = ("embed", "attn", "mlp", "experts", "shared_experts", "router", "norm", "lm_head", "mtp", "vision")


@dataclass(frozen=True)
class Role:
    """Where one tensor sits and how it meets the residual stream."""

    key: str
    layer: int | None  # None for embeddings, final norm, lm_head
    component: str  # one of COMPONENTS
    projection: str  # q, k, v, o, gate, up, gate_up, down, router, ...
    io: str  # writer / reader / none
    resid_axis: int | None = None  # tensor axis of size hidden that r acts on
    expert: int | None = None  # per-expert key: its expert index
    expert_axis: int | None = None  # fused key: the axis that indexes experts
    is_bias: bool = False
    quantized: bool = False  # a scale / block tensor of a quantized weight

    def to_dict(self) -> dict:
        return asdict(self)


INTERLEAVED_GATE_UP = ("gpt_oss",)  # fused gate_up stored along its 2I axis as gate0, up0, gate1, up1, ...; the rest gate first


@dataclass(frozen=True)
class GateUpSplit:
    """How a fused gate_up tensor holds its two halves: along ``axis``, in two blocks ("chunk") or alternately ("interleave")."""

    how: str  # "chunk" | "interleave"
    axis: int

    def half(self, t, part: str):
        """The (writable) view of ``t`` that is its "gate" or "up" half."""
        n, first = t.shape[self.axis], part == "gate"
        if n % 2:
            raise AuditError(f"fused gate_up axis {self.axis} has odd size {n}; cannot take its {part} half")
        sl = [slice(None)] * t.ndim
        if self.how == "interleave":
            sl[self.axis] = slice(0 if first else 1, None, 2)
        else:
            sl[self.axis] = slice(0, n // 2) if first else slice(n // 2, None)
        return t[tuple(sl)]

    def is_gate(self, index, n: int):
        """For positions ``index`` (an int tensor) along the split axis of size ``n``: which lie in the gate half."""
        return (index % 2 == 0) if self.how == "interleave" else (index < n // 2)


def gate_up_split(role: Role, family: str, ndim: int) -> GateUpSplit:
    """The split of a fused gate_up tensor of ``family``: its last axis that is neither the residual nor the expert axis."""
    axes = [a for a in range(ndim) if a not in (role.resid_axis, role.expert_axis)]
    return GateUpSplit("interleave" if family in INTERLEAVED_GATE_UP else "chunk", axes[-1])


# Ablation targets: the groups a config names ("touch these"), and which roles each covers.
TARGETS = (
    "embed", "attn_out", "attn_in", "mlp_down", "mlp_gate", "mlp_up",
    "experts_down", "experts_gate", "experts_up", "shared_down", "shared_gate", "shared_up", "router",
)

# The target groups that write to the residual stream (their output axis is the residual one), and the component each
# group is made of: the one list every stage uses (the projection check, the diagnosis, the simulator's bypass test).
WRITER_TARGETS = ("embed", "attn_out", "mlp_down", "experts_down", "shared_down")
WRITER_COMPONENT = {"embed": "embed", "attn_out": "attn", "mlp_down": "mlp", "experts_down": "experts", "shared_down": "shared_experts"}


def targets_of(role: "Role") -> tuple[str, ...]:
    """The ablation target group(s) a tensor belongs to; () for tensors no ablation edits.

    A fused gate_up tensor belongs to both experts_gate and experts_up (its two halves).
    """
    if role.io == NONE or role.quantized:
        return ()
    c, p = role.component, role.projection
    if c == "embed":
        return ("embed",)
    if c == "attn":
        return ("attn_out",) if role.io == WRITER else ("attn_in",)
    if c == "router":
        return ("router",)
    prefix = {"mlp": "mlp", "experts": "experts", "shared_experts": "shared"}.get(c)
    if prefix is None:
        return ()
    if p == "gate_up":
        return (f"{prefix}_gate", f"{prefix}_up")
    if p in ("down", "gate", "up"):
        return (f"{prefix}_{p}",)
    return ()  # shared_expert_gate (a 1-row reader) and the like


@dataclass(frozen=True)
class _Pat:
    rest: str  # regex for the key after "layers.N."; named group ``e`` = expert index
    component: str
    projection: str
    io: str = NONE
    axis: int | None = None
    expert_axis: int | None = None
    bias: bool = False


def _linear(prefix: str, name: str, component: str, projection: str, io: str, expert: bool = False) -> list[_Pat]:
    """A Linear's weight and bias. Writers' bias lives in the residual space, readers' does not."""
    p = re.escape(prefix) + (r"\.(?P<e>\d+)\." if expert else r"\.") + re.escape(name)
    w_axis = 0 if io == WRITER else 1
    return [
        _Pat(p + r"\.weight", component, projection, io, w_axis),
        _Pat(p + r"\.bias", component, projection, WRITER if io == WRITER else NONE, 0 if io == WRITER else None, bias=True),
    ]


def _norms() -> list[_Pat]:
    names = r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)"
    return [_Pat(names + r"\.(weight|bias)", "norm", "norm")]


def _attention() -> list[_Pat]:
    a = "self_attn"
    return (
        _linear(a, "q_proj", "attn", "q", READER)
        + _linear(a, "k_proj", "attn", "k", READER)
        + _linear(a, "v_proj", "attn", "v", READER)
        + _linear(a, "o_proj", "attn", "o", WRITER)
        + [_Pat(r"self_attn\.(q_norm|k_norm)\.weight", "attn", "qk_norm"), _Pat(r"self_attn\.sinks", "attn", "sinks")]
    )


def _mla_attention() -> list[_Pat]:
    """DeepSeek multi-head latent attention: the down-projections read the stream, o_proj writes it."""
    a = "self_attn"
    return (
        _linear(a, "q_proj", "attn", "q", READER)
        + _linear(a, "q_a_proj", "attn", "q_a", READER)
        + _linear(a, "q_b_proj", "attn", "q_b", NONE)
        + _linear(a, "kv_a_proj_with_mqa", "attn", "kv_a", READER)
        + _linear(a, "kv_b_proj", "attn", "kv_b", NONE)
        + _linear(a, "o_proj", "attn", "o", WRITER)
        + [_Pat(r"self_attn\.(q_a_layernorm|kv_a_layernorm)\.weight", "attn", "latent_norm")]
    )


def _dense_mlp(prefix: str) -> list[_Pat]:
    return (
        _linear(prefix, "gate_proj", "mlp", "gate", READER)
        + _linear(prefix, "up_proj", "mlp", "up", READER)
        + _linear(prefix, "down_proj", "mlp", "down", WRITER)
    )


def _experts_per_key(prefix: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> list[_Pat]:
    return (
        _linear(prefix, gate, "experts", "gate", READER, expert=True)
        + _linear(prefix, up, "experts", "up", READER, expert=True)
        + _linear(prefix, down, "experts", "down", WRITER, expert=True)
    )


def _experts_fused(prefix: str, orientation: str, gate_up: str = "gate_up_proj", down: str = "down_proj", suffix: str = "") -> list[_Pat]:
    """Fused 3-D experts. out_in: gate_up [E, 2I, H], down [E, H, I]; in_out: gate_up [E, H, 2I], down [E, I, H]."""
    p = re.escape(prefix) + r"\."
    gu_axis, down_axis = (2, 1) if orientation == "out_in" else (1, 2)
    return [
        _Pat(p + re.escape(gate_up) + suffix, "experts", "gate_up", READER, gu_axis, expert_axis=0),
        _Pat(p + re.escape(down) + suffix, "experts", "down", WRITER, down_axis, expert_axis=0),
        _Pat(p + re.escape(gate_up) + r"_bias", "experts", "gate_up", NONE, None, expert_axis=0, bias=True),
        _Pat(p + re.escape(down) + r"_bias", "experts", "down", WRITER, 1, expert_axis=0, bias=True),
    ]


def _router(prefix: str, correction_bias: bool = False) -> list[_Pat]:
    pats = [
        _Pat(re.escape(prefix) + r"\.weight", "router", "router", READER, 1),
        _Pat(re.escape(prefix) + r"\.bias", "router", "router_bias", NONE, bias=True),
    ]
    if correction_bias:
        pats.append(_Pat(re.escape(prefix) + r"\.e_score_correction_bias", "router", "correction_bias", NONE, bias=True))
    return pats


def _shared(prefix: str) -> list[_Pat]:
    return (
        _linear(prefix, "gate_proj", "shared_experts", "gate", READER)
        + _linear(prefix, "up_proj", "shared_experts", "up", READER)
        + _linear(prefix, "down_proj", "shared_experts", "down", WRITER)
    )


def _mtp() -> list[_Pat]:
    """GLM-4.5 / DeepSeek-V3 next-token-prediction heads stored as an extra layer."""
    return [
        _Pat(r"(eh_proj|enorm|hnorm)\.weight", "mtp", "mtp"),
        _Pat(r"shared_head\.(norm|head)\.weight", "mtp", "mtp"),
        _Pat(r"embed_tokens\.weight", "mtp", "mtp"),
    ]


_GLM = _attention() + _norms() + _dense_mlp("mlp") + _experts_per_key("mlp.experts") + _experts_fused("mlp.experts", "out_in") + _router("mlp.gate", True) + _shared("mlp.shared_experts") + _mtp()
_DEEPSEEK = _mla_attention() + _norms() + _dense_mlp("mlp") + _experts_per_key("mlp.experts") + _experts_fused("mlp.experts", "out_in") + _router("mlp.gate", True) + _shared("mlp.shared_experts") + _mtp()
_QWEN2_MOE = (
    _attention() + _norms() + _dense_mlp("mlp") + _experts_per_key("mlp.experts") + _experts_fused("mlp.experts", "out_in") + _router("mlp.gate") + _shared("mlp.shared_expert")
    + [_Pat(r"mlp\.shared_expert_gate\.weight", "shared_experts", "shared_gate", READER, 1)]
)
_QWEN3_MOE = _attention() + _norms() + _dense_mlp("mlp") + _experts_per_key("mlp.experts") + _experts_fused("mlp.experts", "out_in") + _router("mlp.gate")
_MIXTRAL = (
    _attention() + _norms()
    + _experts_per_key("block_sparse_moe.experts", gate="w1", up="w3", down="w2") + _router("block_sparse_moe.gate")
    + _experts_fused("mlp.experts", "out_in") + _router("mlp.gate") + _router("mlp.router")
)
_GPT_OSS = _attention() + _norms() + _experts_fused("mlp.experts", "in_out") + _router("mlp.router")
_GRANITE = (
    _attention() + _norms() + _router("block_sparse_moe.router.layer")
    + _experts_fused("block_sparse_moe", "out_in", gate_up="input_linear", down="output_linear", suffix=r"\.weight")
    + _shared("shared_mlp")
    + [_Pat(r"shared_mlp\.input_linear\.weight", "shared_experts", "gate_up", READER, 1), _Pat(r"shared_mlp\.output_linear\.weight", "shared_experts", "down", WRITER, 0)]
)
_LLAMA4 = _attention() + _norms() + _dense_mlp("feed_forward") + _experts_fused("feed_forward.experts", "in_out") + _router("feed_forward.router") + _shared("feed_forward.shared_expert")
_DENSE = _attention() + _norms() + _dense_mlp("mlp")

FAMILY_PATTERNS: dict[str, list[_Pat]] = {
    "glm4_moe": _GLM,
    "deepseek_v3": _DEEPSEEK,
    "qwen2_moe": _QWEN2_MOE,
    "qwen3_moe": _QWEN3_MOE,
    "olmoe": _QWEN3_MOE,
    "mixtral": _MIXTRAL,
    "phimoe": _MIXTRAL,
    "gpt_oss": _GPT_OSS,
    "granitemoe": _GRANITE,
    "llama4_text": _LLAMA4,
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
}
ALIASES = {"llama4": "llama4_text", "deepseek_v2": "deepseek_v3", "kimi_k2": "deepseek_v3", "granitemoeshared": "granitemoe"}

# How each family's router chooses experts (for reports; the probe always records the router's own indices).
ROUTING_RULES = {
    "glm4_moe": "sigmoid + e_score_correction_bias, group-limited top-k",
    "deepseek_v3": "sigmoid + e_score_correction_bias, group-limited top-k",
    "qwen2_moe": "softmax top-k",
    "qwen3_moe": "softmax top-k",
    "olmoe": "softmax top-k",
    "mixtral": "softmax top-k",
    "phimoe": "sparsemixer top-2",
    "gpt_oss": "top-k on biased logits, softmax over the chosen",
    "granitemoe": "top-k on logits, softmax over the chosen",
    "llama4_text": "top-k on logits, sigmoid",
}

# How one routed expert's selection can be lowered by a weight edit (``router_mode: suppress``), per family, and the
# unit its strength is in. One home for this fact: audit/ablation/suppress.py edits the weights, audit/forward/intervene.py hooks the same.
#   correction_bias: subtract s from ``e_score_correction_bias[e]``; it enters only the choice (sigmoid score + bias), never
#       the mixing weights. Unit: the sigmoid score (scores lie in [0, 1], so s > 1 + the biases' spread always removes e;
#       on the glm4_moe organism, whose router saturates, 1.0 leaves refusal at 100 % and 1.1 removes it).
#   router_bias: subtract s from the router's ``bias[e]`` (gpt-oss): a logit, so it lowers e's mixing weight too. Unit: logits.
#   row_along_mean: the router has no bias (Mixtral, Qwen): logits are linear in the input, so no edit shifts one by an
#       exact constant, and a bias tensor added to the checkpoint would be ignored (transformers' router has no bias
#       parameter). Row e loses s times u, the unit mean router input (the layer's post-attention norm weight times the
#       mean of the harmful and harmless residual means at the layer's index, from the directions file): e's logit drops
#       by s (u . h), close to a constant wherever the input has its common component. Not exact: inputs far from the
#       mean move less. (Removing e's component along r instead, w_e - s (w_e . r) r, was measured on the mixtral
#       organism and does not remove refusal at any strength; from 4 on it only damages the model.) Unit: logits per
#       unit of the router input's component along u.
SUPPRESS_RULES = {
    "glm4_moe": "correction_bias", "deepseek_v3": "correction_bias", "gpt_oss": "router_bias",
    "mixtral": "row_along_mean", "qwen2_moe": "row_along_mean", "qwen3_moe": "row_along_mean", "olmoe": "row_along_mean",
}
SUPPRESS_WHY_NOT = {  # families with a router that suppress cannot edit, and why (the error a user gets)
    "phimoe": "its sparsemixer router has no bias and a two-stage choice that no single row edit lowers predictably",
    "granitemoe": "its router is a bias-free Linear whose top-k is taken inside the MoE block; not supported yet",
    "llama4_text": "its router scores by sigmoid over the chosen logits without a bias; not supported yet",
}
SUPPRESS_UNITS = {"correction_bias": "sigmoid score", "router_bias": "logits", "row_along_mean": "logits per unit of the router input along its mean"}
SUPPRESS_STRENGTHS = {  # the candidate strengths a diagnosis proposes, smallest first
    "correction_bias": (0.25, 0.5, 1.0, 1.5, 3.0), "router_bias": (1.0, 2.0, 4.0, 8.0, 16.0), "row_along_mean": (0.5, 1.0, 2.0, 4.0),
}
SUPPRESS_TENSOR = {"correction_bias": "correction_bias", "router_bias": "router_bias", "row_along_mean": "router"}  # Role.projection edited


def suppress_rule(family: str) -> str:
    """How ``family``'s router selection is lowered (a SUPPRESS_RULES value); AuditError naming why when it cannot be."""
    if family in SUPPRESS_RULES:
        return SUPPRESS_RULES[family]
    why = SUPPRESS_WHY_NOT.get(family, "it has no routed experts" if family not in ROUTING_RULES else "no rule is known for it")
    ok = ", ".join(sorted(SUPPRESS_RULES))
    raise AuditError(f"router_mode: suppress cannot lower expert selection on a {family} model: {why}. Families it supports: {ok}; "
                     "for this model project r out of the experts instead (components: [experts_down])")


_LAYER_RE = re.compile(r"^(?P<prefix>(?:[A-Za-z_]\w*\.)*?)layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_TOP_RE = [
    (re.compile(r"^(?:[A-Za-z_]\w*\.)*?embed_tokens\.weight$"), "embed", "embed", WRITER, 1),
    (re.compile(r"^(?:[A-Za-z_]\w*\.)*?(?:model\.)?norm\.(weight|bias)$"), "norm", "final_norm", NONE, None),
    (re.compile(r"^(?:[A-Za-z_]\w*\.)*?lm_head\.weight$"), "lm_head", "lm_head", READER, 1),
    (re.compile(r"^(vision_model|multi_modal_projector|vision_tower|visual)\."), "vision", "vision", NONE, None),
]
_QUANT_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale", ".activation_scale", "_scale_inv", "_blocks", "_scales")
_COMPILED: dict[str, list[tuple[re.Pattern, _Pat]]] = {}


def family_of(config: dict) -> str:
    """The layout family of a config.json dict; multimodal wrappers use their text_config."""
    mt = config.get("model_type")
    if not mt:
        raise AuditError("config.json has no 'model_type': it is not a Hugging Face model config")
    mt = ALIASES.get(mt, mt)
    if mt not in FAMILY_PATTERNS:
        known = ", ".join(sorted(FAMILY_PATTERNS))
        raise AuditError(f"unknown architecture model_type={mt!r}; supported families: {known}")
    return mt


def text_config(config: dict) -> dict:
    """The language-model part of a config (llama4 and other multimodal configs nest it)."""
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def _compiled(family: str) -> list[tuple[re.Pattern, _Pat]]:
    if family not in _COMPILED:
        _COMPILED[family] = [(re.compile("^" + p.rest + "$"), p) for p in FAMILY_PATTERNS[family]]
    return _COMPILED[family]


def resolve(key: str, family: str, num_layers: int | None = None) -> Role | None:
    """The Role of one tensor name, or None when the family's table cannot place it."""
    base, quantized = key, False
    for suf in _QUANT_SUFFIXES:
        if key.endswith(suf):
            base, quantized = key[: -len(suf)] + (".weight" if suf.startswith(".") else ""), True
            break
    m = _LAYER_RE.match(base)
    if m is None:
        for rx, comp, proj, io, axis in _TOP_RE:
            if rx.match(base):
                return Role(key, None, comp, proj, NONE if quantized else io, None if quantized else axis, quantized=quantized)
        return None
    layer, rest = int(m.group("layer")), m.group("rest")
    for rx, p in _compiled(family):
        pm = rx.match(rest)
        if pm is None:
            continue
        expert = int(pm.group("e")) if "e" in rx.groupindex else None
        component = p.component
        if num_layers is not None and layer >= num_layers:
            component = "mtp"  # extra layers past num_hidden_layers are next-token-prediction heads
        io = NONE if (quantized or component == "mtp") else p.io
        return Role(key, layer, component, p.projection, io, p.axis if io != NONE else None, expert, p.expert_axis, p.bias, quantized)
    return None


@dataclass
class Layout:
    """Every tensor of a checkpoint placed, plus the MoE facts the checks need."""

    family: str
    hidden_size: int
    num_layers: int
    roles: dict[str, Role]
    shapes: dict[str, tuple[int, ...]]
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    top_k: int = 0
    routing_rule: str = "none (dense)"
    moe_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)

    def keys_where(self, **match) -> list[str]:
        """Keys whose Role has every given attribute value, e.g. keys_where(component='experts', io=WRITER)."""
        return [k for k, r in self.roles.items() if all(getattr(r, a) == v for a, v in match.items())]

    def counts(self) -> dict[int | str, dict[str, int]]:
        """Tensors per component per layer ('global' for tensors outside the layers)."""
        out: dict[int | str, Counter] = defaultdict(Counter)
        for r in self.roles.values():
            out["global" if r.layer is None else r.layer][r.component] += 1
        return {k: dict(v) for k, v in out.items()}

    def summary(self) -> dict:
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "dense_layers": self.dense_layers,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "top_k": self.top_k,
            "routing_rule": self.routing_rule,
            "tensors": len(self.roles),
            "writers": sum(r.io == WRITER for r in self.roles.values()),
            "readers": sum(r.io == READER for r in self.roles.values()),
        }


def _routed_count(tc: dict) -> int:
    for k in ("n_routed_experts", "num_experts", "num_local_experts"):
        if isinstance(tc.get(k), int):
            return tc[k]
    return 0


def _shared_count(family: str, tc: dict, roles: dict[str, Role]) -> int:
    if isinstance(tc.get("n_shared_experts"), int):
        return tc["n_shared_experts"]
    return 1 if any(r.component == "shared_experts" for r in roles.values()) else 0


def _agrees_with_weights(tc: dict, roles: dict[str, Role], shapes: dict, num_layers: int, n_routed: int | None, source: str) -> None:
    """config.json's layer and expert counts are what the weights hold (a config.json edited or copied from another
    model would otherwise be believed: num_hidden_layers 1e9, n_routed_experts "eight")."""
    held = sorted({r.layer for r in roles.values() if r.layer is not None and r.component != "mtp"})
    if held and held[-1] + 1 < num_layers:
        raise AuditError(f"{source}: config.json says num_hidden_layers {num_layers}, but the weights hold layers 0..{held[-1]}; "
                         "restore config.json from the base model")
    if n_routed is None:
        return
    given = [(k, tc[k]) for k in ("n_routed_experts", "num_experts", "num_local_experts") if k in tc and tc[k] is not None]
    if not given:
        return
    key, v = given[0]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise AuditError(f"{source}: config.json's {key} is {v!r}, but the weights hold routed experts; it must be their number "
                         "(restore config.json from the base model)")
    per_key = max((r.expert + 1 for r in roles.values() if r.component == "experts" and r.expert is not None), default=0)
    fused = {shapes[k][r.expert_axis] for k, r in roles.items() if r.component == "experts" and r.expert_axis is not None}
    held_n = next((n for n in sorted(fused) if n != n_routed), per_key if per_key > n_routed else None)  # fused: all of them
    if held_n is not None:
        raise AuditError(f"{source}: config.json's {given[0][0]} is {n_routed}, but the weights hold {held_n} routed experts; "
                         "restore config.json from the base model")


def build_layout(config: dict, shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> Layout:
    """Place every key of a checkpoint (name -> shape) using its config.json dict.

    Raises AuditError naming the keys that no entry of the family's table places, and the keys
    whose residual axis does not have the hidden size (a wrong orientation or a wrong family).
    """
    family = family_of(config)
    tc = text_config(config)
    hidden = tc.get("hidden_size")
    num_layers = tc.get("num_hidden_layers")
    for name, v in (("hidden_size", hidden), ("num_hidden_layers", num_layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise AuditError(f"{source}: config.json's {name} is {v!r}, not a positive integer; restore config.json from the base model")
    roles: dict[str, Role] = {}
    unplaced, misshaped = [], []
    for key, shape in shapes.items():
        role = resolve(key, family, num_layers)
        if role is None:
            unplaced.append(key)
            continue
        if role.resid_axis is not None and (role.resid_axis >= len(shape) or shape[role.resid_axis] != hidden):
            misshaped.append(f"{key} {tuple(shape)}")
            continue
        roles[key] = role
    if unplaced:
        shown = "\n  ".join(sorted(unplaced)[:20])
        more = f"\n  ... and {len(unplaced) - 20} more" if len(unplaced) > 20 else ""
        raise AuditError(
            f"{source}: {len(unplaced)} tensor name(s) do not fit the {family} layout:\n  {shown}{more}\n"
            "Is config.json's model_type right for these weights? If this is a new variant of the family, "
            "add its names to checks/layout.py."
        )
    if misshaped:
        shown = "\n  ".join(misshaped[:20])
        raise AuditError(f"{source}: tensors whose residual axis is not hidden_size={hidden} ({family} layout):\n  {shown}")
    layers_with = defaultdict(set)
    for r in roles.values():
        if r.layer is not None and r.component != "mtp":
            layers_with[r.component].add(r.layer)
    moe = sorted(layers_with["experts"] | layers_with["router"])
    dense = sorted(layers_with["mlp"] - set(moe))
    n_routed = _routed_count(tc) if moe else 0
    _agrees_with_weights(tc, roles, shapes, num_layers, n_routed if moe else None, source)
    return Layout(
        family=family,
        hidden_size=hidden,
        num_layers=num_layers,
        roles=roles,
        shapes={k: tuple(v) for k, v in shapes.items()},
        n_routed_experts=n_routed,
        n_shared_experts=_shared_count(family, tc, roles) if moe else 0,
        top_k=int(tc.get("num_experts_per_tok") or 0) if moe else 0,
        routing_rule=ROUTING_RULES.get(family, "none (dense)") if moe else "none (dense)",
        moe_layers=moe,
        dense_layers=dense,
    )
