"""Everything the weight checks need from one (base, ablated) tensor pair, in one pass over memory.

One pure function, ``pair_stats``, turns the two tensors of one key into a small record: whether the
bytes are identical, the Frobenius norms of W, W' and of the change D = W' - W, non-finite counts,
the component along each given direction r before and after (r . W and r . W' on the residual axis,
kept per expert for fused tensors), the rounding floor of W's dtype along r, and -- for a changed
tensor -- the dominant direction of the change (its top singular vector on the residual axis), how
much of the change's energy that direction holds, and the effective scale of the edit along it.

The tensor is seen as the [H, P*Q] matrix of its [P, H, Q] view (residual axis in the middle) and
walked in pieces of about ``block`` elements that are contiguous in memory: whole columns when the
residual axis is the last one (Q = 1), else panels of whole rows of one p, whose products are summed
over the panels. Each piece is converted once to float32 (not at all when it already is), and every
statistic of the piece is taken while it is in cache; memory stays at the two inputs plus a few pieces
(and, for row panels, one p's change). The same pass gives D D^T r for each given direction r (or
hint): when one explains the change, that is the direction the data gives (one exact power step from
r); otherwise a few more power steps find it.

Where the C kernels (checks/native.py) can read the pair in place -- CPU, contiguous, bfloat16 or
float32 -- they take the whole tensor instead of pieces: one pass gives the norms and both products
for up to 4 directions at a time, and D D^T r reads the pair again rather than keeping D. Elsewhere
(no C compiler, other dtypes, ``native=False``) the torch walk above gives the same numbers.

Given ``floor_needed`` (the judge's rule for when a floor can change its verdict), the rounding floor
is first bounded for free (floor^2 <= c max_h r_h^2 ||W'||_F^2) and computed exactly, in one more
pass over W', only for the directions where that bound leaves the verdict open.

Either tensor may also be a quantized one read lazily (audit/model/quant.py: block-scaled FP8, MXFP4): an
object with ``shape``, ``numel()``, ``row_align`` and ``rows(r0, r1, out)`` / ``rounding_var(r0, r1, out)``,
which write rows r0..r1 of its [N, last] view (its values, or each value's expected squared rounding
error in its format) as float32 into ``out``. Its pieces are read that way (the torch walk; memory stays
at a few pieces whatever the tensor's size; one of up to DENSE elements is decoded once into a reused
float32 buffer, which every pass then reads, the C kernels included), and the floor of a quantized W' is its format's own, always
computed exactly: the larger of the expected one, sqrt(sum_h r_h^2 Var(e_hc)) from ``rounding_var``, and
the re-quantization floor (``floor_requant``), ||r . Q(W - r (x) r.W)|| with Q the source's
``requantized_rows`` (fresh block scales): what storing the exact edit in this format leaves. The second
is the one that matters on real widths: W sits on the format's grid and an edit moves each element by a
small fraction of a cell, so re-rounding snaps much of it back, a residue along r that independent
rounding errors do not predict (FP8 128x128 blocks: 2.6 % of r at 32 wide, 19 % at 1024, 36 % at 4096).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from checks import native

# Mean squared relative error of round-to-nearest into a binary float format, per eps^2: for a value
# with mantissa m (log-uniform in [1, 2)) the absolute error is uniform in +-ulp/2 with ulp = x*eps/m,
# so E[err^2] = x^2 eps^2 E[1/m^2] / 12 = x^2 eps^2 * 0.5410 / 12.
ROUND_MSE_PER_EPS2 = 0.5410 / 12
CANDIDATE_EXPLAINS = 0.99  # a given direction holding this share of the change's energy is taken as its direction
RETAIN_D = 1 << 23  # row panels: keep one p's change (up to 32 MB of float32) for D D^T r in the same pass; larger, one more pass
DENSE = 1 << 22  # a lazy (quantized) tensor up to this many elements is decoded once, into a reused float32 buffer (16 MB)


@dataclass
class DirStats:
    """One direction r against one pair. Norms are of r . W over the non-residual axes."""

    before: float  # ||r . W||
    after: float  # ||r . W'||
    dot: float  # <r . W, r . W'>: signed, so a reflection (r . W' = -r . W) is told from "untouched"
    floor: float  # expected ||r . e|| if W' was rounded to its dtype (e = rounding error); an upper bound of it when not floor_exact
    per_expert: dict[str, list[float]] | None = None  # fused tensors: before/after/dot/floor per expert
    vec_before: list[float] | None = None  # small results (a router: per-expert logit sensitivity r . W_e)
    vec_after: list[float] | None = None
    floor_exact: bool = True  # False: ``floor`` is only an upper bound (the exact value could not change the verdict)
    floor_requant: float | None = None  # a quantized W': ||r . Q(W - r (x) r.W)||, what re-quantizing the exact edit leaves

    @property
    def share_left(self) -> float | None:
        return self.after / self.before if self.before > 0 else None

    @property
    def signed_left(self) -> float | None:
        """<r.W', r.W> / ||r.W||^2 = 1 - s for an edit W' = W - s r r^T W."""
        return self.dot / self.before ** 2 if self.before > 0 else None


@dataclass
class EditRecovery:
    """The dominant direction of a change D = W' - W on the residual axis."""

    direction: torch.Tensor  # unit [H] float32, sign: largest |component| positive
    rank1_share: float  # sigma_1^2 / ||D||_F^2: 1 for an exact rank-one edit
    scale: float | None  # effective s along the direction over the edited columns: 1 - <u.W', u.W>/||u.W||^2 (1 removed, 2 reflected)
    sigma1: float
    along: DirStats | None = None  # the tensor against its own recovered direction (edited columns only)


