"""Quantized weight formats as float32: block-scaled FP8 and MXFP4, read piece by piece, re-quantized after an edit.

Both are read as transformers 5 reads them (transformers/integrations/finegrained_fp8.py ``Fp8Dequantize``,
integrations/mxfp4.py ``convert_moe_packed_tensors``), so a value read here is the value the model computes with:

- block-scaled FP8 (DeepSeek-V3, Kimi-K2, Qwen3-FP8, GLM-4.5-FP8): ``q`` float8_e4m3fn (or e5m2) [.., R, C] and
  ``scale_inv`` [.., ceil(R/bm), ceil(C/bn)] in float32 (or bf16/fp16, or E8M0 bytes meaning 2^(b - 127)):
  W = float(q) * scale_inv of the element's block, the product in float32. The block size is the config's
  ``weight_block_size``; the last block of a dimension may be partial (DeepSeek-V3's kv_a_proj_with_mqa has 576
  rows under 128-row blocks). ``block=None`` is one scale for the whole tensor.
- MXFP4 (gpt-oss experts): ``blocks`` uint8 [E, R, G, 16], two e2m1 codes per byte (the low nibble is the even
  element), and ``scales`` uint8 [E, R, G], E8M0 exponents with bias 127: [E, R, 32 G] = FP4[code] * 2^(s - 127),
  held by the model transposed, [E, 32 G, R] (gpt-oss's [E, in, out]).

A tensor is read by rows of its logical [N, last] view (``rows``, the pieces audit/weights/pair_stats.py walks), with
each element's expected squared rounding error (``rounding_var``: the variance of x - q over the rounding cell of
the stored code, x uniform in it, times the block scale squared -- what storing a value in this format costs, the
format's own floor), or by slabs along one axis (``slab``); ``requantize`` writes a float32 slab back with
recomputed scales (an ablation that keeps the format). Codes are decoded by table lookup (3x faster than torch's
float8 cast on CPU, same values).
"""

from __future__ import annotations

import math

import torch

from audit.weights import native

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SCALE_TAGS = ("F32", "BF16", "F16", "F8_E8M0", "U8")  # U8 / F8_E8M0: E8M0 exponents, 2^(b - 127)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # transformers' FP4_VALUES
MXFP4_BLOCK = 32
E8M0_BIAS = 127


def _cell_var(mags: list[float]) -> list[float]:
    """E[(x - m)^2] for x uniform over the round-to-nearest cell of each magnitude of a sorted grid [0, ..., max].

    The top cell ends at the grid's maximum: block scales map each block's largest magnitude onto it (FP8:
    448 / amax; MXFP4: the scale exponent rounded up, so nothing exceeds 6), so no value lies beyond it.
    """
    out = []
    for i, m in enumerate(mags):
        lo = -mags[1] / 2 if i == 0 else (mags[i - 1] + m) / 2
        hi = m if i == len(mags) - 1 else (m + mags[i + 1]) / 2
        out.append(((hi - m) ** 3 - (lo - m) ** 3) / (3 * (hi - lo)))
    return out


def _fp8_tables(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, rounding variance) of each of the 256 codes of an FP8 dtype, float32; NaN codes have variance 0."""
    vals = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = torch.isfinite(vals)
    mags = sorted({abs(v) for v in vals[finite].tolist()})
    var_of = dict(zip(mags, _cell_var(mags)))
    var = torch.tensor([var_of[abs(v)] if math.isfinite(v) else 0.0 for v in vals.tolist()], dtype=torch.float32)
    return vals, var


_FP8 = {dt: _fp8_tables(dt) for dt in FP8_DTYPES.values()}
FP8_MAX = {dt: float(torch.finfo(dt).max) for dt in FP8_DTYPES.values()}
_FP4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
_FP4_VAR = torch.tensor(_cell_var(list(FP4_VALUES[:8])) * 2, dtype=torch.float32)
_FP4_THRESH = torch.tensor([(a + b) / 2 for a, b in zip(FP4_VALUES[:7], FP4_VALUES[1:8])])


def e8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents (uint8 or float8_e8m0fnu) as float32 2^(b - 127), exactly (255: NaN, as transformers reads it via exp2)."""
    return torch.exp2(b.view(torch.uint8).float() - E8M0_BIAS)


