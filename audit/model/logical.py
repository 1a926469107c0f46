"""A model directory's tensors as the model holds them: a quantized weight and its scales read as one float tensor.

config.json's ``quantization_config`` says the format (audit/model/quant.py has the arithmetic):

- ``quant_method: fp8`` (transformers' FineGrainedFP8Config; DeepSeek-V3, Kimi-K2, Qwen3-FP8, GLM-4.5-FP8):
  each ``X.weight`` in float8 with its ``X.weight_scale_inv`` (fused experts: ``X`` with ``X_scale_inv``) is one
  logical tensor ``X.weight`` of the weight's shape; the block size is ``weight_block_size`` (null: one scale per
  tensor).
- ``quant_method: mxfp4`` (gpt-oss): ``X_blocks`` with ``X_scales`` is one logical tensor ``X`` of shape
  [E, 32 G, R], the layout of the unquantized checkpoint.

Everything else is plain and stays as stored. The table is checked before anything is read: a scale without its
weight, a quantized weight without its scale, a scale of the wrong shape or dtype raise AuditError naming the
tensor; an unsupported method (GPTQ, AWQ, bitsandbytes, compressed-tensors, ...) raises one that says what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from audit.model.gguf_quant import gguf_source
from audit.model.quant import FP8_DTYPES, MXFP4, MXFP4_BLOCK, SCALE_TAGS, BlockFP8
from checks.errors import AuditError

SUPPORTED = ("fp8", "mxfp4")
FP8_SCALE = "_scale_inv"  # X.weight -> X.weight_scale_inv; fused X -> X_scale_inv (transformers' Fp8Quantize naming)
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
TRANSFORMERS_FP8_SHAPES_NOTE = ("transformers 5 dequantizes FP8 on CPU with a block size derived from the scale grid "
                                "(rows // scale rows), which is wrong where a dimension is not a multiple of the block")


@dataclass(frozen=True)
class QuantSpec:
    """The checkpoint's quantization, as config.json's quantization_config says."""

    method: str  # fp8 / mxfp4
    block: tuple[int, int] | None = None  # fp8 weight_block_size; None: one scale per tensor
    config: dict | None = None  # quantization_config as stored

    def label(self, fp8_tag: str = "F8_E4M3") -> str:
        """The format as results and reports name it, e.g. 'FP8 E4M3, 128x128 blocks'."""
        if self.method == "mxfp4":
            return "MXFP4 (e2m1, 32-value blocks)"
        kind = "FP8 " + fp8_tag.split("_")[-1]
        return f"{kind}, {self.block[0]}x{self.block[1]} blocks" if self.block else f"{kind}, one scale per tensor"

    def to_dict(self) -> dict:
        return {"method": self.method, "block": list(self.block) if self.block else None, "label": self.label()}


@dataclass(frozen=True)
class LogicalTensor:
    """One tensor as the model holds it, and the stored tensors it is read from (the first is the data)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the safetensors tag of a plain tensor, else the format's label
    parts: tuple  # model_dir.TensorInfo: (data,), (weight, scale_inv), (blocks, scales)
    method: str | None = None  # None (plain), fp8, mxfp4, gguf
    block: tuple[int, int] | None = None
    detail: tuple = ()  # gguf: (ggml type id, heads its q/k rows were permuted with or 0) (audit/model/gguf_file.py)

    @property
    def quantized(self) -> bool:
        return self.method is not None

    @property
    def shard(self) -> str:
        return self.parts[0].shard

    @property
    def begin(self) -> int:
        return self.parts[0].begin

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def numel(self) -> int:
        return math.prod(self.shape)


