"""Turn a cause's fix (a patch) into a concrete ablation config: the YAML a user applies, and what we re-ablate with.

A patch is plain data produced by checks/diagnose.py:
``add_components`` (target groups), ``add_layers`` (layer indices to ablate too), ``measurement``
(one index for every entry), ``scale`` / ``sparsity`` (for every entry), ``method``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import yaml

from audit.ablation_config import AblationConfig, Entry


def apply_patch(config: AblationConfig, patch: dict) -> AblationConfig:
    """A new config with ``patch`` applied; ``config`` is left as it was."""
    entries = list(config.entries)
    comps = tuple(config.components)
    add = [c for c in patch.get("add_components", []) if c not in comps]
    if add:
        comps = comps + tuple(add)
        entries = [replace(e, components=tuple(dict.fromkeys((*e.components, *add)))) if e.components is not None else e for e in entries]
    have = {e.layer for e in entries}
    new_layers = sorted(set(patch.get("add_layers", [])) - have)
    if "embed" in comps and 0 not in have:
        new_layers = sorted(set(new_layers) | {0})
    if new_layers:
        meas = Counter(e.measurement for e in entries).most_common(1)[0][0] if entries else int(patch.get("measurement", 0))
        scale = Counter(e.scale for e in entries).most_common(1)[0][0] if entries else 1.0
        new_comps = None if not any(e.components is not None for e in entries) else tuple(dict.fromkeys((*add, *comps)))
        entries += [Entry(layer=l, measurement=meas, scale=scale, components=new_comps) for l in new_layers]
        entries.sort(key=lambda e: e.layer)
    if "measurement" in patch:
        entries = [replace(e, measurement=int(patch["measurement"])) for e in entries]
    if "scale" in patch:
        entries = [replace(e, scale=float(patch["scale"])) for e in entries]
    if "sparsity" in patch:
        entries = [replace(e, sparsity=float(patch["sparsity"])) for e in entries]
    return replace(config, entries=entries, components=comps, method=patch.get("method", config.method),
                   scale=1.0 if "scale" in patch else config.scale)


def actual_config(config: AblationConfig, modified: dict[str, list[int]]) -> AblationConfig | None:
    """The part of ``config`` that really reached the weights: each entry keeps the components changed at its layer.

    ``modified`` is target group -> layers where some tensor of the group changed (embeddings: layer 0),
    as the weights check reports it. Fixes are patches on this, so a simulated or applied fix
    starts from what the model really is, not from what was meant (they differ when keys did not match).
    """
    entries = []
    for e in config.entries:
        comps = e.components if e.components is not None else config.components
        kept = tuple(c for c in comps if e.layer in modified.get(c, []))
        if kept:
            entries.append(replace(e, components=kept))
    if not entries:
        return replace(config, entries=[], components=config.components)
    if len({e.components for e in entries}) == 1:  # one component list for every entry: keep the config's shape
        return replace(config, entries=[replace(e, components=None) for e in entries], components=entries[0].components)
    return replace(config, entries=entries, components=tuple(dict.fromkeys(c for e in entries for c in e.components)))


def config_yaml(config: AblationConfig) -> str:
    """The config as YAML in the format `audit ablate --config` reads (llm-abliteration's, plus our keys)."""
    d = config.to_dict()
    d.pop("output", None)
    entries = d.pop("ablate")
    text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
    text += "ablate:\n" + "".join("  - " + yaml.safe_dump(e, default_flow_style=True, sort_keys=False).strip() + "\n" for e in entries)
    return text
