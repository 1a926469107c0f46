"""Ablations done the way another tool would: read a tiny model, orthogonalize chosen tensors, write a copy.

Used by the static-audit tests (weights, projection, recovery) so that the audit is tested on models
it did not ablate itself, with known directions, scales and mistakes (left-out groups, prefix collisions).
"""

from __future__ import annotations

from pathlib import Path

import torch

from audit.model.directory import ModelDir, copy_side_files

from audit.model.shards import write_shard
from checks.layout import targets_of
from checks.linalg import project_out, project_out_norm_preserving

INTERLEAVED = ("gpt_oss",)


def rewrite(base: Path, out: Path, edit) -> Path:
    """Copy ``base`` to ``out`` with ``edit(key, role, tensor) -> tensor | None`` applied (None: unchanged)."""
    md = ModelDir(base)
    out.mkdir(parents=True, exist_ok=True)
    tensors = []
    for key, t in md.iter_tensors():
        role = md.layout.roles.get(key)
        new = edit(key, role, t) if role is not None else None
        tensors.append((key, t if new is None else new.to(t.dtype).contiguous()))
    write_shard(out / "model.safetensors", tensors, {"format": "pt"})
    copy_side_files(md.path, out)
    md.close()
    return out


def _half_index(t: torch.Tensor, role, family: str, part: str) -> tuple[int, torch.Tensor]:
    axes = [a for a in range(t.ndim) if a not in (role.resid_axis, role.expert_axis)]
    ax = axes[-1]
    n = t.shape[ax]
    idx = torch.arange(n)
    if family in INTERLEAVED:
        sel = idx[0::2] if part == "gate" else idx[1::2]
    else:
        sel = idx[: n // 2] if part == "gate" else idx[n // 2:]
    return ax, sel


def edit_fn(r, targets, layers, scale: float = 1.0, method: str = "standard", family: str = "", dirs_by_layer=None, keep_dtype_math=False):
    """An edit: project r out of every tensor whose target group is in ``targets`` and layer in ``layers``.

    ``layers`` may be a callable(key, role) -> bool (e.g. a prefix match). Fused gate_up with only one of
    its groups targeted gets only that half edited. ``dirs_by_layer``: layer -> direction overrides r.
    """

    def fn(key, role, t):
        if role.resid_axis is None or role.is_bias and role.io != "writer":
            return None
        ok_layer = layers(key, role) if callable(layers) else (role.layer if role.layer is not None else 0) in layers
        hit = [g for g in targets_of(role) if g in targets]
        if not ok_layer or not hit:
            return None
        rr = dirs_by_layer.get(role.layer, r) if dirs_by_layer else r
        w = t.float()
        f = (lambda x: project_out_norm_preserving(x, rr, role.resid_axis, scale)) if method == "norm_preserving" else (lambda x: project_out(x, rr, role.resid_axis, scale))
        if role.projection == "gate_up" and len(hit) == 1 and len(targets_of(role)) == 2:
            ax, sel = _half_index(w, role, family, "gate" if hit[0].endswith("gate") else "up")
            w = w.clone()
            w.index_copy_(ax, sel, f(w.index_select(ax, sel)))
            return w
        return f(w)

    return fn


def prefix_layers(prefix_layer: int):
    """What ``key.startswith(f'...layers.{n}')`` matches: layer n and n0-n9, n00-..."""
    def match(key, role):
        return role.layer is not None and str(role.layer).startswith(str(prefix_layer))
    return match