def quant_spec(config: dict, source) -> QuantSpec | None:
    """The quantization config.json declares (None: not quantized); AuditError for a method the audit cannot read."""
    qc = config.get("quantization_config")
    if qc is None:
        tc = config.get("text_config")
        qc = tc.get("quantization_config") if isinstance(tc, dict) else None
    if qc is None:
        return None
    if not isinstance(qc, dict) or not isinstance(qc.get("quant_method"), str):
        raise AuditError(f"{source}/config.json: quantization_config has no quant_method; restore it from the original config.json")
    method = qc["quant_method"].lower()
    if method not in SUPPORTED:
        raise AuditError(
            f"{source}/config.json: quantization_config.quant_method is {qc['quant_method']!r}; the audit reads block-scaled FP8 "
            "(quant_method fp8) and MXFP4 (mxfp4) checkpoints only. Dequantize this one first (load it with transformers and "
            "save_pretrained in bfloat16), or audit the unquantized original")
    block = None
    if method == "fp8":
        wb = qc.get("weight_block_size", (128, 128))
        if wb is not None:
            if not (isinstance(wb, (list, tuple)) and len(wb) == 2 and all(isinstance(b, int) and b > 0 for b in wb)):
                raise AuditError(f"{source}/config.json: quantization_config.weight_block_size must be two positive integers, got {wb!r}")
            block = (int(wb[0]), int(wb[1]))
    return QuantSpec(method, block, qc)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def logical_tensors(md) -> dict[str, LogicalTensor]:
    """The directory's tensors as the model holds them (``md``: audit.model.directory.ModelDir), checked; see the module docstring."""
    spec = quant_spec(md.config, md.path)
    tensors = md.tensors
    out: dict[str, LogicalTensor] = {}
    used: set[str] = set()
    where = md.path

    def fail(msg: str):
        raise AuditError(f"{where}: {msg}")

    if spec is not None and spec.method == "fp8":
        for sname, sinfo in tensors.items():
            if not sname.endswith(FP8_SCALE):
                continue
            wname = sname[: -len(FP8_SCALE)]
            winfo = tensors.get(wname)
            if winfo is None:
                fail(f"{sname} is an FP8 block scale, but its weight {wname} is in no shard; re-download the shard that holds it")
            if winfo.dtype not in FP8_DTYPES:
                fail(f"{wname} is stored as {winfo.dtype}, but {sname} says it is an FP8 weight (quantization_config.quant_method fp8); "
                     "restore the original shard")
            if sinfo.dtype not in SCALE_TAGS:
                fail(f"{sname} is stored as {sinfo.dtype}; an FP8 block scale is F32, BF16, F16 or E8M0 -- restore the original shard")
            if len(winfo.shape) < 2:
                fail(f"{wname} has shape {winfo.shape}; a block-scaled FP8 weight has at least two dimensions")
            R, C = winfo.shape[-2:]
            if spec.block is None:
                want = (*winfo.shape[:-2], 1, 1)
                ok = math.prod(sinfo.shape) == math.prod(want)
            else:
                want = (*winfo.shape[:-2], _ceil(R, spec.block[0]), _ceil(C, spec.block[1]))
                ok = tuple(sinfo.shape) == want
            if not ok:
                blk = f"{spec.block[0]}x{spec.block[1]} blocks" if spec.block else "one scale per matrix"
                fail(f"{sname} has shape {tuple(sinfo.shape)}, but {wname} {tuple(winfo.shape)} in {blk} (config.json's "
                     f"quantization_config.weight_block_size) needs {want}; the scale or the config does not belong to this weight")
            out[wname] = LogicalTensor(wname, tuple(winfo.shape), spec.label(winfo.dtype), (winfo, sinfo), "fp8", spec.block)
            used.update((wname, sname))
        for name, info in tensors.items():
            if info.dtype in FP8_DTYPES and name not in used:
                fail(f"{name} is stored as {info.dtype} but has no {name + FP8_SCALE}; an FP8 weight needs its block scale "
                     "-- re-download the shard that holds it")
    elif spec is not None and spec.method == "mxfp4":
        for bname, binfo in tensors.items():
            if not bname.endswith(MX_BLOCKS):
                continue
            lname = bname[: -len(MX_BLOCKS)]
            sname = lname + MX_SCALES
            sinfo = tensors.get(sname)
            if sinfo is None:
                fail(f"{bname} holds MXFP4 blocks, but its scales {sname} are in no shard; re-download the shard that holds them")
            if binfo.dtype != "U8" or sinfo.dtype != "U8":
                fail(f"{bname} / {sname} are stored as {binfo.dtype} / {sinfo.dtype}; MXFP4 blocks and scales are U8 -- restore the original shards")
            if len(binfo.shape) != 4 or binfo.shape[-1] != MXFP4_BLOCK // 2:
                fail(f"{bname} has shape {tuple(binfo.shape)}; gpt-oss MXFP4 blocks are [experts, rows, groups, 16]")
            if tuple(sinfo.shape) != tuple(binfo.shape[:-1]):
                fail(f"{sname} has shape {tuple(sinfo.shape)}, but {bname} {tuple(binfo.shape)} needs {tuple(binfo.shape[:-1])} "
                     "(one exponent per 32-value block)")
            E, R, G = binfo.shape[:3]
            out[lname] = LogicalTensor(lname, (E, G * MXFP4_BLOCK, R), spec.label(), (binfo, sinfo), "mxfp4")
            used.update((bname, sname))
        for name in tensors:
            if name.endswith(MX_SCALES) and name not in used and (name[: -len(MX_SCALES)] + MX_BLOCKS) not in tensors:
                if tensors[name].dtype == "U8":
                    fail(f"{name} holds MXFP4 scales, but its blocks {name[: -len(MX_SCALES)] + MX_BLOCKS} are in no shard; re-download it")
    else:
        for name, info in tensors.items():
            if name.endswith(FP8_SCALE) and name[: -len(FP8_SCALE)] in tensors and tensors[name[: -len(FP8_SCALE)]].dtype in FP8_DTYPES:
                fail(f"{name} is an FP8 block scale, but config.json has no quantization_config; restore it from the original "
                     "config.json (quant_method fp8 and its weight_block_size)")
            if name.endswith(MX_BLOCKS) and info.dtype == "U8" and (name[: -len(MX_BLOCKS)] + MX_SCALES) in tensors:
                fail(f"{name} holds MXFP4 blocks, but config.json has no quantization_config; restore it from the original "
                     "config.json (quant_method mxfp4)")
    for name, info in tensors.items():
        if name not in used:
            out[name] = LogicalTensor(name, tuple(info.shape), info.dtype, (info,))
    return dict(sorted(out.items(), key=lambda kv: (kv[1].shard, kv[1].begin)))


