"""A cause's fix (a patch) applied to a config: the YAML a user applies, what we simulate and re-ablate with.

A patch is plain data produced by checks/diagnosis/rules.py; every operation is optional and they apply
in this order:

- ``drop``: ``[{"targets": [...], "layers": [...]}]`` -- stop editing those targets there (edits that
  should not have happened);
- ``all_experts``: ``[layers]`` -- the expert targets at those layers edit every routed expert, not a subset;
- ``add``: ``[{"targets": [...], "layers": [...]}]`` -- also edit those targets at those layers, with the
  direction and scale the config already uses there (else its commonest ones);
- ``add_components`` / ``add_layers`` -- the older, coarser form: these targets at every configured
  layer, and these layers with every configured target;
- ``measurement`` / ``scale`` / ``sparsity`` -- one value for every entry; ``method``;
- ``suppress``: ``{"experts": [[layer, expert], ...], "strength": s}`` -- lower those experts' selection at the router
  (``router_mode: suppress``; the router is then not projected).

A config here may have several entries per layer (disjoint components, or disjoint experts): that is
how what reached the weights is written down (audit/intent/reached.py). The result is validated by the
config loader, so a patch can never produce a config ``audit ablate`` would refuse.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import yaml

from audit.intent.config import EXPERT_TARGETS, AblationConfig, Entry


def _explicit(config: AblationConfig) -> list[Entry]:
    """Entries with their components written out (so entries can be edited one by one)."""
    return [replace(e, components=tuple(e.components if e.components is not None else config.components)) for e in config.entries]


def _template(entries: list[Entry], layer: int | None = None) -> tuple[int, float, float]:
    """(measurement, scale, sparsity) new edits take: the layer's own commonest, else the config's commonest."""
    pool = [e for e in entries if layer is not None and e.layer == layer] or entries
    if not pool:
        return 0, 1.0, 0.0
    return Counter((e.measurement, e.scale, e.sparsity) for e in pool).most_common(1)[0][0]


def _covered(entries: list[Entry], layer: int, target: str) -> bool:
    return any(e.layer == layer and target in e.components and (e.experts is None or target not in EXPERT_TARGETS) for e in entries)


def _add(entries: list[Entry], layer: int, targets, template=None) -> list[Entry]:
    """``targets`` at ``layer``: merged into the layer's entry that edits whole tensors when there is one, else a new entry."""
    targets = [t for t in targets if not _covered(entries, layer, t)]
    if layer != 0:
        targets = [t for t in targets if t != "embed"]  # the embeddings are edited by the layer-0 entry
    if not targets:
        return entries
    host = next((i for i, e in enumerate(entries) if e.layer == layer and e.experts is None), None)
    if host is not None:
        e = entries[host]
        entries = list(entries)
        entries[host] = replace(e, components=tuple(dict.fromkeys((*e.components, *targets))))
        return entries
    m, s, sp = template or _template(entries, layer)
    return entries + [Entry(layer=layer, measurement=m, scale=s, sparsity=sp, components=tuple(targets))]


