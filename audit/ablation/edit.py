"""One tensor edited in place: r projected out of its residual axis (or the norm-preserving variant), in float32
chunks that bound the work memory, cast back once; fused gate_up halves and expert subsets edited as views."""

from __future__ import annotations

import threading
from dataclasses import replace

import torch

from audit.intent.config import PlannedEdit
from checks.errors import AuditError
from checks.layout import GateUpSplit
from checks.linalg import along, project_out_norm_preserving


CHUNK_ELEMENTS = 1 << 24  # float32 work per chunk: 64 MiB


def _part_view(t: torch.Tensor, edit: PlannedEdit) -> torch.Tensor:
    """The (writable) view of ``t`` an edit touches: the whole tensor, or the gate / up half of a fused gate_up."""
    if edit.part is None:
        return t
    try:
        return GateUpSplit(edit.split, edit.split_axis).half(t, edit.part)
    except AuditError as e:
        raise AuditError(f"{edit.key}: {e}") from None


def _chunks(t: torch.Tensor, resid_axis: int):
    """Views of ``t`` cut along its first non-residual axis, each at most CHUNK_ELEMENTS (the contraction stays whole)."""
    if t.ndim == 1:
        yield t
        return
    ax = next(a for a in range(t.ndim) if a != resid_axis)
    step = max(1, CHUNK_ELEMENTS // max(1, t.numel() // max(1, t.shape[ax])))
    for start in range(0, t.shape[ax], step):
        yield t.narrow(ax, start, min(step, t.shape[ax] - start))


_SCRATCH = threading.local()


def _scratch(shape) -> torch.Tensor:
    """A reused float32 buffer of ``shape`` (per thread): a fresh one page-faults every 4 KB, as costly as the edit itself."""
    n = torch.Size(shape).numel()
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(shape)


def edit_inplace(t: torch.Tensor, edit: PlannedEdit) -> tuple[float, float]:
    """Apply ``edit`` to ``t`` in place (float32 arithmetic, cast back once); returns (||along r|| before, after).

    The norms are Frobenius norms of the component along r of the edited part, the after one
    measured on the values as stored (after the cast back).
    """
    if edit.direction is None:
        raise AuditError(f"{edit.key}: planned without directions; pass a directions file")
    if edit.experts is not None and edit.role.expert_axis is not None:  # some experts of a fused tensor: each one's slice, in place
        ea, sq = edit.role.expert_axis, [0.0, 0.0]
        role = replace(edit.role, expert_axis=None, resid_axis=edit.role.resid_axis - (edit.role.resid_axis > ea))
        sub = replace(edit, role=role, experts=None, split_axis=None if edit.split_axis is None else edit.split_axis - (edit.split_axis > ea))
        for e in edit.experts:
            b, a = edit_inplace(t.select(ea, e), sub)
            sq[0] += b * b
            sq[1] += a * a
        return sq[0] ** 0.5, sq[1] ** 0.5
    ax = edit.role.resid_axis
    view = _part_view(t, edit)
    r = edit.direction.to(torch.float32)
    before = after = 0.0
    r_b = r.reshape([-1 if i == ax else 1 for i in range(view.ndim)])
    for chunk in _chunks(view, ax):
        w = _scratch(chunk.shape)
        w.copy_(chunk)
        if edit.method == "norm_preserving":
            before += float(along(w, r, ax).double().pow(2).sum())
            w = project_out_norm_preserving(w, r, ax, edit.scale)
        else:  # W - s r (x) (r . W) in place, the outer product never materialized (checks.linalg.project_out's arithmetic)
            comp = torch.tensordot(w, r, dims=([ax], [0]))
            before += float(comp.double().pow(2).sum())
            if w.ndim == 2:
                w.addr_(r, comp, alpha=-edit.scale) if ax == 0 else w.addr_(comp, r, alpha=-edit.scale)
            else:
                w.addcmul_(comp.unsqueeze(ax), r_b, value=-edit.scale)
        chunk.copy_(w)  # the one cast back
        w.copy_(chunk)  # the values as stored, for the residue check (reuses the buffer)
        after += float(torch.tensordot(w, r, dims=([ax], [0])).double().pow(2).sum())
    return before ** 0.5, after ** 0.5


def edit_tensor(tensor: torch.Tensor, edit: PlannedEdit) -> torch.Tensor:
    """The edited copy of ``tensor`` (same dtype and shape); the in-memory counterpart of the streaming path."""
    out = tensor.detach().clone()
    edit_inplace(out, edit)
    return out