def source(lt: LogicalTensor, mapped: dict[str, torch.Tensor]):
    """The tensor to compute with: the mapped tensor itself (plain), or its lazy float32 reader (audit/model/quant.py)."""
    if lt.method is None:
        return mapped[lt.parts[0].name]
    if lt.method == "gguf":
        return gguf_source(*lt.detail, mapped[lt.parts[0].name], lt.shape)
    a, b = (mapped[p.name] for p in lt.parts)
    return BlockFP8(a, b, lt.block) if lt.method == "fp8" else MXFP4(a, b)


def transformers_misreads(md) -> list[str]:
    """FP8 weights whose dimensions are not whole blocks where the scale grid has several: transformers 5.24's CPU
    dequantization (``Fp8Dequantize._dequantize_one``) takes rows // scale_rows as the block and so misreads or refuses them."""
    bad = []
    for lt in md.logical.values():
        if lt.method == "fp8" and lt.block is not None:
            (R, C), (bm, bn) = lt.shape[-2:], lt.block
            if (R % bm and _ceil(R, bm) > 1) or (C % bn and _ceil(C, bn) > 1):
                bad.append(lt.name)
    return bad


def summary(md) -> dict | None:
    """What `audit inspect` shows: the format and how many weights it covers (None: not quantized)."""
    spec = quant_spec(md.config, md.path)
    if spec is None:
        return None
    q = [lt for lt in md.logical.values() if lt.quantized]
    return {**spec.to_dict(), "labels": sorted({lt.dtype for lt in q}), "quantized_tensors": len(q),
            "stored_tensors": sum(len(lt.parts) for lt in q), "plain_tensors": sum(not lt.quantized for lt in md.logical.values())}


def row_pieces(t, elems: int = 1 << 18, align: int = 1):
    """(r0, r1, float32 [rows, last]) over the [N, last] view of a plain or lazy tensor, a few hundred thousand elements at a
    time, in steps of a multiple of ``align`` rows (and of a lazy tensor's ``row_align``): two tensors given the same
    ``align`` (the larger of theirs) come in the same pieces. A lazy tensor's piece is valid until the next one (one buffer)."""
    shape = tuple(t.shape)
    last = shape[-1] if shape else 1
    n = math.prod(shape) // max(last, 1)
    al = max(1, align, getattr(t, "row_align", 1))
    step = max(al, max(1, elems // max(last, 1)) // al * al)
    if isinstance(t, torch.Tensor):
        flat = t.reshape(n, last)
        for r0 in range(0, n, step):
            yield r0, min(n, r0 + step), flat[r0:r0 + step].float()
        return
    buf = torch.empty(step * last)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        yield r0, r1, t.rows(r0, r1, buf)


def recast_equal(base, ablated: torch.Tensor) -> bool:
    """Whether the plain ``ablated`` holds exactly the quantized ``base``'s values cast to its dtype (a dequantized copy, not an edit)."""
    flat = ablated.reshape(-1, ablated.shape[-1] if ablated.ndim else 1)
    for r0, r1, rows in row_pieces(base):
        if not torch.equal(rows.to(ablated.dtype).view(-1).view(torch.uint8), flat[r0:r1].reshape(-1).view(torch.uint8)):
            return False
    return True