@dataclass
class PairStats:
    """What one key's pair says; tensors are not kept (only ``recovery.direction``, [H])."""

    identical: bool
    numel: int
    base_fro: float | None = 0.0  # None for an identical pair: nothing reports it, so it is not computed
    ablated_fro: float | None = 0.0
    diff_fro: float = 0.0
    nonfinite_base: int = 0
    nonfinite_ablated: int = 0
    expert_rel_change: list[float] | None = None  # fused tensors: ||D_e|| / ||W_e|| per expert
    dirs: dict[str, DirStats] = field(default_factory=dict)
    recovery: EditRecovery | None = None

    @property
    def rel_change(self) -> float:
        if self.identical:
            return 0.0
        return self.diff_fro / self.base_fro if self.base_fro > 0 else (math.inf if self.diff_fro > 0 else 0.0)


def round_mse_coeff(dtype: torch.dtype) -> float:
    """E[(round(x) - x)^2] / x^2 for storing into ``dtype`` (0 for integer types)."""
    if not dtype.is_floating_point:
        return 0.0
    return ROUND_MSE_PER_EPS2 * float(torch.finfo(dtype).eps) ** 2


def _libc_memcmp():
    try:
        import ctypes

        f = ctypes.CDLL(None).memcmp
        f.restype, f.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        return f
    except (OSError, AttributeError):
        return None


_MEMCMP = _libc_memcmp()  # ctypes drops the GIL around it: a reader thread can compare while the main thread computes


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ua = a.contiguous().reshape(-1).view(torch.uint8)
    ub = b.contiguous().reshape(-1).view(torch.uint8)
    if _MEMCMP is not None and ua.device.type == "cpu":
        return ua.numel() == 0 or _MEMCMP(ua.data_ptr(), ub.data_ptr(), ua.numel()) == 0  # libc memcmp: ~2x numpy, no allocation
    n8 = ua.numel() // 8 * 8
    if n8 and not np.array_equal(ua[:n8].view(torch.int64).numpy(), ub[:n8].view(torch.int64).numpy()):
        return False  # numpy compares 8 bytes at a time without allocating (torch.equal on uint8 is ~50x slower)
    return bool(torch.equal(ua[n8:], ub[n8:]))


