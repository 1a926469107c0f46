"""GGUF (llama.cpp) block formats as float32: decoded block by block, with each element's rounding variance, and
re-quantized after an edit.

A GGUF tensor's rows (its innermost dimension, ``ne0``, the last axis of the Hugging Face weight) are cut into
blocks of 32 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or 256 values (the K-quants Q4_K, Q5_K, Q6_K), each stored with
its own scale (and minimum); F32, F16 and BF16 are plain floats. The byte layouts are ggml's
(ggml-common.h; gguf-py's ``gguf.quants`` decodes the same bytes and the tests hold us to it). Everything here
works on a run of whole blocks as a uint8 tensor [n_blocks, type_size], so any set of whole rows is decoded
without touching the rest of the tensor:

- ``decode(kind, raw)`` -> float32 [n_blocks, block]: the values llama.cpp computes with;
- ``rounding_step(kind, raw)`` -> float32 [n_blocks, block]: each value's rounding cell (the quantization step of
  its block or sub-block); a value x uniform in its cell leaves E[(x - q)^2] = step^2 / 12, the format's own floor
  (audit/model/quant.py's ``rounding_var`` for FP8 and MXFP4 says the same);
- ``encode(kind, x)`` -> uint8 [n_blocks, type_size]: float32 [n_blocks, block] quantized. Q8_0 is ggml's reference
  quantizer (byte for byte gguf-py's, in torch), the other 32-value types gguf-py's reference quantizers; the K-quants use ours, a plain
  least-squares fit of each sub-block's scale and minimum with 6-bit (Q6_K: 8-bit) sub-block scales, which is not
  llama.cpp's search (``make_qkx2_quants``) and differs from it by a fraction of a step. It is used for the
  re-quantization floor (what storing the exact edit in this type leaves), never to judge bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Kind:
    """One GGUF tensor type the audit reads: ggml's type id and name, values per block, bytes per block."""

    id: int
    name: str
    block: int
    size: int

    @property
    def plain(self) -> bool:
        return self.block == 1


QK = 256  # values per K-quant super-block
KINDS = {k.id: k for k in (
    Kind(0, "F32", 1, 4), Kind(1, "F16", 1, 2), Kind(30, "BF16", 1, 2),
    Kind(8, "Q8_0", 32, 34), Kind(2, "Q4_0", 32, 18), Kind(3, "Q4_1", 32, 20), Kind(6, "Q5_0", 32, 22), Kind(7, "Q5_1", 32, 24),
    Kind(12, "Q4_K", QK, 144), Kind(13, "Q5_K", QK, 176), Kind(14, "Q6_K", QK, 210),
)}
BY_NAME = {k.name: k for k in KINDS.values()}
PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as float32 [n, 1]."""
    return raw[:, at:at + 2].contiguous().view(torch.float16).float()


def _u32(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian uint32 at byte ``at`` of each block (any alignment), as int64 [n, 1]."""
    b = raw[:, at:at + 4].long()
    return b[:, 0:1] | (b[:, 1:2] << 8) | (b[:, 2:3] << 16) | (b[:, 3:4] << 24)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, m] bytes -> [n, 2m] 4-bit codes: the low nibbles first, then the high ones (ggml's 32-value blocks)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 1] int64 bit fields -> [n, 32]: bit j of each."""
    return ((qh >> torch.arange(32)) & 1).to(torch.uint8)


def _kscales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes of packed 6-bit (scale, min) pairs -> two [n, 8] tensors (ggml's get_scale_min_k4)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _pack_kscales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """The inverse of _kscales: [n, 8] 6-bit scales and mins (uint8) -> [n, 12] bytes."""
    return torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6), (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], dim=1)


