"""Stream a base and an ablated model side by side, one tensor pair at a time, each byte read once.

``open_pair`` opens both directories and refuses pairs that cannot be compared (another family,
other shapes of the residual stream). ``compare_models`` walks the ablated model's tensors in disk
order, reads each pair with plain positioned reads (no memory map: resident memory stays at one
pair, whatever the model size), hands it to the pure per-tensor function checks.pair_stats, and
returns the small records the checks judge: TensorDiff (weights), TensorProjection (projection),
TensorRecovery (recovery).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from audit.model_dir import DTYPES, ModelDir, TensorInfo
from checks.errors import AuditError
from checks.layout import Layout, Role, targets_of
from checks.pair_stats import bytes_equal, pair_stats
from checks.projection import TensorProjection, floor_can_matter
from checks.recover import TensorRecovery
from checks.weights import TensorDiff

INTERLEAVED_GATE_UP = ("gpt_oss",)


@dataclass
class Comparison:
    """Everything one streamed pass produced."""

    diffs: list[TensorDiff] = field(default_factory=list)
    projections: list[TensorProjection] = field(default_factory=list)
    recoveries: list[TensorRecovery] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


def open_pair(ablated: str | os.PathLike, base: str | os.PathLike) -> tuple[ModelDir, ModelDir]:
    """Open both model directories; AuditError when they are not two versions of one architecture."""
    md_a, md_b = ModelDir(ablated), ModelDir(base)
    if md_a.path.resolve() == md_b.path.resolve():
        raise AuditError(f"{md_a.path}: the ablated model and --base are the same directory; pass the original model as --base")
    la, lb = md_a.layout, md_b.layout
    if la.family != lb.family:
        raise AuditError(f"{md_a.path} is a {la.family} model but the base {md_b.path} is {lb.family}; pass the base this model was ablated from")
    for what in ("hidden_size", "num_layers", "n_routed_experts"):
        if getattr(la, what) != getattr(lb, what):
            raise AuditError(f"{md_a.path} and the base {md_b.path} differ in {what} ({getattr(la, what)} vs {getattr(lb, what)}); "
                             "they are not the same architecture -- pass the base this model was ablated from")
    return md_a, md_b


def read_tensor(md: ModelDir, info: TensorInfo, fds: dict) -> torch.Tensor:
    """One tensor read with os.preadv into an owned buffer (page cache -> memory once; nothing stays mapped)."""
    dtype, size = DTYPES[info.dtype]
    if dtype is None:
        raise AuditError(f"{md.path / info.shard}: {info.name} has dtype {info.dtype}, which this torch build cannot read")
    fd = fds.get((md.path, info.shard))
    if fd is None:
        fd = os.open(md.path / info.shard, os.O_RDONLY)
        fds[(md.path, info.shard)] = fd
    n = info.end - info.begin
    if n != math.prod(info.shape) * size:
        raise AuditError(f"{md.path / info.shard}: {info.name} occupies {n} bytes, its shape {info.shape} x {info.dtype} needs {math.prod(info.shape) * size}")
    buf = torch.empty(n, dtype=torch.uint8)
    mv = memoryview(buf.numpy())
    got = 0
    while got < n:
        k = os.preadv(fd, [mv[got:]], info.begin + got)
        if k <= 0:
            raise AuditError(f"{md.path / info.shard}: truncated while reading {info.name}")
        got += k
    return buf.view(dtype).reshape(info.shape) if n else torch.empty(info.shape, dtype=dtype)


def _gate_up_halves(t: torch.Tensor, role: Role, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    axes = [a for a in range(t.ndim) if a not in (role.resid_axis, role.expert_axis)]
    ax = axes[-1]
    if family in INTERLEAVED_GATE_UP:
        idx = torch.arange(t.shape[ax])
        return t.index_select(ax, idx[0::2]), t.index_select(ax, idx[1::2])
    return t.chunk(2, dim=ax)


def _changed_targets(w0, w1, role: Role, family: str) -> tuple[str, ...]:
    ts = targets_of(role)
    if len(ts) == 2 and role.projection == "gate_up" and w0.ndim >= 2:
        g0, u0 = _gate_up_halves(w0, role, family)
        g1, u1 = _gate_up_halves(w1, role, family)
        return tuple(t for t, same in zip(ts, (bytes_equal(g0, g1), bytes_equal(u0, u1))) if not same)
    return ts


def compare_models(md_a: ModelDir, md_b: ModelDir, directions_for: Callable[[str, Role], dict] | None = None,
                   progress: Callable[[int, int], None] | None = None, along_unchanged: bool = True) -> Comparison:
    """Stream every tensor pair once. ``directions_for(key, role)`` -> {name: unit [H]} to project on.

    Unchanged tensors are projected only when they write to the stream (how much r an untouched
    writer still writes is what the diagnosis needs) or route (the router's per-expert sensitivity).
    """
    t0 = time.perf_counter()
    layout: Layout = md_b.layout
    out = Comparison()
    fds: dict = {}
    total = md_a.nbytes + md_b.nbytes
    threads = torch.get_num_threads()
    # Work comes in cache-sized blocks (~1 MB): one thread per op streams them best; several threads
    # per small op spend more on synchronisation than they save (and stall badly on a loaded machine).
    torch.set_num_threads(1)
    pairs = _prefetched(md_a, md_b, fds)
    recent: list[torch.Tensor] = []
    try:
        for info_a, info_b, w1, w0, same in pairs:
            key = info_a.name
            role = layout.roles.get(key) or md_a.layout.roles.get(key)
            base = _diff_base(key, role)
            if info_b is None:
                out.diffs.append(TensorDiff(**base, status="added", ablated_shape=info_a.shape, ablated_dtype=info_a.dtype))
                continue
            base.update(base_shape=info_b.shape, ablated_shape=info_a.shape, base_dtype=info_b.dtype, ablated_dtype=info_a.dtype)
            if info_b.shape != info_a.shape:
                out.diffs.append(TensorDiff(**base, status="shape-changed"))
                continue
            out.bytes_read += info_a.nbytes + info_b.nbytes
            status = "changed"
            if info_b.dtype != info_a.dtype:
                status = "dtype-changed"
                w1 = w1.to(w0.dtype) if w0.dtype.is_floating_point and w1.dtype.is_floating_point else w1
            dirs = directions_for(key, role) if (directions_for and role is not None and role.resid_axis is not None) else {}
            floating = w0.dtype.is_floating_point and w1.dtype == w0.dtype
            if not floating:  # integer / quantized blocks: bytes only
                same = same if same is not None else bytes_equal(w0, w1)
                if status == "changed":
                    status = "unchanged" if same else "changed"
                out.diffs.append(TensorDiff(**base, status=status, rel_change=0.0 if same else None, changed_targets=() if same else base.get("targets", ())))
                continue
            st = pair_stats(w0, w1, role.resid_axis if role else None, dirs, role.expert_axis if role else None,
                            layout.n_routed_experts if role and role.component == "experts" else 0,
                            along_unchanged=along_unchanged and role is not None and (role.io == "writer" or role.component == "router"), hints=recent,
                            identical=same, floor_needed=floor_can_matter)  # the exact rounding floor only where it can change a class
            if status == "changed" and st.identical:
                status = "unchanged"
            changed = status == "changed" or (status == "dtype-changed" and not st.identical)
            ct = _changed_targets(w0, w1, role, layout.family) if (changed and role is not None) else ()
            out.diffs.append(TensorDiff(**base, status=status, changed_targets=ct, rel_change=st.rel_change,
                                        nonfinite_base=st.nonfinite_base, nonfinite_ablated=st.nonfinite_ablated, expert_rel_change=st.expert_rel_change))
            if role is not None and role.io in ("writer", "reader") and st.dirs:
                out.projections.append(TensorProjection(key, role.layer, role.component, role.projection, role.io, targets_of(role), changed,
                                                        info_b.dtype, role.expert, st.ablated_fro, st.dirs))
            if changed and st.recovery is not None and role is not None:
                out.recoveries.append(TensorRecovery(key, role.layer, role.component, role.projection, role.io, st.recovery, role.expert))
                u = st.recovery.direction
                if st.recovery.rank1_share >= 0.5 and not any(abs(float(h @ u)) > 0.999 for h in recent if h.numel() == u.numel()):
                    recent[:] = [u] + recent[:1]  # the last two distinct directions seen: likely the next tensor's
            del w0, w1
            if progress:
                progress(out.bytes_read, total)
        for key, info_b in md_b.tensors.items():
            if key not in md_a.tensors:
                role = layout.roles.get(key)
                out.diffs.append(TensorDiff(**_diff_base(key, role), status="missing", base_shape=info_b.shape, base_dtype=info_b.dtype))
    finally:
        pairs.close()  # waits for a read in flight before the files close
        torch.set_num_threads(threads)
        for fd in fds.values():
            os.close(fd)
    out.seconds = time.perf_counter() - t0
    return out


def _prefetched(md_a: ModelDir, md_b: ModelDir, fds: dict):
    """(info_a, info_b, ablated, base, identical) in the ablated model's disk order; the next pair is read while this one is judged.

    One reader thread overlaps the disk (or page cache) with the arithmetic and also tells whether the
    pair is bit-identical (libc memcmp, without the GIL; None when dtypes differ): at most two pairs are
    in memory, so peak memory stays at 4x the largest tensor. Pairs that cannot be compared come with None tensors.
    """
    from concurrent.futures import ThreadPoolExecutor

    def load(info_a):
        info_b = md_b.tensors.get(info_a.name)
        if info_b is None or info_b.shape != info_a.shape:
            return info_a, info_b, None, None, None
        w1, w0 = read_tensor(md_a, info_a, fds), read_tensor(md_b, info_b, fds)
        return info_a, info_b, w1, w0, (bytes_equal(w0, w1) if w0.dtype == w1.dtype else None)

    order = sorted(md_a.tensors.values(), key=lambda t: (t.shard, t.begin))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-read") as pool:
        nxt = pool.submit(load, order[0]) if order else None
        for i in range(len(order)):
            item = nxt.result()
            nxt = pool.submit(load, order[i + 1]) if i + 1 < len(order) else None
            yield item
            del item


def _diff_base(key: str, role: Role | None) -> dict:
    if role is None:
        return {"key": key}
    return {"key": key, "layer": role.layer, "component": role.component, "projection": role.projection, "expert": role.expert,
            "io": role.io, "targets": targets_of(role)}