def _lut(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = table[codes[i]] for uint8 codes: the C kernel of audit/weights/native.py where it is built (0.3 ns an element),
    else index_select with int32 indices (its fastest path, 3 ns)."""
    flat = out.reshape(-1)
    K = native.kernels() if table.numel() == 256 else None
    if K is not None and codes.is_contiguous() and flat.is_contiguous() and flat.data_ptr() == out.data_ptr():
        K.lut_u8(codes, table, flat)
        return flat
    return torch.index_select(table, 0, codes.reshape(-1).to(torch.int32), out=flat)


class BlockFP8:
    """A block-scaled FP8 tensor [.., R, C] and its scales, read (and, when its buffers are writable, re-quantized) as float32."""

    method = "fp8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None):
        self.q, self.scale_raw = q, scale
        self.dtype = q.dtype
        self.shape = tuple(q.shape)
        self.R, self.C = self.shape[-2:]
        self.block = (self.R, self.C) if block is None else (int(block[0]), int(block[1]))
        self.SR, self.SC = -(-self.R // self.block[0]), -(-self.C // self.block[1])
        self.e8m0 = scale.dtype in (torch.uint8, getattr(torch, "float8_e8m0fnu", None))
        # pieces of whole block rows: multiples of bm when every matrix is whole blocks high, else whole matrices
        self.row_align = self.block[0] if self.R % self.block[0] == 0 else self.R
        self._codes = q.view(torch.uint8).reshape(-1, self.C)
        self._s: torch.Tensor | None = None

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.scale_raw

    def scales(self) -> torch.Tensor:
        """The block scales as float32 [M * SR, SC] (M = product of the leading dims): small, converted once."""
        if self._s is None:
            s = self.scale_raw
            self._s = (e8m0_to_float(s) if self.e8m0 else s.float()).reshape(-1, self.SC)
        return self._s

    def _row_scales(self, r0: int, r1: int) -> torch.Tensor:
        """[r1 - r0, SC]: the scale row of each flat row r of the [N, C] view (matrix r // R, block row (r % R) // bm)."""
        r = torch.arange(r0, r1)
        return self.scales().index_select(0, (r // self.R) * self.SR + (r % self.R) // self.block[0])

    def _apply(self, out: torch.Tensor, s: torch.Tensor, c0: int = 0) -> torch.Tensor:
        """Multiply ``out`` [rows, w] (columns c0.. of the tensor, c0 a block boundary) by its blocks' scales ``s`` [rows, SC]."""
        bn = self.block[1]
        full, j0 = out.shape[1] // bn, c0 // bn
        if full:
            out[:, :full * bn].view(out.shape[0], full, bn).mul_(s[:, j0:j0 + full, None])
        if out.shape[1] > full * bn:
            out[:, full * bn:].mul_(s[:, j0 + full:j0 + full + 1])
        return out

    def rows(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Flat rows r0..r1 of the [N, C] view as float32 into ``out`` (at least (r1 - r0) * C elements); returns [rows, C]."""
        o = _lut(_FP8[self.dtype][0], self._codes[r0:r1], out[:(r1 - r0) * self.C]).view(r1 - r0, self.C)
        return self._apply(o, self._row_scales(r0, r1))

    def rounding_var(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Each element's expected squared rounding error, E[(x - W)^2] over its code's cell, for rows r0..r1."""
        o = _lut(_FP8[self.dtype][1], self._codes[r0:r1], out[:(r1 - r0) * self.C]).view(r1 - r0, self.C)
        s = self._row_scales(r0, r1)
        return self._apply(o, s * s)

    def dequantize(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.float32)
        if out.numel():
            self.rows(0, self._codes.shape[0], out.view(-1))
        return out

    # -- slabs (ablation) ---------------------------------------------------------------------
    def slab_align(self, axis: int) -> int:
        """The step a slab along ``axis`` starts at (and ends at, unless it ends the axis): whole blocks."""
        axis %= len(self.shape)
        return self.block[1] if axis == len(self.shape) - 1 else self.block[0] if axis == len(self.shape) - 2 else 1

    def _slab_views(self, axis: int, a: int, b: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(axis, q's slab as [M, r, c], the scales' slab as [M, ceil(r/bm), ceil(c/bn)]) for a block-aligned slab."""
        nd = len(self.shape)
        axis %= nd
        al = self.slab_align(axis)
        if a % al or (b % al and b != self.shape[axis]):
            raise ValueError(f"slab {a}:{b} on axis {axis} is not aligned to the {al}-wide blocks")
        bm, bn = self.block
        qv, sv = self.q.view(-1, self.R, self.C), self.scale_raw.reshape(-1, self.SR, self.SC)
        if axis == nd - 1:
            return axis, qv[:, :, a:b], sv[:, :, a // bn:-(-b // bn)]
        if nd == 2:
            return axis, qv[:, a:b], sv[:, a // bm:-(-b // bm)]
        if axis == 0:
            per = math.prod(self.shape[1:-2])  # matrices per index of axis 0
            return axis, qv[a * per:b * per], sv[a * per:b * per]
        raise ValueError("FP8 slabs run along the first or the last axis")

    def slab(self, axis: int, a: int, b: int) -> torch.Tensor:
        """Elements a..b along ``axis`` (the first or the last; block-aligned) as a new float32 tensor."""
        axis, qs, _ = self._slab_views(axis, a, b)
        shape = list(self.shape)
        shape[axis] = b - a
        out = torch.empty(qs.shape, dtype=torch.float32)
        if not out.numel():
            return out.view(shape)
        if axis == len(self.shape) - 1:
            _lut(_FP8[self.dtype][0], qs.contiguous().view(torch.uint8), out)
            self._apply(out.view(-1, b - a), self._row_scales(0, self._codes.shape[0]), a)
        else:
            first = a if len(self.shape) == 2 else a * math.prod(self.shape[1:-1])  # the slab's first flat row of [N, C]
            self.rows(first, first + out.numel() // self.C, out.view(-1))
        return out.view(shape)

    def _quantize_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [M, r, c] float32 starting at block boundaries -> (q [M, r, c] in this dtype, scale_inv as stored [M, nr, nc],
        scale_inv as float32 [M, nr, nc]): block amax -> scale, as transformers' Fp8Quantize (see ``requantize``)."""
        bm, bn = self.block
        fmax = FP8_MAX[self.dtype]
        M, r, c = x.shape
        nr, nc = -(-r // bm), -(-c // bn)
        if r % bm or c % bn:
            x = torch.nn.functional.pad(x, (0, nc * bn - c, 0, nr * bm - r))  # partial last blocks: zeros change no amax
        blk = x.view(M, nr, bm, nc, bn)
        amax = blk.abs().amax(dim=(2, 4))
        scale = torch.where(amax > 0, fmax / amax, torch.ones_like(amax))
        inv = (1.0 / scale).float()
        if self.e8m0:
            exp = torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny)))
            stored = (exp + E8M0_BIAS).clamp(0, 254).to(torch.uint8).view(self.scale_raw.dtype)
            inv = torch.exp2(exp)
            scale = 1.0 / inv
        elif self.scale_raw.dtype != torch.float32:
            stored = inv.to(self.scale_raw.dtype)
            inv = stored.float()
            scale = 1.0 / inv
        else:
            stored = inv
        y = blk * scale[:, :, None, :, None]
        q = y.clamp_(-fmax, fmax).to(self.dtype).view(M, nr * bm, nc * bn)[:, :r, :c]
        return q, stored, inv

    def requantized_rows(self, r0: int, r1: int, x: torch.Tensor) -> torch.Tensor:
        """What storing float32 rows r0..r1 ``x`` ([rows, C], whole block rows: ``row_align``) in this format with fresh block
        scales gives back, as float32 (the values an ablation keeping the format writes)."""
        bm, bn = self.block
        if r0 % self.R == 0 and (r1 - r0) % self.R == 0:
            xm = x.reshape(-1, self.R, self.C)  # whole matrices
        elif self.R % bm == 0 and r0 % bm == 0:
            xm = x.reshape(1, r1 - r0, self.C)  # whole block rows of aligned matrices
        else:
            raise ValueError(f"rows {r0}:{r1} are not whole {bm}-row blocks of {self.R}-row matrices")
        q, _, inv = self._quantize_blocks(xm.float())
        out = _lut(_FP8[self.dtype][0], q.contiguous().view(torch.uint8), torch.empty(q.numel())).view(q.shape)
        M, r, c = q.shape
        full = c // bn
        sr = inv.repeat_interleave(bm, dim=1)[:, :r]  # [M, r, nc]
        if full:
            out[:, :, :full * bn].view(M, r, full, bn).mul_(sr[:, :, :full, None])
        if c > full * bn:
            out[:, :, full * bn:].mul_(sr[:, :, full:])
        return out.view(r1 - r0, self.C)

    def requantize(self, axis: int, a: int, b: int, w: torch.Tensor) -> None:
        """Store float32 ``w`` (the slab a..b along ``axis``) with recomputed per-block scales, in place of the slab.

        As transformers' Fp8Quantize: scale = max / amax of each block (1 where the block is all zero), q =
        fp8(clamp(w * scale)), scale_inv = 1 / scale stored in the scales' dtype (E8M0: rounded up to a power of
        two first; any dtype but float32: q is computed with the reciprocal of the stored value, so that q *
        scale_inv is what was meant).
        """
        _, qs, ss = self._slab_views(axis, a, b)
        q, stored, _ = self._quantize_blocks(w.reshape(qs.shape).float())
        qs.copy_(q)
        ss.copy_(stored)
        self._s = None


class MXFP4:
    """gpt-oss MXFP4 experts: physical [E, R, G, 16] codes with [E, R, G] exponents, read as the model's [E, 32 G, R]."""

    method = "mxfp4"

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        self.blocks, self.scales_raw = blocks, scales
        self.E, self.R, self.G = blocks.shape[:3]
        self.K = self.G * MXFP4_BLOCK
        self.shape = (self.E, self.K, self.R)
        self.row_align = MXFP4_BLOCK

    def numel(self) -> int:
        return self.E * self.K * self.R

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.blocks, self.scales_raw

    def _physical(self, e: int, g0: int, g1: int, table: torch.Tensor, squared: bool) -> torch.Tensor:
        """[R, 32 (g1 - g0)]: expert e, block groups g0..g1 decoded through ``table`` and scaled (squared scale for variances)."""
        b = self.blocks[e, :, g0:g1]  # [R, g, 16]
        vals = torch.empty(self.R, g1 - g0, 16, 2)
        vals[..., 0] = table[(b & 0x0F).to(torch.int32)]
        vals[..., 1] = table[(b >> 4).to(torch.int32)]
        exp = self.scales_raw[e, :, g0:g1].to(torch.int32) - E8M0_BIAS  # [R, g]
        if squared:
            exp = exp * 2
        vals = torch.ldexp(vals.view(self.R, g1 - g0, 32), exp[..., None])  # transformers' exact op: ldexp
        return vals.view(self.R, (g1 - g0) * 32)

    def _rows(self, r0: int, r1: int, out: torch.Tensor, table: torch.Tensor, squared: bool) -> torch.Tensor:
        o = out.reshape(-1)[:(r1 - r0) * self.R].view(r1 - r0, self.R)
        r = r0
        while r < r1:  # logical rows of one expert at a time: physical columns k0..k1 of expert e
            e, k0 = divmod(r, self.K)
            k1 = min(self.K, k0 + (r1 - r))
            g0, g1 = k0 // MXFP4_BLOCK, -(-k1 // MXFP4_BLOCK)
            phys = self._physical(e, g0, g1, table, squared)
            o[r - r0:r - r0 + (k1 - k0)] = phys[:, k0 - g0 * MXFP4_BLOCK:k1 - g0 * MXFP4_BLOCK].T
            r += k1 - k0
        return o

    def rows(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Flat rows r0..r1 of the logical [E * K, R] view as float32 into ``out``; returns [rows, R]."""
        return self._rows(r0, r1, out, _FP4, False)

    def rounding_var(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        return self._rows(r0, r1, out, _FP4_VAR, True)

    def dequantize(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.float32)
        return self.rows(0, self.E * self.K, out).view(self.shape) if self.numel() else out

    def requantized_rows(self, r0: int, r1: int, x: torch.Tensor) -> torch.Tensor:
        """What storing float32 logical rows r0..r1 ``x`` ([rows, R], multiples of 32 within each expert) in MXFP4 with fresh
        exponents gives back, as float32."""
        out = torch.empty(r1 - r0, self.R)
        r = r0
        while r < r1:
            e, k0 = divmod(r, self.K)
            k1 = min(self.K, k0 + (r1 - r))
            if k0 % MXFP4_BLOCK or (k1 % MXFP4_BLOCK and k1 != self.K):
                raise ValueError(f"rows {r0}:{r1} are not whole {MXFP4_BLOCK}-value blocks")
            blocks, scales = quantize_mxfp4(x[r - r0:r - r0 + k1 - k0].T)  # physical [R, k]
            vals = torch.stack([_FP4[(blocks & 0x0F).to(torch.int32)], _FP4[(blocks >> 4).to(torch.int32)]], -1).view(self.R, -1, MXFP4_BLOCK)
            out[r - r0:r - r0 + k1 - k0] = torch.ldexp(vals, scales.to(torch.int32)[..., None] - E8M0_BIAS).view(self.R, -1).T
            r += k1 - k0
        return out

    def slab_align(self, axis: int) -> int:
        return MXFP4_BLOCK if axis % 3 == 1 else 1

    def slab(self, axis: int, a: int, b: int) -> torch.Tensor:
        """Experts a..b (axis 0) as a float32 [b - a, K, R] tensor."""
        if axis % 3 != 0:
            raise ValueError("MXFP4 slabs run along the experts axis")
        out = torch.empty(b - a, self.K, self.R)
        if out.numel():
            self.rows(a * self.K, b * self.K, out)
        return out

    def requantize(self, axis: int, a: int, b: int, w: torch.Tensor) -> None:
        """Store float32 experts a..b ([b - a, K, R]) with recomputed exponents, as gpt-oss's quantizer does (quantize_mxfp4)."""
        if axis % 3 != 0:
            raise ValueError("MXFP4 slabs run along the experts axis")
        blocks, scales = quantize_mxfp4(w.transpose(1, 2))
        self.blocks[a:b] = blocks
        self.scales_raw[a:b] = scales


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., K] float -> (blocks uint8 [.., K/32, 16], scales uint8 [.., K/32]): MXFP4 with the scale exponent rounded up.

    Each 32-value block gets 2^e with e = ceil(log2(amax / 6)) (so no value exceeds 6 x 2^e: nothing is clamped,
    the rounding of the triton kernels gpt-oss and transformers quantize with), values rounded to the nearest
    e2m1 code, ties to the even code; an all-zero block gets exponent byte 0.
    """
    *lead, K = x.shape
    if K % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs the quantized axis to be a multiple of {MXFP4_BLOCK}, got {K}")
    xb = x.float().reshape(*lead, K // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = xb.abs().amax(-1)
    m, ex = torch.frexp(amax / 6.0)  # amax / 6 = m 2^ex, m in [0.5, 1): ceil(log2) = ex, or ex - 1 for an exact power of two
    e = torch.where(m == 0.5, ex - 1, ex)
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
    y = torch.ldexp(xb, -e[..., None]).clamp(-6.0, 6.0)
    mag = y.abs().contiguous()
    idx = torch.bucketize(mag, _FP4_THRESH)  # thresholds are the midpoints: a tie lands on the lower code
    tie = mag == _FP4_THRESH[idx.clamp(max=len(_FP4_THRESH) - 1)]
    idx = idx + (tie & (idx % 2 == 1)).long()  # ties to the even code
    code = (idx + 8 * (torch.signbit(y) & (idx > 0)).long()).to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (e + E8M0_BIAS).to(torch.uint8)


def quantize_fp8(x: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype = torch.float8_e4m3fn,
                 scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., R, C] float -> (q [.., R, C] fp8, scale_inv [.., ceil(R/bm), ceil(C/bn)]): block-scaled FP8 (see BlockFP8.requantize)."""
    R, C = x.shape[-2:]
    bm, bn = (R, C) if block is None else block
    q = torch.zeros(x.shape, dtype=dtype)
    s = torch.zeros(*x.shape[:-2], -(-R // bm), -(-C // bn), dtype=torch.float32).to(scale_dtype)
    t = BlockFP8(q, s, block)
    if x.numel():
        t.requantize(len(x.shape) - 1, 0, C, x.float())
    return q, s