def _k_low(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: 128 bytes -> [n, 256] low 4 bits; each 32-byte run holds sub-block 2c (low nibbles) and 2c + 1 (high)."""
    q = qs.view(-1, 4, 32)
    return torch.stack([q & 0x0F, q >> 4], dim=2).reshape(-1, QK)


def _k_high(qh: torch.Tensor) -> torch.Tensor:
    """Q5_K: 32 bytes -> [n, 256] fifth bits: bit j of byte i is element i of sub-block j."""
    return ((qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1).reshape(-1, QK)


def _q6_codes(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q6_K: 128 + 64 bytes -> [n, 256] codes 0..63 (ggml's dequantize_row_q6_K order)."""
    lo = (ql.view(-1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)) & 0x0F  # [n, half, nibble, 64]
    hi = (qh.view(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 0x03  # [n, half, shift, 32]
    return lo.reshape(-1, QK) | (hi.reshape(-1, QK) << 4)


def _parts(kind: Kind, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes as float32 [n, block], step [n, block] or [n, sub-blocks, 1], offset broadcastable to the values) of each
    block, so that value = step * code + offset (Q8_0/Q4_0/Q5_0/Q6_K: codes centred, offset 0)."""
    n = raw.shape[0]
    name = kind.name
    if name == "Q8_0":
        return raw[:, 2:].contiguous().view(torch.int8).float(), _f16(raw, 0), 0.0
    if name == "Q4_0":
        return _nibbles(raw[:, 2:]).float() - 8, _f16(raw, 0), 0.0
    if name == "Q4_1":
        return _nibbles(raw[:, 4:]).float(), _f16(raw, 0), _f16(raw, 2)
    if name == "Q5_0":
        return (_nibbles(raw[:, 6:]) | (_bits32(_u32(raw, 2)) << 4)).float() - 16, _f16(raw, 0), 0.0
    if name == "Q5_1":
        return (_nibbles(raw[:, 8:]) | (_bits32(_u32(raw, 4)) << 4)).float(), _f16(raw, 0), _f16(raw, 2)
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(raw, 0), _f16(raw, 2)
        sc, mn = _kscales(raw[:, 4:16])
        q = _k_low(raw[:, 16:144] if name == "Q4_K" else raw[:, 48:176])
        if name == "Q5_K":
            q = q | (_k_high(raw[:, 16:48]) << 4)
        return q.float().view(n, 8, 32), (d * sc).view(n, 8, 1), -(dmin * mn).view(n, 8, 1)
    if name == "Q6_K":
        d = _f16(raw, 208)
        sc = raw[:, 192:208].contiguous().view(torch.int8).float()
        return _q6_codes(raw[:, :128], raw[:, 128:192]).float().view(n, 16, 16) - 32, (d * sc).view(n, 16, 1), 0.0
    raise ValueError(f"no block decoder for {name}")


def decode(kind: Kind, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Whole blocks ``raw`` (uint8 [n, kind.size]) -> float32 [n, kind.block] (into ``out`` when given)."""
    if kind.plain:
        v = raw.contiguous().view(PLAIN_DTYPES[kind.name]).view(raw.shape[0], 1)
        return v.float() if out is None else out.view(v.shape).copy_(v)
    q, step, off = _parts(kind, raw)
    v = (q * step + off).view(raw.shape[0], kind.block)
    return v if out is None else out.view(v.shape).copy_(v)


def block_steps(kind: Kind, raw: torch.Tensor) -> torch.Tensor:
    """The quantization step of each block (or sub-block) of a quantized kind, float32 [n, sub-blocks], read from the scales alone."""
    name = kind.name
    if name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return _f16(raw, 0).abs()
    if name in ("Q4_K", "Q5_K"):
        return (_f16(raw, 0) * _kscales(raw[:, 4:16])[0]).abs()
    if name == "Q6_K":
        return (_f16(raw, 208) * raw[:, 192:208].contiguous().view(torch.int8).float()).abs()
    raise ValueError(f"no block steps for {name}")


def rounding_step(kind: Kind, raw: torch.Tensor) -> torch.Tensor:
    """Each value's rounding cell, float32 [n, kind.block] (plain floats: the spacing of the format at the value)."""
    n = raw.shape[0]
    if kind.plain:
        v = decode(kind, raw).abs()
        eps = torch.finfo(PLAIN_DTYPES[kind.name]).eps
        return torch.exp2(torch.floor(torch.log2(v.clamp_min(torch.finfo(PLAIN_DTYPES[kind.name]).tiny)))) * eps
    step = block_steps(kind, raw)  # [n, s]
    return step[:, :, None].expand(n, step.shape[1], kind.block // step.shape[1]).contiguous().view(n, kind.block)


# -- encoding ---------------------------------------------------------------------------------------


def _as_f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).view(x.shape[0], 2)


def _fit(x: torch.Tensor, levels: int, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` [m, k]: (scale >= 0, minimum <= 0) with x ~ scale * q + minimum, q in 0..levels: min/max start, then
    least-squares refits of both on the rounded codes (the minimum kept at or below 0, as ggml stores it negated)."""
    lo = x.amin(1).clamp(max=0.0)
    scale = (x.amax(1) - lo) / levels
    for _ in range(iters):
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round((x - lo[:, None]) * inv[:, None]).clamp_(0, levels)
        k = x.shape[1]
        sq, sqq, sx, sqx = q.sum(1), (q * q).sum(1), x.sum(1), (q * x).sum(1)
        det = k * sqq - sq * sq
        ok = det > 0
        new_scale = torch.where(ok, (k * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det)), scale)
        new_lo = torch.where(ok, (sx - new_scale * sq) / k, lo)
        bad = (new_scale <= 0) | (new_lo > 0)
        scale, lo = torch.where(bad, scale, new_scale), torch.where(bad, lo, new_lo)
    return scale, lo


def _encode_k(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Q4_K (bits 4) / Q5_K (bits 5) of x [n, 256]."""
    n = x.shape[0]
    levels = (1 << bits) - 1
    sub = x.view(n * 8, 32)
    scale, lo = _fit(sub, levels)
    scale, mins = scale.view(n, 8), (-lo).view(n, 8)
    d = _as_f16(scale.amax(1) / 63)
    dmin = _as_f16(mins.amax(1) / 63)
    sc = torch.where(d[:, None] > 0, torch.round(scale / torch.where(d > 0, d, 1)[:, None]), 0).clamp(0, 63)
    mn = torch.where(dmin[:, None] > 0, torch.round(mins / torch.where(dmin > 0, dmin, 1)[:, None]), 0).clamp(0, 63)
    step, off = d[:, None] * sc, dmin[:, None] * mn  # the scales as stored
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    q = torch.round((x.view(n, 8, 32) + off[..., None]) * inv[..., None]).clamp_(0, levels).to(torch.uint8)  # [n, 8, 32]
    low = (q & 0x0F).view(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    head = [_f16_bytes(d), _f16_bytes(dmin), _pack_kscales(sc.to(torch.uint8), mn.to(torch.uint8))]
    if bits == 5:
        hb = (q >> 4).view(n, 8, 32)  # bit j of byte i: element i of sub-block j
        qh = (hb << torch.arange(8, dtype=torch.uint8)[None, :, None]).sum(1, dtype=torch.int32).to(torch.uint8)
        head.append(qh)
    return torch.cat(head + [qs], dim=1)


def _encode_q6k(x: torch.Tensor) -> torch.Tensor:
    """Q6_K of x [n, 256]: 16 sub-blocks of 16 with a signed 8-bit scale each, codes -32..31."""
    n = x.shape[0]
    sub = x.view(n, 16, 16)
    idx = sub.abs().argmax(2, keepdim=True)
    scale = torch.gather(sub, 2, idx).squeeze(2) / -32  # the largest magnitude lands on -32, as ggml's make_qx_quants starts
    d = _as_f16(scale.abs().amax(1) / 127)
    sc = torch.where(d[:, None] > 0, torch.round(scale / torch.where(d > 0, d, 1)[:, None]), 0).clamp(-128, 127)
    step = d[:, None] * sc
    inv = torch.where(step != 0, 1.0 / step, torch.zeros_like(step))
    q = (torch.round(sub * inv[..., None]).clamp_(-32, 31) + 32).to(torch.uint8).view(n, 2, 2, 2, 32)  # [n, half, nibble, 2, 32]
    lo = (q & 0x0F).view(n, 2, 2, 64)
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
    hi = (q >> 4).view(n, 2, 4, 32)  # element h*128 + s*32 + b -> byte h*32 + b, bits 2s..2s+1
    qh = (hi << (2 * torch.arange(4, dtype=torch.uint8))[None, None, :, None]).sum(2, dtype=torch.int32).to(torch.uint8).reshape(n, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=1)


def _encode_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 of x [n, 32] in torch, the same float32 operations as gguf-py's (and ggml's reference) quantizer: d = amax / 127,
    codes rounded half away from zero (tested byte for byte against gguf-py); 10x faster than its numpy."""
    d = x.abs().amax(1, keepdim=True) / 127
    v = x * torch.where(d == 0, torch.zeros_like(d), 1 / d)
    a = v.abs()
    fl = a.floor()
    q = (torch.sign(v) * (fl + (2 * (a - fl)).floor())).to(torch.int8)
    return torch.cat([_f16_bytes(d.view(-1)), q.view(torch.uint8)], dim=1)


def encode(kind: Kind, x: torch.Tensor) -> torch.Tensor:
    """float32 [n, kind.block] -> the blocks as stored (uint8 [n, kind.size])."""
    x = x.float().contiguous()
    if kind.plain:
        return x.to(PLAIN_DTYPES[kind.name]).view(torch.uint8).view(x.shape[0], kind.size)
    if kind.name == "Q8_0":
        return _encode_q8_0(x)
    if kind.name in ("Q4_K", "Q5_K"):
        return _encode_k(x, 4 if kind.name == "Q4_K" else 5)
    if kind.name == "Q6_K":
        return _encode_q6k(x)
    from gguf.quants import quantize  # gguf-py's reference quantizers of the 32-value types

    from gguf import GGMLQuantizationType

    return torch.from_numpy(np.ascontiguousarray(quantize(x.numpy(), GGMLQuantizationType(kind.id)))).view(x.shape[0], kind.size)


def quantize_rows(kind: Kind, rows: torch.Tensor) -> torch.Tensor:
    """float [m, k] (k a multiple of the block) -> uint8 [m, k / block * size]: the rows as a GGUF tensor of this kind stores them."""
    m, k = rows.shape
    return encode(kind, rows.reshape(-1, kind.block)).view(m, k // kind.block * kind.size)


def dequantize_rows(kind: Kind, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [m, k / block * size] -> float32 [m, k]."""
    m = raw.shape[0]
    v = decode(kind, raw.reshape(-1, kind.size), None if out is None else out.view(-1))
    return v.view(m, -1)


def unpermute_order(rows: int, n_head: int) -> torch.Tensor:
    """Where each Hugging Face row of a llama-style q/k projection sits in the GGUF tensor: llama.cpp's converter
    (``LlamaModel.permute``) stores rows h*hd + j*hd/2 + i (head h, half j, index i) at h*hd + 2i + j, pairing the
    halves that rotary embedding rotates together. [rows] int64: GGUF row of each Hugging Face row."""
    hd = rows // n_head
    h, rest = torch.arange(rows).div(hd, rounding_mode="floor"), torch.arange(rows) % hd
    j, i = rest.div(hd // 2, rounding_mode="floor"), rest % (hd // 2)
    return h * hd + 2 * i + j


class GGUFBlocks:
    """One GGUF tensor (or one expert's slice of a stacked one) read lazily as the Hugging Face tensor it stands for.

    ``raw``: its bytes (uint8, usually a read-only mapping of the file); ``shape``: the Hugging Face shape (the GGUF
    dims reversed); ``order``: for the q/k projections of llama-style converters, the GGUF row of each Hugging Face
    row (``unpermute_order``; along the only axis of a 1-D bias). Gives what checks/pair_stats.py reads of a lazy
    tensor: rows of the [N, last] view as float32, each value's rounding variance, and what re-quantizing float rows
    into the same type gives back.
    """

    method = "gguf"
    row_align = 1  # every row is whole blocks

    def __init__(self, raw: torch.Tensor, kind: Kind, shape: tuple[int, ...], order: torch.Tensor | None = None):
        self.raw, self.kind, self.shape = raw, kind, tuple(shape)
        self.last = self.shape[-1] if self.shape else 1
        self.n = max(1, self.numel() // max(self.last, 1))
        self.row_bytes = self.last // kind.block * kind.size
        self.order = order
        self.along_last = order is not None and len(self.shape) == 1  # a permuted bias: its elements move, not its rows

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return (self.raw,)

    def _raw_rows(self, r0: int, r1: int) -> torch.Tensor:
        if self.order is not None and not self.along_last:
            return self.raw.view(self.n, self.row_bytes).index_select(0, self.order[r0:r1])
        return self.raw[r0 * self.row_bytes:r1 * self.row_bytes].view(r1 - r0, self.row_bytes)

    def _fix_last(self, v: torch.Tensor) -> torch.Tensor:
        return v.index_select(1, self.order) if self.along_last else v

    def rows(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows r0..r1 of the [N, last] view as float32 in ``out``; returns [r1 - r0, last]."""
        o = out.reshape(-1)[:(r1 - r0) * self.last].view(r1 - r0, self.last)
        v = dequantize_rows(self.kind, self._raw_rows(r0, r1), None if self.along_last else o)
        if self.along_last:
            o.copy_(self._fix_last(v))
        return o

    def rounding_var(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Each value's expected squared rounding error, step^2 / 12, for rows r0..r1."""
        o = out.reshape(-1)[:(r1 - r0) * self.last].view(r1 - r0, self.last)
        step = rounding_step(self.kind, self._raw_rows(r0, r1).reshape(-1, self.kind.size)).reshape(r1 - r0, self.last)
        o.copy_(self._fix_last(step.square() / 12))
        return o

    def requantized_rows(self, r0: int, r1: int, x: torch.Tensor) -> torch.Tensor:
        """What storing float32 rows ``x`` ([rows, last]) in this type gives back (a value per element, float32)."""
        if self.along_last:  # quantize in the file's order, give back in ours
            inv = torch.empty_like(self.order)
            inv[self.order] = torch.arange(self.order.numel())
            y = dequantize_rows(self.kind, quantize_rows(self.kind, x.index_select(1, inv)))
            return y.index_select(1, self.order)
        return dequantize_rows(self.kind, quantize_rows(self.kind, x))

    def noise_sq(self, elems: int = 1 << 20) -> float:
        """The sum of every value's rounding variance: the expected ||Q(W) - W||^2 of storing W in this type (read ``elems`` at a time)."""
        rows = max(1, elems // max(self.last, 1))
        total, buf = 0.0, torch.empty(min(self.n, rows) * self.last)
        for r0 in range(0, self.n, rows):
            r1 = min(self.n, r0 + rows)
            if self.kind.plain:
                total += float(self.rounding_var(r0, r1, buf).sum(dtype=torch.float64))
            else:  # from the scales alone: each (sub-)block's values share its step
                steps = block_steps(self.kind, self._raw_rows(r0, r1).reshape(-1, self.kind.size))
                total += float(steps.double().square().sum()) * (self.kind.block // steps.shape[1]) / 12
        return total

    def dequantize(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.float32)
        if out.numel():
            self.rows(0, self.n, out.view(-1))
        return out


def gguf_source(kind_id: int, heads: int, raw: torch.Tensor, shape: tuple[int, ...]) -> GGUFBlocks:
    """The lazy reader of a GGUF tensor (audit/model/gguf_file.py places it: its type, and the heads its q/k rows were permuted with)."""
    return GGUFBlocks(raw, KINDS[kind_id], shape, unpermute_order(shape[0], heads) if heads else None)
