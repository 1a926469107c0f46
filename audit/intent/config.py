"""Ablation configs (llm-abliteration's YAML, read as is, plus our keys) and the plan: which tensor gets which edit.

llm-abliteration's format, unchanged::

    model: path/to/base          # optional here (BASE on the command line wins)
    measurements: directions.safetensors   # ours, or llm-abliteration's torch.save'd measurement
    output: path/to/out          # optional (-o wins)
    scale: 1.0                   # global multiplier of every entry's scale
    ablate:
      - {layer: 15, measurement: 18, scale: 1.0, sparsity: 0.0}

Meanings match llm-abliteration: ``measurement`` indexes hidden_states (index i = input of decoder
layer i, see audit/forward/measure.py); it defaults to the entry's layer, ``scale`` to 1.0, ``sparsity`` to 0.
``sparsity`` s in (0, 1) keeps the int(s * hidden) largest-magnitude components of the direction and
zeroes the rest (0 or 1: keep all) -- llm-abliteration's ``magnitude_sparsify``; the direction is then
normalized. ``biprojection: true`` first removes from the direction its component along the harmless
mean *of the ablated layer's index* (llm-abliteration's ``--projected`` at ablation time).

Our additions (top level, ``components`` also per entry):

    components: [attn_out, mlp_down, experts_down, shared_down]   # default: every residual writer but embed
    method: standard | norm_preserving   # norm_preserving keeps the norm of each vector along the
                                         # residual axis (one per input feature of a writer, per output row of a reader)
    router_mode: input | none | suppress # input: the router (if in components) loses r on its input axis; none: never touched;
                                         # suppress: the router is not projected; the listed experts' selection is lowered instead
    suppress_experts: auto | [[layer, expert], ...]   # with suppress: which experts (auto: those the routing check finds
                                         # significantly more selected on harmful prompts, measured on the base)
    suppress_strength: 1.0               # with suppress: how much their selection score is lowered, in the family's unit
                                         # (checks/layout.py SUPPRESS_RULES: sigmoid score, logits, or multiples of the row's r part)
    suppress_measurement: 12             # optional: the direction index the bias-free fallback uses (default: each layer's own)
    biprojection: false
    ablate:
      - {layer: "10-20", measurement: 18}   # a range expands to one entry per layer

``embed`` in an entry's components edits the embeddings (they write hidden_states[0]) with the entry
whose ``layer`` is 0; listing it without a layer-0 entry is an error. Keys are matched by the parsed
layer index of checks/layout.py, never by string prefix (layer 1 never touches layers 10-19).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from audit.user_files import read_yaml, validate
from checks.errors import AuditError
from checks.layout import Layout, Role, gate_up_split, targets_of

DEFAULT_COMPONENTS = ("attn_out", "mlp_down", "experts_down", "shared_down")
SUPPRESS_KEYS = ("suppress_experts", "suppress_strength", "suppress_measurement")
EXPERT_TARGETS = ("experts_down", "experts_gate", "experts_up")
MAX_LAYER = 65535  # the largest layer index a config may name (checks/schemas/config.schema.json)
MAX_SCALE = 100.0  # the largest scale a config may give (the schema's maximum): 1 removes r, 2 reflects it; the diagnosis
# matrix damages a model at 12; past 100 is a typo or an attack (1e30 wrote weights of 6e28, 1e308 overflowed)


@dataclass(frozen=True)
class Entry:
    """One ablate entry after expansion: edit ``layer`` with the direction measured at ``measurement``."""

    layer: int
    measurement: int
    scale: float = 1.0
    sparsity: float = 0.0
    components: tuple[str, ...] | None = None  # None: the config's components
    experts: tuple[int, ...] | None = None  # routed experts the expert targets edit at this layer (None: every expert)

    def targets(self, config_components) -> set[str]:
        return set(self.components if self.components is not None else config_components)


def _overlap(a: Entry, b: Entry, comps) -> bool:
    """Whether two entries of one layer would edit some tensor twice (shared targets; for expert targets, shared experts)."""
    shared = a.targets(comps) & b.targets(comps)
    if not shared:
        return False
    if shared - set(EXPERT_TARGETS):
        return True
    return a.experts is None or b.experts is None or bool(set(a.experts) & set(b.experts))


@dataclass
class AblationConfig:
    entries: list[Entry]
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    method: str = "standard"
    router_mode: str = "input"
    biprojection: bool = False
    scale: float = 1.0  # global multiplier
    model: str | None = None
    measurements: str | None = None
    output: str | None = None
    source: str = "<config>"
    suppress_experts: tuple[tuple[int, int], ...] | str | None = None  # router_mode suppress: (layer, expert) pairs, or "auto"
    suppress_strength: float | None = None
    suppress_measurement: int | None = None  # the fallback's direction index (None: each layer's own)

    @classmethod
    def from_dict(cls, d: dict, source: str = "<config>") -> "AblationConfig":
        """Validate (checks/schemas/config.schema.json, then what a schema cannot say) and expand a config mapping;
        AuditError names the file, the key and what it takes."""
        if not isinstance(d, dict):
            raise AuditError(f"{source}: the config must be a mapping with an 'ablate' list")
        d = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in d.items()}
        validate(d, "config", source)
        ablate = d.get("ablate")
        router_mode = d.get("router_mode", "input")
        if router_mode == "suppress" and not ablate:
            ablate = []  # suppressing experts at the router is a complete config on its own
        elif not ablate:
            raise AuditError(f"{source}: 'ablate' must be a non-empty list of entries like {{layer: 15, measurement: 18, scale: 1.0, sparsity: 0.0}}")
        comps = _components(d.get("components", DEFAULT_COMPONENTS))
        entries, seen = [], {}
        for n, item in enumerate(ablate):
            where = f"{source}: ablate[{n}]"
            for e in _entries(item, where):
                for m, other in seen.get(e.layer, []):
                    if _overlap(e, other, comps):
                        raise AuditError(f"{where}: layer {e.layer} is already ablated by ablate[{m}] for the same components; one entry per "
                                         "layer, or several with disjoint components (or disjoint experts)")
                seen.setdefault(e.layer, []).append((n, e))
                entries.append(e)
        sup = _suppress(d, router_mode, source)
        return cls(entries, comps, d.get("method", "standard"), router_mode, d.get("biprojection", False), float(d.get("scale", 1.0)),
                   d.get("model"), d.get("measurements"), d.get("output"), source, *sup)

    def to_dict(self) -> dict:
        """The resolved config (ranges expanded, defaults filled); from_dict(to_dict()) gives it back."""
        out = {
            "model": self.model, "measurements": self.measurements, "output": self.output, "scale": self.scale,
            "components": list(self.components), "method": self.method, "router_mode": self.router_mode,
            "biprojection": self.biprojection, "ablate": [],
        }
        for e in self.entries:
            item = {"layer": e.layer, "measurement": e.measurement, "scale": e.scale, "sparsity": e.sparsity}
            if e.components is not None:
                item["components"] = list(e.components)
            if e.experts is not None:
                item["experts"] = list(e.experts)
            out["ablate"].append(item)
        if self.router_mode == "suppress":
            out["suppress_experts"] = self.suppress_experts if isinstance(self.suppress_experts, str) else [list(p) for p in self.suppress_experts or ()]
            out["suppress_strength"] = self.suppress_strength
            out["suppress_measurement"] = self.suppress_measurement
        return {k: v for k, v in out.items() if v is not None}

    def suppressed(self) -> dict[int, list[int]]:
        """{layer: [experts]} the config suppresses at the router (empty unless router_mode is suppress with explicit experts)."""
        if self.router_mode != "suppress" or isinstance(self.suppress_experts, str):
            return {}
        out: dict[int, list[int]] = {}
        for layer, e in self.suppress_experts or ():
            out.setdefault(layer, []).append(e)
        return {k: sorted(v) for k, v in sorted(out.items())}


def _suppress(d: dict, router_mode: str, source: str) -> tuple:
    """(suppress_experts, suppress_strength, suppress_measurement) of a validated config mapping."""
    given = [k for k in SUPPRESS_KEYS if d.get(k) is not None]
    if router_mode != "suppress":
        if given:
            raise AuditError(f"{source}: {', '.join(given)} only apply with router_mode: suppress (router_mode is {router_mode!r}); "
                             "set router_mode: suppress or remove them")
        return None, None, None
    ex = d.get("suppress_experts")
    if ex is None:
        raise AuditError(f"{source}: suppress_experts: router_mode: suppress needs suppress_experts: auto (the experts the routing check finds "
                         "more selected on harmful prompts) or a list of [layer, expert] pairs, e.g. [[12, 3], [12, 17]]")
    pairs = ex if ex == "auto" else tuple(sorted({(int(layer), int(e)) for layer, e in ex}))
    if d.get("suppress_strength") is None:
        raise AuditError(f"{source}: suppress_strength: router_mode: suppress needs how much to lower the experts' selection score, "
                         "in the family's unit (sigmoid score for GLM/DeepSeek, logits for gpt-oss, multiples of the router row's "
                         "input along its mean for Mixtral/Qwen; see checks/layout.py SUPPRESS_RULES), e.g. suppress_strength: 1.0")
    return pairs, float(d["suppress_strength"]), d.get("suppress_measurement")


def _components(v) -> tuple[str, ...]:
    """A validated components value (one name or a list) as a tuple, duplicates dropped."""
    return tuple(dict.fromkeys([v] if isinstance(v, str) else v))


def _layers(v, where: str) -> list[int]:
    """15, "15", "10-20" (inclusive) -> list of layer indices (the schema has checked the form)."""
    if not isinstance(v, str):
        return [v]
    a, _, b = v.replace(" ", "").partition("-")
    a, b = int(a), int(b or a)
    if b < a:
        raise AuditError(f"{where}: layer range {v!r} is empty or negative; write it low-high, e.g. '10-20'")
    if b > MAX_LAYER:
        raise AuditError(f"{where}: layer range {v!r} goes past layer {MAX_LAYER}; no model has that many layers -- write the model's own range")
    return list(range(a, b + 1))


def _entries(item: dict, where: str) -> list[Entry]:
    if "layers" in item and "layer" not in item:
        item = {**item, "layer": item["layers"]}
        del item["layers"]
    if "layer" not in item:
        raise AuditError(f"{where}: needs a 'layer'")
    comps = _components(item["components"]) if "components" in item else None
    experts = tuple(sorted(set(item["experts"]))) if item.get("experts") is not None else None
    m = item.get("measurement")
    return [Entry(layer, layer if m is None else m, float(item.get("scale", 1.0)), float(item.get("sparsity", 0.0)), comps, experts)
            for layer in _layers(item["layer"], where)]


def load_config(path: str | os.PathLike) -> AblationConfig:
    """Read a YAML ablation config (audit/user_files.py: bounded, no duplicate keys); AuditError on a missing file, bad YAML
    or bad settings."""
    path = Path(path)
    return AblationConfig.from_dict(read_yaml(path, "config"), source=str(path))


# -- the plan ---------------------------------------------------------------------------------


@dataclass
class PlannedEdit:
    """One tensor's intended edit: W loses ``scale`` times its component along ``direction`` on role.resid_axis.

    ``part`` is None for the whole tensor, or "gate" / "up" for one half of a fused gate_up tensor,
    cut along ``split_axis`` either in two halves ("chunk": gate first) or alternately ("interleave":
    gate = 0::2, up = 1::2, gpt-oss).
    """

    key: str
    role: Role
    targets: tuple[str, ...]
    direction: torch.Tensor | None  # unit vector [hidden], float32; None when planned without directions
    direction_index: int
    scale: float
    method: str
    sparsity: float
    layer: int | None
    part: str | None = None
    split: str | None = None
    split_axis: int | None = None
    biprojection: bool = False
    experts: tuple[int, ...] | None = None  # a fused experts tensor edited for these experts only (None: all)

    def to_dict(self) -> dict:
        return {
            "key": self.key, "layer": self.layer, "component": self.role.component, "projection": self.role.projection,
            "expert": self.role.expert, "targets": list(self.targets), "direction_index": self.direction_index,
            "scale": self.scale, "method": self.method, "sparsity": self.sparsity, "part": self.part,
            "biprojection": self.biprojection, "resid_axis": self.role.resid_axis, "is_bias": self.role.is_bias,
            "experts": None if self.experts is None else list(self.experts),
        }


def sparsify(r: torch.Tensor, sparsity: float) -> torch.Tensor:
    """llm-abliteration's magnitude_sparsify: keep the int(n * sparsity) largest |r_j| (ties kept), zero the rest."""
    if sparsity <= 0.0 or sparsity >= 1.0:
        return r
    k = int(r.numel() * sparsity)
    if k == 0:
        return torch.zeros_like(r)
    threshold = torch.topk(r.abs().flatten(), k, largest=True, sorted=False).values.min()
    return torch.where(r.abs() >= threshold, r, torch.zeros_like(r))