class _Lazy:
    """A lazily read (quantized) tensor seen as [P, H, Q]: pieces come from its source's rows of the [N, last] view."""

    def __init__(self, src, shape: tuple[int, int, int]):
        self.src, self.shape = src, shape
        self.last = src.shape[-1] if src.shape else 1
        self.align = max(1, int(getattr(src, "row_align", 1)))

    def piece(self, e0: int, e1: int, out: torch.Tensor, var: bool = False) -> torch.Tensor:
        """Flat elements e0..e1 (whole rows of the [N, last] view) as float32 in ``out``: values, or rounding variances."""
        f = self.src.rounding_var if var else self.src.rows
        return f(e0 // self.last, e1 // self.last, out)


def is_lazy(t) -> bool:
    """Whether ``t`` is a lazily read quantized tensor (not a torch.Tensor)."""
    return not isinstance(t, torch.Tensor)


def same_bits(a, b) -> bool:
    """bytes_equal for plain or lazy tensors: a lazy one is identical to another of its kind with identical stored parts."""
    if is_lazy(a) or is_lazy(b):
        return (is_lazy(a) and is_lazy(b) and type(a) is type(b) and tuple(a.shape) == tuple(b.shape)
                and all(bytes_equal(x, y) for x, y in zip(a.parts, b.parts)))
    return bytes_equal(a, b)


def _phq(t: torch.Tensor, axis: int | None, rows: bool = False) -> torch.Tensor:
    """View as [P, H, Q] with the residual axis in the middle (no residual axis: [1, numel, 1], or with ``rows`` [N, last, 1]:
    only norms are asked then, which any view gives, and a lazy tensor's pieces stay a few rows)."""
    shape = tuple(t.shape)
    if axis is None and rows:
        last = shape[-1] if shape else 1
        phq = (t.numel() // max(last, 1), last, 1)
    elif axis is not None:
        phq = (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))
    if is_lazy(t):
        return _Lazy(t, phq)
    t = t.contiguous()
    if axis is None and not rows:
        return t.reshape(1, -1, 1)
    return t.reshape(phq)


class _Work:
    """Reusable float32 scratch blocks, per thread: fresh allocations page-fault on every block and cost ~30x the arithmetic."""

    local: ClassVar[threading.local] = threading.local()

    @classmethod
    def get(cls, slot: int, n: int) -> torch.Tensor:
        bufs = cls.local.__dict__.setdefault("bufs", {})
        b = bufs.get(slot)
        if b is None or b.numel() < n:
            b = torch.empty(max(n, 1 << 18), dtype=torch.float32)
            bufs[slot] = b
        return b[:n]


@dataclass
class _Piece:
    """A sub-matrix [rows, cols] of the [H, P*Q] view: rows ``hs``, columns c0:c1 (of one p when ``p`` is set)."""

    hs: slice
    c0: int
    c1: int
    p: int | None
    raw: list[torch.Tensor]  # float32, contiguous in memory (a flat view is free)
    mat: list[torch.Tensor]  # the same data as [rows, cols] matrices (raw or raw.T)
    e0: int = 0  # the flat element range of the [P, H, Q] tensors it covers
    e1: int = 0


class _Walk:
    """Walks the [H, P*Q] matrix view of one or more [P, H, Q] tensors in pieces contiguous in memory.

    Q = 1 (residual axis last: readers, embeddings, gpt-oss's [E, in, out] writers): pieces of whole
    columns. Q > 1 (writers [H, in], fused [E, H, I]): panels of whole rows of one p, so products with
    the columns are partial sums over the panels (``full_rows`` False).
    """

    def __init__(self, xs: list[torch.Tensor], block: int, kernels: native.Kernels | None = None, var: bool = False, align: int = 1):
        self.xs, self.block, self.K = xs, block, kernels  # K: the C kernels take whole tensors, in place of pieces
        self.P, self.H, self.Q = xs[0].shape
        self.full_rows = self.Q == 1
        self.var = var  # lazy sources give their rounding variances instead of their values
        self.align = max([x.align for x in xs if isinstance(x, _Lazy)] + [align])  # whole blocks per piece: each decoded once

    @staticmethod
    def _f32(src: torch.Tensor, slot: int) -> torch.Tensor:
        if src.dtype == torch.float32:
            return src  # a contiguous view of the input; never written to
        buf = _Work.get(slot, src.numel()).view(src.shape)
        buf.copy_(src)
        return buf

    def _get(self, x, i: int, e0: int, e1: int, shape: tuple[int, int], view) -> torch.Tensor:
        if isinstance(x, _Lazy):
            return x.piece(e0, e1, _Work.get(i, e1 - e0), self.var).view(shape)
        return self._f32(view(x), i)

    def __iter__(self):
        P, H, Q = self.P, self.H, self.Q
        if P * H * Q == 0:  # an empty tensor: nothing to walk
            return
        al = self.align
        if self.full_rows:
            cols = max(1, self.block // max(H, 1))
            cols = max(al, cols // al * al)
            for c0 in range(0, P, cols):
                c1 = min(P, c0 + cols)
                raw = [self._get(x, i, c0 * H, c1 * H, (c1 - c0, H), lambda t: t[c0:c1, :, 0]) for i, x in enumerate(self.xs)]  # [cols, H]
                yield _Piece(slice(0, H), c0, c1, None, raw, [r.T for r in raw], c0 * H, c1 * H)
        else:
            rows = max(1, self.block // Q)
            rows = max(al, rows // al * al)
            for p in range(P):
                for h0 in range(0, H, rows):
                    h1 = min(H, h0 + rows)
                    e0, e1 = (p * H + h0) * Q, (p * H + h1) * Q
                    raw = [self._get(x, i, e0, e1, (h1 - h0, Q), lambda t: t[p, h0:h1, :]) for i, x in enumerate(self.xs)]  # [rows, Q]
                    yield _Piece(slice(h0, h1), p * Q, (p + 1) * Q, p, raw, raw, e0, e1)


def _diff(pc: _Piece, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """D = W' - W of a two-tensor piece in ``out`` or scratch: (contiguous raw, [rows, cols] matrix)."""
    raw0, raw1 = pc.raw
    rawd = (out if out is not None else _Work.get(2, raw0.numel())).view(raw0.shape)
    torch.sub(raw1, raw0, out=rawd)
    return rawd, (rawd if pc.mat[0] is raw0 else rawd.T)


def _sq(raw: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """W' * W' of a piece in scratch, laid out like ``mat``."""
    out = _Work.get(3, raw.numel()).view(raw.shape)
    torch.mul(raw, raw, out=out)
    return out if mat is raw else out.T


def _pad4(R: torch.Tensor) -> torch.Tensor:
    """More than one direction: zero rows up to a multiple of 4, which the C kernels take 4 at a time and MKL's
    gemm takes fastest (2-3 rows cost ~1.6x 4). One direction stays one row (a gemv; the kernels' one-row loop)."""
    return torch.cat([R, R.new_zeros(-R.shape[0] % 4, R.shape[1])]) if R.shape[0] > 1 and R.shape[0] % 4 else R


class _Requant:
    """The re-quantization floor of a lazy W' along a direction u, per column of the [H, P*Q] view: u . Q(W - u (x) u.W),
    Q = storing in W''s format with fresh block scales (its source's ``requantized_rows``), in one pass over W."""

    def __init__(self, x0v, x1v: _Lazy, block: int):
        self.x0v, self.x1v, self.block = x0v, x1v, block
        self.cache: dict = {}

    def cols(self, u: torch.Tensor, uw0: torch.Tensor, key=None) -> torch.Tensor:
        if key is not None and key in self.cache:
            return self.cache[key]
        P, H, Q = self.x0v.shape
        out = torch.zeros(P * Q)
        src, last = self.x1v.src, self.x1v.last
        for pc in _Walk([self.x0v], self.block, align=self.x1v.align):  # pieces of whole blocks of W''s format
            w = pc.raw[0]
            ws = torch.addr(w, uw0[pc.c0:pc.c1], u, alpha=-1.0) if Q == 1 else torch.addr(w, u[pc.hs], uw0[pc.c0:pc.c1], alpha=-1.0)
            d = src.requantized_rows(pc.e0 // last, pc.e1 // last, ws.reshape(-1, last)).view(w.shape)
            out[pc.c0:pc.c1] += d @ u if Q == 1 else u[pc.hs] @ d
        if key is not None:
            self.cache[key] = out
        return out


def _decoded(x, slot: int, limit: int | None = None):
    """A lazy tensor of up to ``limit`` (DENSE) elements decoded once into the reused float32 buffer ``slot``, as [P, H, Q];
    anything else as it is. Every later pass then reads the buffer (the C kernels can) instead of decoding again."""
    limit = DENSE if limit is None else limit
    if not isinstance(x, _Lazy) or math.prod(x.shape) > limit or not math.prod(x.shape):
        return x
    n = math.prod(x.shape)
    buf = _Work.get(slot, n)
    x.src.rows(0, n // x.last, buf)
    return buf.view(x.shape)


def _var_piece(x1v: _Lazy, pc: _Piece) -> torch.Tensor:
    """The rounding variances of a lazy W' over a piece, laid out like the piece's matrix (the lazy counterpart of _sq)."""
    raw = pc.raw[-1]
    out = x1v.piece(pc.e0, pc.e1, _Work.get(3, raw.numel()), var=True).view(raw.shape)
    return out if pc.mat[-1] is raw else out.T


def _kernels(want: bool | None, *xs: torch.Tensor) -> native.Kernels | None:
    """The C kernels when ``want`` is not False and they can read ``xs`` in place; ``want`` True insists."""
    K = (native.kernels() if want is not False and not any(is_lazy(x) for x in xs) and len({x.dtype for x in xs}) == 1 and native.usable(*xs)
         else None)  # the kernels read every tensor of a call in one dtype
    if want and K is None:
        raise RuntimeError("the C kernels of pair_stats are unavailable here (no C compiler, AUDIT_NATIVE=0, or a dtype they do not read)")
    return K


def _sign_fix(u: torch.Tensor) -> torch.Tensor:
    i = int(u.abs().argmax())
    return -u if u[i] < 0 else u


def pair_stats(w0: torch.Tensor, w1: torch.Tensor, resid_axis: int | None, directions: dict[str, torch.Tensor] | None = None,
               expert_axis: int | None = None, n_experts: int = 0, recover: bool = True, along_unchanged: bool = True,
               block: int = 1 << 19, small_vec: int = 512, hints: list[torch.Tensor] | None = None,
               identical: bool | None = None, floor_needed: Callable[[DirStats], bool] | None = None, retain: int = RETAIN_D,
               native: bool | None = None, dense: int = DENSE, stored_dtype: torch.dtype | None = None,
               requant_floor: bool = True) -> PairStats:
    """Statistics of the pair (W = ``w0`` base, W' = ``w1`` ablated), same shape and dtype.

    ``directions``: name -> unit vector [H] (float32), applied on ``resid_axis``. ``expert_axis``:
    the fused experts axis (must precede ``resid_axis``); per-expert results then come along.
    ``along_unchanged``: also compute r . W for an identical pair (how much r it writes or reads).
    ``hints``: more unit directions (e.g. those recovered from the previous tensors), tried only as
    candidates that may explain a change (sparing the power steps), never reported. ``identical``:
    the caller's bytes_equal(w0, w1) when it already has it. ``floor_needed(ds)``: given ``ds.floor``
    as an upper bound of the rounding floor, whether the exact floor could change the verdict on
    ``ds``; the floor is then computed only where it says so (the others keep the bound,
    ``floor_exact=False``). None: every floor exact. ``retain``: the most float32 elements of the change
    kept for D D^T r (the whole tensor, else one p of row panels, else one more pass); torch path only.
    ``native``: None, the C kernels (checks/native.py) where they can read the pair, else torch (``block``
    and ``retain`` then apply); False, always torch; True, always the kernels (an error where they cannot).
    ``dense``: a lazy tensor of up to this many elements is decoded once into a float32 buffer (0: always piece by piece).
    ``stored_dtype``: the dtype W' is stored in when the pair was cast to a common dtype to compare it
    (the rounding floor is that dtype's); default ``w1.dtype``. ``requant_floor``: False skips the re-quantization floor of a
    quantized W' (a first look that only asks whether the pair differs beyond rounding).
    """
    identical = same_bits(w0, w1) if identical is None else bool(identical)
    lazy1 = is_lazy(w1)
    if lazy1:
        floor_needed = None  # a quantized W' has no free bound of its floor: always the exact one
    directions = {k: v for k, v in (directions or {}).items() if v is not None}
    n_report = len(directions)
    if hints and not identical and resid_axis is not None:
        directions.update({f"_hint{i}": h for i, h in enumerate(hints) if h is not None and h.numel() == w0.shape[resid_axis]})
    use_dirs = bool(directions) and resid_axis is not None and (not identical or along_unchanged)
    st = PairStats(identical=identical, numel=w0.numel())
    if identical and not use_dirs:  # nothing to compute: ||W|| of an untouched tensor is reported nowhere
        st.base_fro = st.ablated_fro = None
        return st
    rows_view = is_lazy(w0) or lazy1
    x0v, x1v = _phq(w0, resid_axis, rows_view), _phq(w1, resid_axis, rows_view)
    lz1 = x1v if lazy1 else None  # the quantized W' itself: its floors come from its format
    x0v, x1v = _decoded(x0v, 5, dense), _decoded(x1v, 6, dense)  # values: a float32 buffer where the tensor is small enough
    P, H, Q = x0v.shape
    K = _kernels(native, x0v, x1v)
    per_expert = expert_axis is not None and n_experts > 0 and resid_axis is not None and expert_axis < resid_axis and P % n_experts == 0
    names = list(directions)
    R = torch.stack([directions[n].float().flatten() for n in names]) if use_dirs else None  # [m, H]
    if R is not None and R.shape[1] != H:
        raise ValueError(f"direction size {R.shape[1]} != residual axis size {H}")
    if R is not None:
        R = _pad4(R)
    R2 = R * R if R is not None else None
    c_round = 1.0 if lazy1 else round_mse_coeff(stored_dtype or w1.dtype)  # lazy: rounding_var gives absolute variances
    PQ = P * Q
    lazy_floor = floor_needed is not None
    a0 = torch.zeros(R.shape[0], PQ) if use_dirs else None
    a1 = torch.zeros(R.shape[0], PQ) if use_dirs and not identical else None
    fl = torch.zeros(R.shape[0], PQ) if use_dirs and not identical and c_round > 0 and not lazy_floor else None
    e_d2 = torch.zeros(P) if per_expert and not identical else None  # per p: ||D_p||^2, ||W_p||^2 (experts are whole p's)
    e_w2 = torch.zeros(P) if per_expert and not identical else None
    s_w0 = s_w1 = s_d = 0.0
    nf0 = nf1 = 0
    want_rec = recover and not identical and resid_axis is not None
    # D D^T r without a second pass over the inputs: keep the whole change D (float32) when it is small
    # enough and multiply once at the end (``whole``); else accumulate Z = D D^T R^T [H, m] for every
    # candidate as D^T R^T completes -- per piece for whole columns, per p for row panels (one p's D kept)
    whole = want_rec and use_dirs and P * H * Q <= retain and K is None  # the kernels read the pair again instead (cheaper than writing D)
    Z = torch.zeros(H, R.shape[0]) if want_rec and use_dirs and not whole and (Q == 1 or H * Q <= retain) and K is None else None
    slab = _Work.get(4, P * H * Q).view(P, H, Q) if whole else (_Work.get(4, H * Q).view(1, H, Q) if Z is not None and Q > 1 else None)

    if K is not None:
        s_w0, s_w1, s_d, e_w2, e_d2 = _native_pass(K, x0v, x1v, identical, R, R2, a0, a1, None if lazy1 else fl, n_experts if per_expert else 0)
        if lazy1 and fl is not None:  # the kernels square W'; a quantized W''s floor is its rounding variances
            fl = _col_floor(lz1, R2, block)
        if not math.isfinite(s_w0):
            nf0 = int((~torch.isfinite(x0v)).sum())
        if not math.isfinite(s_w1):
            nf1 = int((~torch.isfinite(x1v)).sum())
    elif identical:  # only the projections: ||W|| of an untouched tensor is reported nowhere
        for pc in (_Walk([x0v], block) if use_dirs else ()):
            a0[:, pc.c0:pc.c1].addmm_(R[:, pc.hs], pc.mat[0])
    else:
        for pc in _Walk([x0v, x1v], block):
            (raw0, raw1), (m0, m1) = pc.raw, pc.mat
            rawd, dm = _diff(pc, None if slab is None else (slab[pc.c0:pc.c1, :, 0] if Q == 1 else slab[pc.p if whole else 0, pc.hs]))
            f0, f1, fd = raw0.view(-1), raw1.view(-1), rawd.view(-1)
            w0sq, w1sq, dsq = float(torch.dot(f0, f0)), float(torch.dot(f1, f1)), float(torch.dot(fd, fd))
            if not math.isfinite(w0sq):
                nf0 += int((~torch.isfinite(raw0)).sum())
            if not math.isfinite(w1sq):
                nf1 += int((~torch.isfinite(raw1)).sum())
            s_w0 += w0sq
            s_w1 += w1sq
            s_d += dsq
            if e_d2 is not None:
                if pc.p is not None:
                    e_d2[pc.p] += dsq
                    e_w2[pc.p] += w0sq
                else:  # whole columns, one per p
                    e_d2[pc.c0:pc.c1] = torch.linalg.vector_norm(rawd, dim=1).square_()
                    e_w2[pc.c0:pc.c1] = torch.linalg.vector_norm(raw0, dim=1).square_()
            if use_dirs:
                rh = R[:, pc.hs]
                a0[:, pc.c0:pc.c1].addmm_(rh, m0)
                a1[:, pc.c0:pc.c1].addmm_(rh, m1)
                if fl is not None:
                    fl[:, pc.c0:pc.c1].addmm_(R2[:, pc.hs], _var_piece(lz1, pc) if lazy1 else _sq(raw1, m1))
                if Z is not None and (Q == 1 or pc.hs.stop == H):  # D^T R^T of these columns is complete
                    t = a1[:, pc.c0:pc.c1] - a0[:, pc.c0:pc.c1]
                    Z.addmm_(dm if Q == 1 else slab[0], t.T)

    if identical:
        st.base_fro = st.ablated_fro = None
        st.diff_fro = 0.0
    else:
        st.base_fro = math.sqrt(s_w0)
        st.ablated_fro, st.diff_fro = math.sqrt(s_w1) if math.isfinite(s_w1) else math.inf, math.sqrt(s_d) if math.isfinite(s_d) else math.inf
    st.nonfinite_base, st.nonfinite_ablated = nf0, nf1
    if e_d2 is not None:
        ed = e_d2.reshape(n_experts, -1).sum(1).sqrt()
        ew = e_w2.reshape(n_experts, -1).sum(1).sqrt()  # p is expert-major
        st.expert_rel_change = torch.where(ew > 0, ed / ew.clamp_min(1e-30), torch.where(ed > 0, torch.full_like(ed, math.inf), torch.zeros_like(ed))).tolist()

    floors = (_ColFloors(lz1 if lazy1 else x1v, R2, block, fl, None if lazy1 else K) if use_dirs and not identical and c_round > 0 else None)
    requant = (_Requant(x0v, lz1, block) if requant_floor and use_dirs and not identical and lazy1 and hasattr(w1, "requantized_rows")
               else None)
    if use_dirs:
        a1_ = a0 if identical else a1
        for j, n in enumerate(names[:n_report]):
            v0, v1 = a0[j], a1_[j]
            ds = DirStats(before=float(v0.norm()), after=float(v1.norm()), dot=float((v0 * v1).sum()), floor=0.0)
            f2 = None
            if floors is not None:
                ds.floor = _floor_bound(R2[j], s_w1, c_round)
                if not lazy_floor or not math.isfinite(ds.floor) or floor_needed(ds):
                    f2 = floors.rows(j) * c_round
                    ds.floor = float(f2.sum().sqrt())
                else:
                    ds.floor_exact = False
            if requant is not None:  # a quantized W': what re-quantizing the exact edit leaves, beside the expected noise
                rq2 = requant.cols(R[j], v0, key=j).square()
                ds.floor_requant = float(rq2.sum().sqrt())
                f2 = torch.maximum(f2, rq2) if f2 is not None else rq2  # per expert: the larger of the two
            if per_expert:
                e0, e1 = v0.reshape(n_experts, -1), v1.reshape(n_experts, -1)
                ds.per_expert = {"before": e0.norm(dim=1).tolist(), "after": e1.norm(dim=1).tolist(), "dot": (e0 * e1).sum(1).tolist(),
                                 "floor": (f2.reshape(n_experts, -1).sum(1).sqrt().tolist() if f2 is not None else [ds.floor] * n_experts)}
            if v0.numel() <= small_vec:
                ds.vec_before, ds.vec_after = v0.flatten().tolist(), v1.flatten().tolist()
            st.dirs[n] = ds

    if want_rec and st.diff_fro > 0 and math.isfinite(st.diff_fro):
        walk = _Walk([x0v, x1v], block, K)
        best = _best_candidate(a0, a1, len(names), s_d) if use_dirs else None
        z = None
        if best is not None and best[1] > 0:  # D D^T r: one exact power step from r
            t = a1[best[0]] - a0[best[0]]
            if whole:
                z = torch.bmm(slab, t.view(P, Q, 1)).sum(0).flatten() if Q > 1 else slab[:, :, 0].T @ t
            else:
                z = Z[:, best[0]] if Z is not None else _apply_d(walk, t)
        if best is not None and best[1] >= CANDIDATE_EXPLAINS:
            st.recovery = _from_candidate(best[0], best[1], a0, a1, z, floors, R2, s_w1, c_round, s_d, floor_needed)
            if requant is not None:
                rec = st.recovery.along
                rec.floor_requant = float(requant.cols(R[best[0]], a0[best[0]], key=best[0])[a1[best[0]] != a0[best[0]]].norm())
        else:
            st.recovery = _refine(walk, z if z is not None and float(z.norm()) > 0 else _start(H), st.diff_fro, c_round, s_w1, floor_needed,
                                  requant=requant, floor_src=lz1)
    return st


@functools.lru_cache(maxsize=None)
def _start(h: int) -> torch.Tensor:
    """A fixed pseudo-random unit start for power steps when no given direction is near the change."""
    v = torch.randn(h, generator=torch.Generator().manual_seed(0))
    return v / v.norm()


def _floor_bound(r2: torch.Tensor, s_w1: float, c_round: float) -> float:
    """Upper bound of the rounding floor along r, free: sum_c sum_h r_h^2 W'_hc^2 <= max_h r_h^2 ||W'||_F^2 (1e-3 margin for float32 sums)."""
    return math.sqrt(c_round * float(r2.max()) * s_w1) * (1 + 1e-3) if s_w1 >= 0 else math.nan


class _ColFloors:
    """Per-column sum_h r_h^2 W'_hc^2 for rows of R2: from the first pass's accumulator, or from one more pass over W' on first use."""

    def __init__(self, x1v: torch.Tensor, R2: torch.Tensor, block: int, fl: torch.Tensor | None, kernels: native.Kernels | None = None):
        self.x1v, self.R2, self.block, self.fl, self.K = x1v, R2, block, fl, kernels

    def rows(self, j: int) -> torch.Tensor:
        if self.fl is None:
            self.fl = _col_floor(self.x1v, self.R2, self.block, self.K)  # all rows in one pass: the padded gemm costs as much as one row's
        return self.fl[j]


def _native_pass(K: native.Kernels, x0v, x1v, identical: bool, R, R2, a0, a1, fl, n_experts: int):
    """The first pass in C: a0 (a1, fl) filled; returns (||W||^2, ||W'||^2, ||D||^2, per-expert ||W_e||^2, ||D_e||^2)."""
    if identical:
        if R is not None:
            K.project(x0v, None, R, a0, None)
        return 0.0, 0.0, 0.0, None, None
    P = x0v.shape[0]
    if R is not None:  # sums per p (the kernel's unit): experts are whole runs of p's
        sums = torch.zeros(P, 3, dtype=torch.float64)
        K.project(x0v, x1v, R, a0, a1, sums)
        if fl is not None:
            K.project(x1v, None, R2, fl, None, square=True)
    else:  # nothing to project on: only the norms, per expert where asked (each a contiguous run of p's)
        sums = torch.zeros(max(n_experts, 1), 3, dtype=torch.float64)
        for e, (b0, b1) in enumerate(zip(x0v.reshape(sums.shape[0], -1), x1v.reshape(sums.shape[0], -1))):
            K.sums(b0, b1, sums[e])
    tot = sums.sum(0).tolist()
    return tot[0], tot[1], tot[2], (sums[:, 0] if n_experts else None), (sums[:, 2] if n_experts else None)


def _col_floor(x1v: torch.Tensor, R2: torch.Tensor, block: int, kernels: native.Kernels | None = None) -> torch.Tensor:
    """[m, P*Q]: R2 @ (W' * W') per column of the [H, P*Q] view (R2: one row, or R's rows padded by _pad4)."""
    out = torch.zeros(R2.shape[0], x1v.shape[0] * x1v.shape[2])
    if kernels is not None:
        kernels.project(x1v, None, R2, out, None, square=True)
        return out
    lazy = isinstance(x1v, _Lazy)  # its walk gives the rounding variances themselves
    for pc in _Walk([x1v], block, var=lazy):
        out[:, pc.c0:pc.c1].addmm_(R2[:, pc.hs], pc.mat[0] if lazy else _sq(pc.raw[0], pc.mat[0]))
    return out


def _best_candidate(a0: torch.Tensor, a1: torch.Tensor, m: int, s_d: float) -> tuple[int, float] | None:
    """(j, share): the given direction r_j holding the largest share ||D^T r_j||^2 / ||D||^2 of the change (D^T r = r.W' - r.W)."""
    if s_d <= 0:
        return None
    shares = ((a1[:m] - a0[:m]).square().sum(1) / s_d).tolist()
    j = max(range(m), key=shares.__getitem__)
    return j, shares[j]


def _along(walk: _Walk, u: torch.Tensor, uw0: torch.Tensor, uw1: torch.Tensor, mask: torch.Tensor, s_w1: float, c_round: float,
           floor_needed, requant: _Requant | None = None, floor_src: _Lazy | None = None) -> DirStats:
    """u . W and u . W' over the edited columns (``mask``), with the rounding floor along u over them (of ``floor_src``, a
    quantized W', when given: its rounding variances; else of the walk's W')."""
    c0v, c1v = torch.where(mask, uw0, 0.0), torch.where(mask, uw1, 0.0)
    along = DirStats(before=float(c0v.norm()), after=float(c1v.norm()), dot=float(c0v @ c1v), floor=0.0)
    if c_round > 0:
        u2 = (u * u)[None]
        along.floor = _floor_bound(u2, s_w1, c_round)  # masked columns only: the all-column bound still holds
        if floor_needed is None or not math.isfinite(along.floor) or floor_needed(along):
            src, K = (floor_src, None) if floor_src is not None else (walk.xs[1], walk.K)
            along.floor = math.sqrt(float(_col_floor(src, u2, walk.block, K)[0][mask].sum()) * c_round)
            along.floor_exact = True
        else:
            along.floor_exact = False
    if requant is not None:
        along.floor_requant = float(requant.cols(u, uw0)[mask].norm())
    return along


def _apply_d(walk: _Walk, t: torch.Tensor) -> torch.Tensor:
    """z = D t, [H]: one pass."""
    z = torch.zeros(walk.H)
    if walk.K is not None:
        walk.K.apply_d(walk.xs[0], walk.xs[1], t.contiguous(), z)
        return z
    for pc in walk:
        _, dm = _diff(pc)
        z[pc.hs] += dm @ t[pc.c0:pc.c1]
    return z


def _from_candidate(j, share, a0, a1, z, floors, R2, s_w1, c_round, s_d, floor_needed) -> EditRecovery:
    """The change is (almost) along the given direction r_j: ||D^T r_j||^2 >= CANDIDATE_EXPLAINS ||D||^2.

    D^T r_j = r_j.W' - r_j.W is known from the first pass, so the rank-one share, the scale over the
    edited columns and the residue along r_j come free; the direction reported is the data's, z = D D^T r_j,
    not r_j itself.
    """
    t = a1[j] - a0[j]
    mask = t != 0
    c0v, c1v = torch.where(mask, a0[j], 0.0), torch.where(mask, a1[j], 0.0)
    aa, ab, bb = float(c0v @ c0v), float(c0v @ c1v), float(c1v @ c1v)
    along = DirStats(before=math.sqrt(aa), after=math.sqrt(bb), dot=ab, floor=0.0)
    if floors is not None:
        along.floor = _floor_bound(R2[j], s_w1, c_round)
        if floor_needed is None or not math.isfinite(along.floor) or floor_needed(along):
            along.floor = math.sqrt(float(floors.rows(j)[mask].sum()) * c_round)
        else:
            along.floor_exact = False
    direction = _sign_fix(z / z.norm())  # r_j . z = ||D^T r_j||^2 > 0: never zero
    return EditRecovery(direction=direction.float(), rank1_share=min(1.0, share), scale=1.0 - ab / aa if aa > 0 else None,
                        sigma1=math.sqrt(share * s_d), along=along)


def _power_step(walk: _Walk, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """t = D^T u, z = D t (one exact power step on D D^T), and u . W, u . W' per column."""
    PQ = walk.P * walk.Q
    if walk.K is not None:  # u . W and u . W' in one pass, D t in another (t = u.W' - u.W: float32 cancellation is far below what a step needs)
        a = torch.zeros(2, 1, PQ)
        walk.K.project(walk.xs[0], walk.xs[1], u[None].contiguous(), a[0], a[1])
        uw0, uw1 = a[0, 0], a[1, 0]
        t = uw1 - uw0
        return t, _apply_d(walk, t), uw0, uw1
    t, uw0, uw1, z = torch.zeros(PQ), torch.zeros(PQ), torch.zeros(PQ), torch.zeros(walk.H)
    for pc in walk:
        _, dm = _diff(pc)
        uh, cs = u[pc.hs], slice(pc.c0, pc.c1)
        t[cs] += uh @ dm
        uw0[cs] += uh @ pc.mat[0]
        uw1[cs] += uh @ pc.mat[1]
        if walk.full_rows:  # whole columns: t of this piece is final, D t accumulates in the same pass
            z += dm @ t[cs]
    if not walk.full_rows:
        z = _apply_d(walk, t)
    return t, z, uw0, uw1


def _refine(walk: _Walk, u: torch.Tensor, diff_fro: float, c_round: float, s_w1: float = math.nan,
            floor_needed: Callable[[DirStats], bool] | None = None, steps: int = 3, converged: float = 0.9999,
            requant: _Requant | None = None, floor_src: _Lazy | None = None) -> EditRecovery:
    """Power steps on D D^T from ``u`` until the direction settles (|cos| >= ``converged``, at most ``steps``).

    The last step gives sigma_1 = ||D D^T u|| / ||D^T u||, the direction, and the scale along u over
    the edited columns (those where D^T u != 0).
    """
    u = u.float() / u.float().norm()
    for k in range(steps):
        t, z, uw0, uw1 = _power_step(walk, u)
        zn = float(z.norm())
        if zn == 0:
            break
        new = z / zn
        if abs(float(new @ u)) >= converged or k == steps - 1:
            break
        u = new
    tn = float(t.norm())
    sigma1 = zn / tn if tn > 0 else 0.0
    direction = _sign_fix(z / zn) if zn > 0 else u
    share = min(1.0, sigma1 ** 2 / diff_fro ** 2) if diff_fro > 0 else 0.0
    along = _along(walk, u, uw0, uw1, t != 0, s_w1, c_round, floor_needed, requant, floor_src)
    return EditRecovery(direction=direction.float(), rank1_share=share, scale=1.0 - along.dot / along.before ** 2 if along.before > 0 else None,
                        sigma1=sigma1, along=along)
