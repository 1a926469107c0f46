"""Stream a base and an ablated model side by side, one tensor pair at a time, each byte read once.

``open_pair`` opens both directories and refuses pairs that cannot be compared (another family,
other shapes of the residual stream). ``compare_models`` walks the ablated model's tensors in disk
order (audit/model/reader.py: chunks mapped from the page cache; two workers, each judging its chunks
while the other waits on memory; resident memory flat in model size), hands each pair to the pure per-tensor function audit.weights.pair_stats, and
returns the small records the checks judge: TensorDiff (weights), TensorProjection (projection),
TensorRecovery (recovery).

Tensors are the models' logical ones (audit/model/logical.py): a block-scaled FP8 or MXFP4 weight is judged
on its dequantized values, with its format's rounding floor. A quantized base's tensor stored plain in
the ablated model (a dequantized copy, as `audit ablate` writes by default) is unchanged when it holds
exactly the base's values cast to its dtype, and is otherwise compared by value. The ablated model may be a GGUF
file (audit/model/gguf_file.py): every value of a quantized GGUF tensor moved under rounding, so it is unchanged
when its difference from the base is what its type's rounding explains (checks/conversion.py ``within_rounding``),
judged on a first pass; only a tensor changed beyond that is read again for its floors and the edit's direction.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from audit.model.logical import recast_equal, row_pieces
from audit.model.directory import ModelDir
from audit.model.gguf_file import GGUFModel, is_gguf
from audit.model.reader import chunks, read_pairs
from checks.conversion import within_rounding
from checks.errors import AuditError
from checks.layout import Layout, Role, gate_up_split, targets_of
from audit.weights.pair_stats import bytes_equal, is_lazy, pair_stats, same_bits
from checks.projection import TensorProjection, floor_can_matter
from checks.recover import TensorRecovery
from checks.weights import TensorDiff

WORKERS = 2  # fixed, not the machine's core count: which worker saw which tensor must not change the results
CHUNK = 16 << 20  # bytes per model per mapping: small enough for resident memory to stay flat


@dataclass
class Comparison:
    """Everything one streamed pass produced."""

    diffs: list[TensorDiff] = field(default_factory=list)
    projections: list[TensorProjection] = field(default_factory=list)
    recoveries: list[TensorRecovery] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


def open_pair(ablated: str | os.PathLike, base: str | os.PathLike, same_ok: bool = False) -> tuple[ModelDir | GGUFModel, ModelDir]:
    """Open both models (the ablated one a model directory or a GGUF file); AuditError when they are not two versions of one architecture
    (or are one directory, unless ``same_ok``: `audit run --control`, the base audited against itself)."""
    md_b = ModelDir(base)
    md_a = GGUFModel(ablated, md_b) if is_gguf(ablated) else ModelDir(ablated)
    if md_a.path.resolve() == md_b.path.resolve() and not same_ok:
        raise AuditError(f"{md_a.path}: the ablated model and --base are the same directory; pass the original model as --base")
    la, lb = md_a.layout, md_b.layout
    if la.family != lb.family:
        raise AuditError(f"{md_a.path} is a {la.family} model but the base {md_b.path} is {lb.family}; pass the base this model was ablated from")
    for what in ("hidden_size", "num_layers", "n_routed_experts"):
        if getattr(la, what) != getattr(lb, what):
            raise AuditError(f"{md_a.path} and the base {md_b.path} differ in {what} ({getattr(la, what)} vs {getattr(lb, what)}); "
                             "they are not the same architecture -- pass the base this model was ablated from")
    return md_a, md_b


def _gate_up_halves(t: torch.Tensor, role: Role, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    split = gate_up_split(role, family, t.ndim)
    return split.half(t, "gate"), split.half(t, "up")


def _halves_equal(w0, w1, role: Role, family: str) -> tuple[bool, bool]:
    """Whether the gate and the up half of a fused gate_up pair hold the same values, read piece by piece (lazy or mixed
    pairs: a plain side is compared with the other's values cast to its dtype)."""
    shape = tuple(w0.shape)
    split = gate_up_split(role, family, len(shape))
    ax = split.axis
    n = shape[ax]
    dt = next((w.dtype for w in (w1, w0) if not is_lazy(w)), torch.float32)
    same = [True, True]
    inner = math.prod(shape[ax + 1:-1]) if ax < len(shape) - 1 else 1  # rows of the [N, last] view per index of ``ax``
    al = max(getattr(w, "row_align", 1) for w in (w0, w1))  # the same pieces on both sides
    for (r0, r1, a), (_, _, b) in zip(row_pieces(w0, align=al), row_pieces(w1, align=al)):
        a, b = a.to(dt), b.to(dt)
        if ax == len(shape) - 1:
            idx = torch.arange(n)
            halves = split.is_gate(idx, n)
            parts = ((a[:, halves], b[:, halves]), (a[:, ~halves], b[:, ~halves]))
        else:
            i = (torch.arange(r0, r1) // inner) % n
            halves = split.is_gate(i, n)
            parts = ((a[halves], b[halves]), (a[~halves], b[~halves]))
        for k, (x, y) in enumerate(parts):
            same[k] = same[k] and bytes_equal(x.contiguous(), y.contiguous())
    return same[0], same[1]


def _changed_targets(w0, w1, role: Role, family: str) -> tuple[str, ...]:
    ts = targets_of(role)
    if len(ts) == 2 and role.projection == "gate_up" and (is_lazy(w0) or is_lazy(w1)):
        return tuple(t for t, same in zip(ts, _halves_equal(w0, w1, role, family)) if not same)
    if len(ts) == 2 and role.projection == "gate_up" and w0.ndim >= 2:
        g0, u0 = _gate_up_halves(w0, role, family)
        g1, u1 = _gate_up_halves(w1, role, family)
        return tuple(t for t, same in zip(ts, (bytes_equal(g0, g1), bytes_equal(u0, u1))) if not same)
    return ts


def compare_models(md_a: ModelDir, md_b: ModelDir, directions_for: Callable[[str, Role], dict] | None = None,
                   progress: Callable[[int, int], None] | None = None, along_unchanged: bool = True,
                   workers: int = WORKERS, chunk: int = CHUNK) -> Comparison:
    """Stream every tensor pair once. ``directions_for(key, role)`` -> {name: unit [H]} to project on.

    Unchanged tensors are projected only when they write to the stream (how much r an untouched
    writer still writes is what the diagnosis needs) or route (the router's per-expert sensitivity).
    ``workers`` threads each map and judge every ``workers``-th chunk of about ``chunk`` bytes, so one
    waits on memory while the other computes; the assignment is fixed (hints come from a worker's own
    previous tensors), so the results do not depend on timing.
    """
    t0 = time.perf_counter()
    layout: Layout = md_b.layout
    order = sorted(md_a.logical.values(), key=lambda t: (t.shard, t.begin))
    groups = chunks(order, chunk)
    judged: dict[str, tuple] = {}
    total = md_a.nbytes + md_b.nbytes
    done = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def work(k: int) -> None:
        fds: dict = {}
        recent: list[torch.Tensor] = []  # this worker's last recovered directions: likely its next tensor's
        try:
            for group in groups[k::workers]:
                if stop.is_set():
                    return
                for info_a, info_b, w1, w0, same in read_pairs(md_a, md_b, group, fds):
                    judged[info_a.name] = _judge(info_a, info_b, w1, w0, same, md_a, layout, directions_for, along_unchanged, recent)
                    del w1, w0
                    if progress and info_b is not None:
                        with lock:
                            done[0] += info_a.nbytes + info_b.nbytes
                            progress(done[0], total)
        except BaseException:
            stop.set()
            raise
        finally:
            for fd in fds.values():
                os.close(fd)

    threads = torch.get_num_threads()
    # Work comes in cache-sized pieces (~2 MB): one thread per op streams them best; several threads
    # per small op spend more on synchronisation than they save (and stall badly on a loaded machine).
    torch.set_num_threads(1)
    # A worker back from an operation that ran without the interpreter lock (memcmp, a torch op) needs it
    # again; with the default 5 ms switch interval it can wait that long behind the other worker's
    # Python (measured: a reader thread ran 2x slower).
    switch = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audit-pair") as ex:
            for f in [ex.submit(work, k) for k in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(switch)
    out = Comparison()
    for info_a in order:
        diff, proj, rec, nbytes = judged[info_a.name]
        out.diffs.append(diff)
        if proj is not None:
            out.projections.append(proj)
        if rec is not None:
            out.recoveries.append(rec)
        out.bytes_read += nbytes
    for key, info_b in md_b.logical.items():
        if key not in md_a.logical:
            role = layout.roles.get(key)
            out.diffs.append(TensorDiff(**_diff_base(key, role), status="missing", base_shape=info_b.shape, base_dtype=info_b.dtype))
    out.seconds = time.perf_counter() - t0
    return out


def _judge(info_a, info_b, w1, w0, same, md_a: ModelDir, layout: Layout, directions_for, along_unchanged: bool, recent: list):
    """One pair -> (TensorDiff, TensorProjection | None, TensorRecovery | None, bytes read); updates ``recent``."""
    key = info_a.name
    role = layout.roles.get(key) or md_a.layout.roles.get(key)
    base = _diff_base(key, role)
    if info_b is None:
        return TensorDiff(**base, status="added", ablated_shape=info_a.shape, ablated_dtype=info_a.dtype), None, None, 0
    base.update(base_shape=info_b.shape, ablated_shape=info_a.shape, base_dtype=info_b.dtype, ablated_dtype=info_a.dtype)
    if info_b.shape != info_a.shape:
        return TensorDiff(**base, status="shape-changed"), None, None, 0
    nbytes = info_a.nbytes + info_b.nbytes
    status = "changed"
    lazy0, lazy1 = is_lazy(w0), is_lazy(w1)
    dtype_changed = info_b.dtype != info_a.dtype and not (lazy0 or lazy1)  # a plain tensor re-stored in another dtype
    stored = None
    if dtype_changed:
        if not (w0.dtype.is_floating_point and w1.dtype.is_floating_point):  # integer data: values not comparable
            return TensorDiff(**base, status="dtype-changed", dtype_changed=True), None, None, nbytes
        # one tensor re-stored in another float dtype: compare values, and call it unchanged only when the wider
        # one rounds to the narrower bit for bit (a re-save, not an edit)
        narrow, wide = (w0, w1) if torch.finfo(w0.dtype).eps >= torch.finfo(w1.dtype).eps else (w1, w0)
        same = bytes_equal(wide.to(narrow.dtype), narrow)
        stored, w0, w1 = w1.dtype, w0.float(), w1.float()
    elif info_b.dtype != info_a.dtype and lazy0 and not lazy1 and w1.dtype.is_floating_point:
        same = recast_equal(w0, w1)  # a quantized base stored plain: by value, its plain cast is no change
    dirs = directions_for(key, role) if (directions_for and role is not None and role.resid_axis is not None) else {}
    if same and lazy0 and not lazy1:  # identical once cast: judge the stored copy against itself
        w0 = w1
    floats = all(is_lazy(w) or w.dtype.is_floating_point for w in (w0, w1))
    if not (floats and (lazy0 or lazy1 or w1.dtype == w0.dtype)):  # integer / packed blocks: bytes only
        same = same if same is not None else same_bits(w0, w1)
        return TensorDiff(**base, status="unchanged" if same else "changed", rel_change=0.0 if same else None,
                          changed_targets=() if same else base.get("targets", ())), None, None, nbytes
    stats = functools.partial(pair_stats, w0, w1, role.resid_axis if role else None, dirs, role.expert_axis if role else None,
                              layout.n_routed_experts if role and role.component == "experts" else 0,
                              along_unchanged=along_unchanged and role is not None and (role.io == "writer" or role.component == "router"),
                              hints=recent, identical=same, floor_needed=floor_can_matter, stored_dtype=stored)  # exact floors only where they can change a class
    rounded = False
    if getattr(w1, "method", None) == "gguf" and not lazy0:  # every stored value moved under rounding: unchanged = within it
        st = stats(recover=False, requant_floor=False)
        rounded = within_rounding(st.diff_fro, math.sqrt(w1.noise_sq()), st.dirs)
        if rounded:
            status = "unchanged"
        else:
            st = stats()
    else:
        st = stats()
    if st.identical:
        status = "unchanged"
    changed = status == "changed"
    ct = _changed_targets(w0, w1, role, layout.family) if (changed and role is not None) else ()
    diff = TensorDiff(**base, status=status, changed_targets=ct, rel_change=st.rel_change, dtype_changed=dtype_changed, rounded=rounded,
                      nonfinite_base=st.nonfinite_base, nonfinite_ablated=st.nonfinite_ablated, expert_rel_change=st.expert_rel_change)
    proj = rec = None
    if rounded and not (role is not None and along_unchanged and (role.io == "writer" or role.component == "router")):
        st.dirs = {}  # unchanged up to rounding: projected only where an untouched tensor is (writers, routers), as identical ones
    if role is not None and role.io in ("writer", "reader") and st.dirs:
        proj = TensorProjection(key, role.layer, role.component, role.projection, role.io, targets_of(role), changed,
                                info_a.dtype, role.expert, st.ablated_fro, st.dirs)
    if changed and st.recovery is not None and role is not None:
        rec = TensorRecovery(key, role.layer, role.component, role.projection, role.io, st.recovery, role.expert)
        u = st.recovery.direction
        if st.recovery.rank1_share >= 0.5 and not any(abs(float(h @ u)) > 0.999 for h in recent if h.numel() == u.numel()):
            recent[:] = [u] + recent[:1]  # the last two distinct directions seen
    return diff, proj, rec, nbytes


def _diff_base(key: str, role: Role | None) -> dict:
    if role is None:
        return {"key": key}
    return {"key": key, "layer": role.layer, "component": role.component, "projection": role.projection, "expert": role.expert,
            "io": role.io, "targets": targets_of(role)}