def apply_patch(config: AblationConfig, patch: dict) -> AblationConfig:
    """A new config with ``patch`` applied (see the module docstring); ``config`` is left as it was."""
    entries = _explicit(config)
    all_targets = list(dict.fromkeys([*config.components, *(t for e in entries for t in e.components)]))
    for d in patch.get("drop", []):
        drop, layers = set(d.get("targets", [])), set(d.get("layers", []))
        entries = [replace(e, components=tuple(c for c in e.components if not (c in drop and e.layer in layers))) for e in entries]
        entries = [e for e in entries if e.components]
    for layer in patch.get("all_experts", []):
        at = [e for e in entries if e.layer == layer and e.experts is not None]
        if not at:
            continue
        m, s, sp = Counter((e.measurement, e.scale, e.sparsity) for e in at).most_common(1)[0][0]
        targets = list(dict.fromkeys(t for e in at for t in e.components if t in EXPERT_TARGETS))
        rest = [replace(e, components=tuple(c for c in e.components if c not in EXPERT_TARGETS)) for e in at]
        entries = [e for e in entries if not (e.layer == layer and e.experts is not None)] + [e for e in rest if e.components]
        entries = _add(entries, layer, targets, (m, s, sp))
    template = _template(entries)
    for a in patch.get("add", []):
        for layer in a.get("layers", []):
            entries = _add(entries, int(layer), a.get("targets", []), _template(entries, int(layer)) if any(e.layer == layer for e in entries) else template)
    add_c = [c for c in patch.get("add_components", [])]
    if add_c:
        for layer in sorted({e.layer for e in entries}):
            entries = _add(entries, layer, add_c)
        all_targets += [c for c in add_c if c not in all_targets]
    new_layers = sorted(set(patch.get("add_layers", [])) - {e.layer for e in entries})
    if "embed" in all_targets and not any(e.layer == 0 for e in entries):
        new_layers = sorted(set(new_layers) | {0})
    for layer in new_layers:
        entries = _add(entries, layer, all_targets if layer == 0 else [t for t in all_targets if t != "embed"], template)
    if "embed" in add_c:
        entries = _add(entries, 0, ["embed"], template)
    if "measurement" in patch:
        entries = [replace(e, measurement=int(patch["measurement"])) for e in entries]
    if "scale" in patch:
        entries = [replace(e, scale=float(patch["scale"])) for e in entries]
    if "sparsity" in patch:
        entries = [replace(e, sparsity=float(patch["sparsity"])) for e in entries]
    entries.sort(key=lambda e: (e.layer, e.experts or ()))
    sup = {}
    if "suppress" in patch:
        sup = {"router_mode": "suppress", "suppress_experts": tuple(sorted({(int(l), int(e)) for l, e in patch["suppress"]["experts"]})),
               "suppress_strength": float(patch["suppress"]["strength"])}
    return _compact(replace(config, entries=entries, method=patch.get("method", config.method),
                            scale=1.0 if "scale" in patch else config.scale, source=f"{config.source} + fix", **sup))


def _compact(config: AblationConfig) -> AblationConfig:
    """One component list for every entry moves to the config (the form people write); validated by the loader."""
    if not config.entries:
        if config.router_mode != "suppress":
            return config
        return AblationConfig.from_dict(replace(config, components=config.components or ("experts_down",)).to_dict(), source=config.source)
    comps = {e.components for e in config.entries}
    if len(comps) == 1 and all(e.experts is None for e in config.entries):
        shared = next(iter(comps))
        config = replace(config, components=shared, entries=[replace(e, components=None) for e in config.entries])
    elif config.entries:
        config = replace(config, components=tuple(dict.fromkeys(c for e in config.entries for c in (e.components or config.components))))
    return AblationConfig.from_dict(config.to_dict(), source=config.source)


def actual_config(config: AblationConfig, modified: dict[str, list[int]]) -> AblationConfig | None:
    """The part of ``config`` whose target groups changed at each entry's layer (group-level: used where no finer
    record of the edits exists; audit/intent/reached.py writes down what reached the weights per tensor)."""
    entries = []
    for e in config.entries:
        comps = e.components if e.components is not None else config.components
        kept = tuple(c for c in comps if e.layer in modified.get(c, []))
        if kept:
            entries.append(replace(e, components=kept))
    if not entries:
        return replace(config, entries=[], components=config.components)
    return _compact(replace(config, entries=entries, components=tuple(dict.fromkeys(c for e in entries for c in e.components))))


def config_yaml(config: AblationConfig) -> str:
    """The config as YAML in the format `audit ablate --config` reads (llm-abliteration's, plus our keys)."""
    d = config.to_dict()
    d.pop("output", None)
    entries = d.pop("ablate")
    text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
    text += "ablate:\n" + "".join("  - " + yaml.safe_dump(e, default_flow_style=True, sort_keys=False, width=1000).strip() + "\n" for e in entries)
    return text
