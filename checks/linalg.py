"""The arithmetic of directional ablation, on any tensor axis, in float32 or wider.

A writer W (residual on ``axis``) is orthogonalized as W - s r (r^T W): its output loses s times
its component along r. A reader is edited the same way on its input axis: W - s (W r) r^T. Both
are one formula: subtract s * r (x) (r . W along ``axis``). Fused 3-D expert tensors and biases
need nothing special once the residual axis is known (checks/layout.py gives it).
"""

from __future__ import annotations

import torch


def unit(r: torch.Tensor) -> torch.Tensor:
    r = r.detach().to(torch.float64 if r.dtype == torch.float64 else torch.float32).flatten()
    n = r.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("direction has zero or non-finite norm")
    return r / n


def along(w: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """r . W contracted over ``axis``: the component of W along r (the axis removed). Float32 or wider."""
    wf = w.float() if w.dtype not in (torch.float32, torch.float64) else w
    return torch.tensordot(wf, unit(r).to(wf.dtype), dims=([axis], [0]))


def project_out(w: torch.Tensor, r: torch.Tensor, axis: int, scale: float = 1.0) -> torch.Tensor:
    """W - scale * r (x) (r . W) along ``axis``, computed in float32 (float64 stays), same dtype as computed."""
    wf = w.float() if w.dtype not in (torch.float32, torch.float64) else w
    ru = unit(r).to(wf.dtype)
    comp = torch.tensordot(wf, ru, dims=([axis], [0]))  # shape of W without axis
    outer = comp.unsqueeze(axis) * ru.reshape([-1 if i == axis else 1 for i in range(wf.ndim)])
    return wf - scale * outer


def project_out_norm_preserving(w: torch.Tensor, r: torch.Tensor, axis: int, scale: float = 1.0, keep_axis: int | None = None) -> torch.Tensor:
    """Project r out, then rescale each slice along ``keep_axis`` back to its original norm.

    The norm kept is that of each vector *along the residual axis* (one per input feature for a
    writer, one per output row for a reader): for W [H, I] written on axis 0, each column
    W[:, j] keeps its norm. ``keep_axis`` defaults to ``axis``.
    """
    keep_axis = axis if keep_axis is None else keep_axis
    wf = w.float() if w.dtype not in (torch.float32, torch.float64) else w
    out = project_out(wf, r, axis, scale)
    n0 = wf.norm(dim=keep_axis, keepdim=True)
    n1 = out.norm(dim=keep_axis, keepdim=True)
    return out * torch.where(n1 > 0, n0 / n1.clamp_min(1e-30), torch.ones_like(n1))
