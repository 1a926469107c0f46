"""Writing quantized checkpoints: our quantizer, and the two outputs of an ablation of a quantized base.

- ``quantize_model``: a model directory quantized the way published checkpoints are -- block-scaled FP8
  (every linear weight of the decoder layers, the routers kept plain, as DeepSeek-V3 / Qwen3-FP8 store
  them; ``weight_scale_inv`` per block, transformers' naming and arithmetic) or gpt-oss MXFP4 (the fused
  experts) -- with the ``quantization_config`` transformers loads. Tests and benchmarks build their
  quantized models with it, and ``audit`` reads what it writes.
- ``QuantEdit``: one planned edit of a quantized weight, for ``audit ablate --keep-quantization``: the
  stored tensors read into memory, dequantized, edited and re-quantized with recomputed scales slab by
  slab (memory: the stored tensor plus one float32 slab); their bytes replace the originals in place.
- ``write_dequantized``: the default output of an ablation of a quantized base: every shard rewritten
  with the quantized weights stored plain in ``dtype`` (bfloat16 by default), their scale tensors
  dropped, the planned edits applied in float32 and cast once, plain tensors copied byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import torch

from audit.ablation.edit import _part_view, edit_inplace
from audit.model.directory import ModelDir, copy_side_files
from audit.model.logical import LogicalTensor, quant_spec, row_pieces, source
from audit.model.quant import MXFP4_BLOCK, quantize_fp8, quantize_mxfp4
from audit.model.reader import map_tensors, pread_into
from audit.model.shards import DTYPES, INDEX_NAME, TAG_OF, write_index
from audit.outputs import OutputDir
from checks.errors import AuditError

OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SLAB_ELEMENTS = 1 << 22  # float32 work per slab of an edited quantized weight: 16 MiB
PLAIN_FP8 = ("router", "embed", "lm_head", "norm", "mtp", "vision")  # components FP8 checkpoints keep plain
GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


# -- streamed shards ----------------------------------------------------------------------------


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _bytes(t: torch.Tensor):
    return t.contiguous().view(torch.uint8).reshape(-1).numpy() if t.numel() else b""


def stream_shard(path: Path, entries: list[tuple[str, torch.dtype, tuple, Callable[[int, int], None]]], metadata: dict | None = None) -> dict:
    """Write one .safetensors file header first, then each entry's data by its ``fill(fd, offset)`` (which writes exactly
    its numel x itemsize bytes there), so no tensor is held longer than its own writing takes. Returns {name: bytes}."""
    header, sizes, offset = {}, {}, 0
    for name, dtype, shape, _ in entries:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": TAG_OF[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes[name] = n
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    start = 8 + len(hb)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, struct.pack("<Q", len(hb)) + hb, 0)
        for name, _, _, fill in entries:
            fill(fd, start + header[name]["data_offsets"][0])
        os.ftruncate(fd, start + offset)
    finally:
        os.close(fd)
    if path.stat().st_size != start + offset:
        raise AuditError(f"{path}: wrote {path.stat().st_size} bytes, the header needs {start + offset}")
    return sizes


def _writer(t_fn: Callable[[], torch.Tensor]) -> Callable[[int, int], None]:
    return lambda fd, off: _pwrite_all(fd, _bytes(t_fn()), off)


# -- our quantizer --------------------------------------------------------------------------------


def fp8_targets(md: ModelDir) -> list[str]:
    """The weights a block-scaled FP8 checkpoint stores in FP8: the linear weights of the decoder layers (attention,
    dense MLPs, routed and shared experts, fused or not); routers, embeddings, lm_head, norms and biases stay plain."""
    out = []
    for key, role in md.layout.roles.items():
        shape = md.logical[key].shape
        if role.component in PLAIN_FP8 or role.is_bias or role.quantized or len(shape) < 2 or role.projection in ("shared_gate",):
            continue
        if md.logical[key].dtype not in ("F32", "BF16", "F16"):
            continue
        out.append(key)
    return out


def mxfp4_targets(md: ModelDir) -> list[str]:
    """gpt-oss's MXFP4 tensors: the fused experts' gate_up_proj and down_proj ([E, in, out], in a multiple of 32)."""
    if md.layout.family != "gpt_oss":
        raise AuditError(f"{md.path}: MXFP4 as transformers reads it is gpt-oss's format (fused experts); this is a {md.layout.family} model")
    keys = [k for k, r in md.layout.roles.items() if r.component == "experts" and not r.is_bias and len(md.logical[k].shape) == 3]
    for k in keys:
        if md.logical[k].shape[1] % MXFP4_BLOCK:
            raise AuditError(f"{md.path}: {k} has shape {md.logical[k].shape}; MXFP4 needs its input axis (1) to be a multiple of {MXFP4_BLOCK}")
    return keys


def _module(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, method: str = "fp8", block: tuple[int, int] | None = (128, 128),
                   scale_fmt: str = "float", force: bool = False) -> Path:
    """Write ``src`` quantized into ``dst`` (block-scaled FP8, or gpt-oss MXFP4), tensor by tensor, shards as in ``src``.

    FP8: q = fp8(w * 448 / amax) per block, ``weight_scale_inv`` = amax / 448 in float32 (``scale_fmt`` "ue8m0": E8M0
    powers of two), transformers' own Fp8Quantize arithmetic; config.json gets ``quant_method: fp8`` with the block
    size and ``modules_to_not_convert`` naming the plain linear weights. MXFP4: see audit.model.quant.quantize_mxfp4.
    """
    md = ModelDir(src)
    if quant_spec(md.config, md.path) is not None:
        raise AuditError(f"{md.path}: is already quantized; quantize its unquantized original")
    if method not in ("fp8", "mxfp4"):
        raise AuditError(f"quantize method {method!r} unknown; use fp8 or mxfp4")
    targets = set(fp8_targets(md) if method == "fp8" else mxfp4_targets(md))
    scale_dtype = torch.uint8 if scale_fmt == "ue8m0" else torch.float32
    weight_map: dict[str, str] = {}
    total = 0
    with OutputDir(dst, inputs=[md.path], force=force) as od:
        for shard in md.shards:
            entries = []
            for info in sorted((i for i in md.tensors.values() if i.shard == shard), key=lambda i: i.begin):
                name = info.name
                if name not in targets:
                    entries.append((name, _dtype(info.dtype), info.shape, _writer(lambda n=name: md.tensor(n))))
                    continue
                if method == "fp8":
                    R, C = info.shape[-2:]
                    bm, bn = block if block else (R, C)
                    sshape = (*info.shape[:-2], -(-R // bm), -(-C // bn))
                    cache: dict = {}

                    def q_of(n=name, c=cache):  # the weight's entry quantizes, the scale's takes what it left
                        if not c:
                            c["q"], c["s"] = quantize_fp8(md.tensor(n).float(), block, scale_dtype=scale_dtype)
                        return c

                    entries.append((name, torch.float8_e4m3fn, info.shape, _writer(lambda c=q_of: c().pop("q"))))
                    entries.append((name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv",
                                    scale_dtype, sshape, _writer(lambda c=q_of: c().pop("s"))))
                else:
                    E, K, R = info.shape
                    cache = {}

                    def mx_of(n=name, c=cache):
                        if not c:
                            c["b"], c["s"] = quantize_mxfp4(md.tensor(n).float().transpose(1, 2))
                        return c

                    entries.append((name + "_blocks", torch.uint8, (E, R, K // MXFP4_BLOCK, MXFP4_BLOCK // 2), _writer(lambda c=mx_of: c().pop("b"))))
                    entries.append((name + "_scales", torch.uint8, (E, R, K // MXFP4_BLOCK), _writer(lambda c=mx_of: c().pop("s"))))
            sizes = stream_shard(od.tmp / shard, entries, {"format": "pt"})
            for n, size in sizes.items():
                weight_map[n] = shard
                total += size
        copy_side_files(md.path, od.tmp)
        if (md.path / "prompts").is_dir():  # a model directory's own prompt sets (audit run reads them; organisms have them)
            shutil.copytree(md.path / "prompts", od.tmp / "prompts")
        if len(md.shards) > 1 or (md.path / INDEX_NAME).is_file():
            write_index(od.tmp, weight_map, total)
        cfg = dict(md.config)
        if method == "fp8":
            plain_linear = sorted(_module(k) for k, r in md.layout.roles.items()
                                  if k.endswith(".weight") and len(md.logical[k].shape) == 2 and k not in targets and not r.is_bias
                                  and r.component not in ("norm",) and r.projection not in ("qk_norm", "latent_norm", "norm"))
            qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                  "weight_block_size": list(block) if block else None, "modules_to_not_convert": plain_linear}
            if scale_fmt == "ue8m0":
                qc["scale_fmt"] = "ue8m0"
        else:
            qc = {"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_NOT_CONVERTED}
        cfg["quantization_config"] = qc
        (od.tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        out = od.commit()
    md.close()
    return out


def _dtype(tag: str) -> torch.dtype:
    return DTYPES[tag][0]


# -- ablation of a quantized base ---------------------------------------------------------------


def _read_parts(md: ModelDir, lt: LogicalTensor) -> dict[str, torch.Tensor]:
    """The stored tensors of ``lt`` read into fresh (writable) buffers."""
    out = {}
    for p in lt.parts:
        fd = os.open(md.path / p.shard, os.O_RDONLY)
        try:
            raw = pread_into(fd, torch.empty(p.nbytes, dtype=torch.uint8), p.begin, md.path / p.shard)
        finally:
            os.close(fd)
        out[p.name] = raw.view(_dtype(p.dtype)).reshape(p.shape)
    return out


def edit_quantized(qt, edit, out: torch.Tensor | None = None) -> tuple[float, float]:
    """Apply ``edit`` (audit.intent.config.PlannedEdit) to the quantized ``qt`` slab by slab along its first non-residual
    axis (whole blocks), in float32: re-quantized in place with recomputed scales (``out`` None), or cast once into the
    plain ``out`` of the tensor's logical shape. Returns ||along r|| before, and after as stored."""
    shape = tuple(qt.shape)
    ax_r = edit.role.resid_axis
    ax = next(a for a in range(len(shape)) if a != ax_r)
    al = qt.slab_align(ax)
    per = max(1, math.prod(shape) // max(shape[ax], 1))
    step = max(al, SLAB_ELEMENTS // per // al * al)
    r = edit.direction.to(torch.float32)
    before2 = after2 = 0.0
    for a in range(0, shape[ax], step):
        b = min(shape[ax], a + step)
        w = qt.slab(ax, a, b)
        before, _ = edit_inplace(w, edit)
        before2 += before * before
        if out is None:
            qt.requantize(ax, a, b, w)
            stored = qt.slab(ax, a, b)
        else:
            dst = out.narrow(ax, a, b - a)
            dst.copy_(w)  # the one cast
            stored = dst.float()
        after2 += float(torch.tensordot(_part_view(stored, edit), r, dims=([ax_r], [0])).double().pow(2).sum())
    return before2 ** 0.5, after2 ** 0.5


class QuantEdit:
    """One edit of a quantized weight for ``--keep-quantization``: computed on first request, its stored tensors' new bytes
    handed out part by part (they may lie in different shards), results[key] = (before, after, seconds)."""

    def __init__(self, md: ModelDir, lt: LogicalTensor, edit, results: dict):
        self.md, self.lt, self.edit, self.results = md, lt, edit, results
        self._parts: dict[str, torch.Tensor] | None = None

    def part_bytes(self, name: str):
        if self._parts is None:
            t0 = time.perf_counter()
            parts = _read_parts(self.md, self.lt)
            qt = source(self.lt, parts)
            before, after = edit_quantized(qt, self.edit)
            self.results[self.lt.name] = (before, after, time.perf_counter() - t0)
            self._parts = {p.name: _bytes(parts[p.name]) for p in self.lt.parts}
        return self._parts.pop(name)  # each part is asked for once: its bytes go as soon as they are written


def _copy(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> None:
    """n bytes from src_off of src to dst_off of dst (kernel-side where possible)."""
    done = 0
    while done < n:
        k = 0
        try:
            k = os.copy_file_range(src_fd, dst_fd, min(n - done, 1 << 30), src_off + done, dst_off + done)
        except (AttributeError, OSError):
            k = 0
        if k <= 0:
            while done < n:
                buf = os.pread(src_fd, min(n - done, 1 << 26), src_off + done)
                if not buf:
                    raise AuditError(f"unexpected end of file while copying at byte {src_off + done}")
                _pwrite_all(dst_fd, buf, dst_off + done)
                done += len(buf)
            return
        done += k


def write_dequantized(md: ModelDir, folder: Path, edits: dict, dtype: torch.dtype, results: dict, bar=None) -> tuple[dict[str, str], int]:
    """Every shard of ``md`` into ``folder`` (same names) with its quantized weights stored plain in ``dtype`` and ``edits``
    ({logical key: PlannedEdit}) applied; returns (weight_map, total bytes) for the index."""
    weight_map: dict[str, str] = {}
    total = 0
    by_shard: dict[str, list[LogicalTensor]] = {}
    for lt in md.logical.values():
        by_shard.setdefault(lt.shard, []).append(lt)
    fds: dict = {}
    try:
        for shard in md.shards:
            lts = sorted(by_shard.get(shard, []), key=lambda t: t.begin)
            entries = []
            for lt in lts:
                out_dtype = dtype if lt.quantized else _dtype(lt.dtype)
                entries.append((lt.name, out_dtype, lt.shape, _dequantized_fill(md, lt, edits.get(lt.name), out_dtype, results, fds, bar)))
            for n, size in stream_shard(folder / shard, entries, {"format": "pt"}).items():
                weight_map[n] = shard
                total += size
    finally:
        for fd in fds.values():
            os.close(fd)
    return weight_map, total


def _dequantized_fill(md, lt: LogicalTensor, edit, out_dtype, results, fds, bar):
    def fill(fd: int, off: int) -> None:
        t0 = time.perf_counter()
        if not lt.quantized and edit is None:  # plain and untouched: its bytes, copied
            p = lt.parts[0]
            src = fds.get((md.path, p.shard)) or fds.setdefault((md.path, p.shard), os.open(md.path / p.shard, os.O_RDONLY))
            _copy(src, p.begin, fd, off, p.nbytes)
        elif not lt.quantized:
            t = _read_parts(md, lt)[lt.name]
            before, after = edit_inplace(t, edit)
            _pwrite_all(fd, _bytes(t), off)
            results[lt.name] = (before, after, time.perf_counter() - t0)
        elif edit is None:  # quantized, untouched: dequantized piece by piece, cast once
            qt = source(lt, map_tensors(md, list(lt.parts), fds))
            pos = off
            for _, _, rows in row_pieces(qt):
                data = _bytes(rows.to(out_dtype))
                _pwrite_all(fd, data, pos)
                pos += len(data)
        else:
            qt = source(lt, map_tensors(md, list(lt.parts), fds))
            out = torch.empty(lt.shape, dtype=out_dtype)
            before, after = edit_quantized(qt, edit, out)
            _pwrite_all(fd, _bytes(out), off)
            results[lt.name] = (before, after, time.perf_counter() - t0)
        if bar is not None:
            bar.update(lt.nbytes)

    return fill


def dequantized_config(config: dict, dtype: str) -> dict:
    """config.json for a dequantized copy: no quantization_config (top level or text_config), the model dtype ``dtype``."""
    cfg = json.loads(json.dumps(config))
    cfg.pop("quantization_config", None)
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"].pop("quantization_config", None)
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = dtype
    return cfg