def entry_direction(directions, entry: Entry, biprojection: bool) -> torch.Tensor:
    """The unit direction an entry removes: r[measurement], optionally orthogonal to the layer's harmless mean, sparsified."""
    r = directions.refusal_dir[entry.measurement].double()
    if biprojection:
        if entry.layer >= directions.n:
            raise AuditError(f"biprojection needs the harmless mean at index {entry.layer}, the directions file has 0..{directions.n - 1}")
        a = directions.harmless_mean[entry.layer].double()
        if a.norm() > 0:
            a = a / a.norm()
            for _ in range(2):  # second pass removes what cancellation left
                r = r - (r @ a) * a
    r = sparsify(r, entry.sparsity)
    n = r.norm()
    if not torch.isfinite(n) or n == 0:
        raise AuditError(f"the direction at measurement {entry.measurement} is zero after biprojection/sparsity {entry.sparsity}; lower the sparsity or re-measure")
    return (r / n).float()


def _quantized_targets(role: Role) -> tuple[str, ...]:
    """The target groups a quantized tensor's weight would belong to, were it stored in float."""
    io = "writer" if role.projection in ("o", "down") else "reader"
    return targets_of(replace(role, quantized=False, io=io))


def plan(config: AblationConfig, layout: Layout, directions=None) -> list[PlannedEdit]:
    """Every intended edit of ``config`` on a checkpoint ``layout``: pure, no tensor data read.

    With ``directions`` (audit.forward.measure.Directions) each edit carries its unit direction and bad
    measurements / sizes raise AuditError; without, directions are None (for reading intent only).
    """
    if directions is not None and directions.hidden_size != layout.hidden_size:
        raise AuditError(
            f"{config.source}: the directions have size {directions.hidden_size}, the model's hidden_size is {layout.hidden_size}; "
            "they were measured on another model -- re-run `audit measure` on this base"
        )
    by_layer: dict[int, list[str]] = {}
    embed_keys = []
    for key, role in layout.roles.items():
        if role.component == "embed":
            embed_keys.append(key)
        elif role.layer is not None and role.component != "mtp":
            by_layer.setdefault(role.layer, []).append(key)
    edits: list[PlannedEdit] = []
    embed_entry = None
    for e in config.entries:
        if e.layer >= layout.num_layers:
            raise AuditError(f"{config.source}: layer {e.layer} is out of range; this model has layers 0..{layout.num_layers - 1}")
        if directions is not None and e.measurement >= directions.n:
            raise AuditError(
                f"{config.source}: measurement {e.measurement} (for layer {e.layer}) is not in the directions file, "
                f"which holds indices 0..{directions.n - 1}"
            )
        comps = set(e.components if e.components is not None else config.components)
        if config.router_mode in ("none", "suppress"):  # suppress lowers selection instead of projecting the router (audit/ablation/suppress.py)
            comps.discard("router")
        if "embed" in comps and e.layer == 0:
            embed_entry = e
        r = entry_direction(directions, e, config.biprojection) if directions is not None else None
        scale = e.scale * config.scale
        keys = by_layer.get(e.layer, []) + (embed_keys if ("embed" in comps and e.layer == 0) else [])
        for key in sorted(keys):
            role = layout.roles[key]
            if role.quantized and set(_quantized_targets(role)) & comps:
                raise AuditError(
                    f"{config.source}: layer {e.layer}: {key} is part of a quantized weight (blocks/scales) this layout does not read as float; "
                    "a model directory with block-scaled FP8 or MXFP4 and its quantization_config is edited on its dequantized values -- "
                    "for another format, dequantize the model first (load it with transformers, save_pretrained in bfloat16)"
                )
            hit = tuple(t for t in targets_of(role) if t in comps)
            if not hit:
                continue
            sub = None  # experts this entry restricts the expert targets to
            if e.experts is not None and role.component == "experts":
                if role.expert is not None:
                    if role.expert not in e.experts:
                        continue
                elif role.expert_axis is not None:
                    n_exp = layout.shapes[key][role.expert_axis]
                    bad = [x for x in e.experts if x >= n_exp]
                    if bad:
                        raise AuditError(f"{config.source}: layer {e.layer}: experts {bad} out of range; {key} holds experts 0..{n_exp - 1}")
                    sub = e.experts
            part = split = split_axis = None
            if role.projection == "gate_up" and len(hit) == 1:
                part = "gate" if hit[0].endswith("_gate") else "up"
                gu = gate_up_split(role, layout.family, len(layout.shapes[key]))
                split, split_axis = gu.how, gu.axis
            edits.append(PlannedEdit(key, role, hit, r, e.measurement, scale, config.method, e.sparsity, e.layer,
                                     part, split, split_axis, config.biprojection, sub))
    wants_embed = "embed" in config.components or any(e.components and "embed" in e.components for e in config.entries)
    if wants_embed and embed_entry is None:
        raise AuditError(f"{config.source}: 'embed' is listed but no ablate entry has layer 0; the embeddings are edited by the layer-0 entry -- add one")
    return edits


def unmatched_targets(config: AblationConfig, edits: list[PlannedEdit]) -> list[str]:
    """Components the config names that no tensor of the model matched (e.g. shared_down on a model without shared experts)."""
    if not config.entries:  # a suppress-only config projects nothing
        return []
    named = set(config.components) | {c for e in config.entries for c in (e.components or ())}
    if config.router_mode in ("none", "suppress"):
        named.discard("router")
    hit = {t for ed in edits for t in ed.targets}
    return sorted(named - hit)


def resolve_measurements(config: "AblationConfig") -> Path | None:
    """The config's ``measurements`` path: relative to the config file first, else to the working directory.

    (llm-abliteration's configs are usually written next to their measurement file; the working
    directory is the fallback for configs written for a run from a project root.)
    """
    if not config.measurements:
        return None
    p = Path(config.measurements)
    if p.is_absolute():
        return p
    if config.source and Path(config.source).is_file():
        beside = Path(config.source).parent / p
        if beside.exists():
            return beside
    return p

