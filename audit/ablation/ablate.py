"""The suite's own ablation: stream a checkpoint tensor by tensor, orthogonalize the planned tensors, write OUT.

An edit never changes a tensor's shape or dtype, so a rewritten shard keeps its header byte for
byte: untouched byte ranges are copied by the kernel (copy_file_range), edited tensors are written
at their original offsets. Shards without edits are copied whole. Each edited tensor is read once,
edited in place in float32 chunks along a non-residual axis (memory: the tensor plus one chunk),
and cast back once. Output goes to a temporary folder renamed into place; BASE is never written.
OUT gets ``ablation-manifest.json`` (intent and result per tensor) and ``directions.safetensors``.
A quantized base (block-scaled FP8, MXFP4; audit/model/logical.py) is edited on its dequantized values and written
either plain in ``output_dtype`` (bfloat16 by default: every shard rewritten, scales dropped, config.json
without quantization_config) or, with ``keep_quantization``, in its own format with recomputed scales
(headers kept, as above); audit/ablation/quantize.py does both.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from pathlib import Path

import torch

from audit import __version__
from audit.ablation import quantize
from audit.ablation.edit import edit_inplace
from audit.ablation.suppress import SuppressEdit, edited as suppress_edited, norm_key, plan_suppress, resolve_auto
from audit.intent.config import AblationConfig, PlannedEdit, plan, resolve_measurements, unmatched_targets
from audit.intent.directions import Directions
from audit.intent.manifest import DIRECTIONS_NAME, MANIFEST_NAME, TOOL
from audit.model.directory import ModelDir, copy_side_files
from audit.model.hashes import hash_inputs, input_entries
from audit.model.logical import quant_spec
from audit.model.reader import pread_into
from audit.model.shards import DTYPES, write_index
from audit.outputs import OutputDir
from checks.errors import AuditError

EDITABLE_DTYPES = ("F64", "F32", "F16", "BF16")





# -- files --------------------------------------------------------------------------------------


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy bytes [offset, offset+count) of src to the same offsets of dst (kernel-side where possible)."""
    end = offset + count
    pos = offset
    while pos < end:
        n = 0
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(end - pos, 1 << 30), pos, pos)
        except (AttributeError, OSError):
            n = 0
        if n <= 0:  # no copy_file_range here (or across these file systems): plain reads
            while pos < end:
                buf = os.pread(src_fd, min(end - pos, 1 << 26), pos)
                if not buf:
                    raise AuditError(f"unexpected end of file while copying at byte {pos}")
                _pwrite_all(dst_fd, buf, pos)
                pos += len(buf)
            return
        pos += n


def _pwrite_all(fd: int, buf, offset: int) -> None:
    mv = memoryview(buf).cast("B")
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _read_tensor(fd: int, info, buf: dict) -> torch.Tensor:
    """One tensor read with pread into ``buf["raw"]``, reused and grown as needed (a mapping would keep
    its pages in our RSS; a fresh buffer per tensor page-faults every 4 KB). Valid until the next read."""
    dtype = DTYPES[info.dtype][0]
    if buf.get("raw") is None or buf["raw"].numel() < info.nbytes:
        buf["raw"] = torch.empty(info.nbytes, dtype=torch.uint8)
    raw = pread_into(fd, buf["raw"][:info.nbytes], info.begin, f"{info.shard} ({info.name})")
    return raw.view(dtype).reshape(info.shape)


def _rewrite_shard(md: ModelDir, shard: str, dst: Path, edits: dict, results: dict, bar) -> None:
    """Write ``dst`` = ``shard`` with the edited tensors replaced at their offsets; header kept as is.

    ``edits``: stored tensor name -> PlannedEdit, or audit.ablation.quantize.QuantEdit for a part of a quantized weight."""
    src = md.path / shard
    infos = sorted((i for i in md.tensors.values() if i.shard == shard), key=lambda i: i.begin)
    size = src.stat().st_size
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos, buf = 0, {}
        for info in infos:
            edit = edits.get(info.name)
            if edit is None:
                continue
            _copy_range(src_fd, dst_fd, pos, info.begin - pos)
            bar.update(info.begin - pos)
            t0 = time.perf_counter()
            if isinstance(edit, PlannedEdit):
                t = _read_tensor(src_fd, info, buf)  # our own buffer (not a file mapping), edited in place
                before, after = edit_inplace(t, edit)
                data = t.contiguous().view(torch.uint8).reshape(-1).numpy()
                results[info.name] = (before, after, time.perf_counter() - t0)
                del t
            elif isinstance(edit, SuppressEdit):  # a router tensor: the suppressed experts' entries (audit/ablation/suppress.py)
                t = _read_tensor(src_fd, info, buf)
                new = suppress_edited(t, edit.rule, edit.experts, edit.strength, edit.direction)
                results[info.name] = (_entries_of(t, edit), _entries_of(new, edit), time.perf_counter() - t0)
                data = new.contiguous().view(torch.uint8).reshape(-1).numpy()
                del t
            else:  # a stored part of a quantized weight, re-quantized (audit/ablation/quantize.py)
                data = edit.part_bytes(info.name)
            if data.nbytes != info.nbytes:
                raise AuditError(f"{info.name}: edited tensor has {data.nbytes} bytes, the file slot {info.nbytes}")
            _pwrite_all(dst_fd, data, info.begin)
            del data
            pos = info.end
            bar.update(info.nbytes)
        _copy_range(src_fd, dst_fd, pos, size - pos)
        bar.update(size - pos)
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def _entries_of(t: torch.Tensor, edit: SuppressEdit) -> list:
    """What the manifest shows of a suppressed router tensor: the experts' bias entries, or their rows' component along u."""
    x = t.float()[list(edit.experts)]
    return (x @ edit.direction).tolist() if edit.rule == "row_along_mean" else x.tolist()


def _norm_weight(md: ModelDir, layer: int):
    key = norm_key(md.layout, layer)
    return None if key is None else md.tensor(key).float()


def ablate(base: str | os.PathLike, config: AblationConfig, out: str | os.PathLike, directions: Directions | None = None,
           force: bool = False, progress: bool | None = None, output_dtype: str | None = None, keep_quantization: bool = False,
           inputs: tuple = (), harmful: list[str] | None = None, harmless: list[str] | None = None,
           prompt_sources: dict | None = None, extra_files: dict[str, str] | None = None) -> dict:
    """Ablate ``base`` as ``config`` says into ``out``; returns the manifest. Everything is checked before anything is written.

    A quantized base is written plain in ``output_dtype`` (default bfloat16), or in its own format with ``keep_quantization``.
    ``inputs``: other files the run reads (the directions file), which ``out`` must stay clear of too. ``extra_files``: name ->
    text written beside the manifest (`audit fix` leaves the applied config as YAML there).
    """
    from tqdm import tqdm


    t_start = time.perf_counter()
    md = ModelDir(base)
    layout = md.layout
    spec = quant_spec(md.config, md.path)
    if spec is None and (output_dtype is not None or keep_quantization):
        raise AuditError(f"{md.path}: is not quantized; --output-dtype and --keep-quantization apply to FP8 / MXFP4 bases only")
    if keep_quantization and output_dtype is not None:
        raise AuditError("--keep-quantization keeps the base's format; --output-dtype stores it plain: pass one of them")
    dequantize = spec is not None and not keep_quantization
    if directions is None:
        if not config.measurements:
            raise AuditError(f"{config.source}: no directions: set 'measurements:' in the config or pass --directions (made by `audit measure`)")
        directions = Directions.load(resolve_measurements(config))
    edits = plan(config, layout, directions)
    auto = None
    if config.router_mode == "suppress" and config.suppress_experts == "auto":  # measured on the base before anything is written
        config, auto = resolve_auto(config, md, directions, harmful, harmless, progress=progress, sources=prompt_sources)
    elif harmful is not None or harmless is not None:
        raise AuditError(f"{config.source}: --harmful / --harmless choose the prompts of suppress_experts: auto; this config has no "
                         "auto suppression (drop them, or set router_mode: suppress with suppress_experts: auto)")
    supp = plan_suppress(config, layout, directions, norm_weight=lambda l: _norm_weight(md, l))
    if supp and dequantize:
        raise AuditError(f"{md.path}: router_mode: suppress on a quantized base is written with --keep-quantization only "
                         "(the plain copy path does not carry router edits yet)")
    if auto is not None:
        for se in supp:
            se.why = {e: auto["experts"].get(f"{se.layer}:{e}") for e in se.experts}
    if not edits and not supp:
        raise AuditError(f"{config.source}: matches no tensor of {md.path} (components {', '.join(config.components)}); check the layers and components")
    by_key: dict[str, PlannedEdit] = {}
    for e in edits:
        if e.key in by_key:
            raise AuditError(f"{config.source}: {e.key} would be edited twice; one entry per layer")
        by_key[e.key] = e
        lt = md.logical[e.key]
        if not lt.quantized and lt.dtype not in EDITABLE_DTYPES:
            raise AuditError(f"{md.path}: {e.key} is stored as {lt.dtype}; ablation needs float weights -- dequantize the model first")
    for se in supp:
        if se.key in by_key:
            raise AuditError(f"{config.source}: {se.key} is both projected and suppressed; router_mode: suppress leaves the router unprojected")
    t_plan = time.perf_counter() - t_start

    results: dict[str, tuple[float, float, float]] = {}
    stored: dict = {}  # stored tensor name -> its edit (a quantized weight's parts share one QuantEdit)
    for k, e in by_key.items():
        lt = md.logical[k]
        if lt.quantized:
            qe = quantize.QuantEdit(md, lt, e, results)
            stored.update({p.name: qe for p in lt.parts})
        else:
            stored[k] = e
    stored.update({se.key: se for se in supp})
    touched = list(md.shards) if dequantize else sorted({p.shard for k in [*by_key, *(se.key for se in supp)] for p in md.logical[k].parts})
    total = sum((md.path / s).stat().st_size for s in md.shards)
    cfg_file = Path(config.source) if config.source and Path(config.source).is_file() else None
    read = [("base", md), ("config", cfg_file), ("directions", resolve_measurements(config)), *(("input", src) for src in inputs),
            *((f"prompts:{k}", src) for k, src in (prompt_sources or {}).items())]
    hashes = hash_inputs([e for role, src in read for e in input_entries(role, src)])  # what this ablation was made from
    with OutputDir(out, inputs=[md.path, cfg_file, resolve_measurements(config), *inputs], force=force, kind="ablated model") as od:
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="ablate", disable=None if progress is None else not progress)
        t0 = time.perf_counter()
        if dequantize:
            weight_map, nbytes = quantize.write_dequantized(md, od.tmp, by_key, quantize.OUTPUT_DTYPES[output_dtype or "bfloat16"], results, bar)
        else:
            weight_map, nbytes = {n: i.shard for n, i in md.tensors.items()}, md.nbytes
            for shard in md.shards:
                if shard in touched:
                    _rewrite_shard(md, shard, od.tmp / shard, stored, results, bar)
                else:
                    shutil.copyfile(md.path / shard, od.tmp / shard)
                    bar.update((md.path / shard).stat().st_size)
        bar.close()
        t_write = time.perf_counter() - t0
        copy_side_files(md.path, od.tmp)
        for stale in (MANIFEST_NAME,):
            (od.tmp / stale).unlink(missing_ok=True)
        if dequantize:
            (od.tmp / "config.json").write_text(json.dumps(quantize.dequantized_config(md.config, output_dtype or "bfloat16"), indent=2))
        write_index(od.tmp, weight_map, nbytes)
        directions.save(od.tmp / DIRECTIONS_NAME)
        for name, text in (extra_files or {}).items():
            (od.tmp / name).write_text(text, encoding="utf-8")
        manifest = {
            "tool": TOOL,
            "version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base": {"path": str(md.path.resolve()), "bytes": md.nbytes, "family": layout.family, "identity": md.identity()},
            "config": config.to_dict(),
            "config_source": config.source,
            "directions_file": DIRECTIONS_NAME,
            "unmatched_components": unmatched_targets(config, edits),
            "shards": {"rewritten": touched, "copied": [s for s in md.shards if s not in touched]},
            "quantization": None if spec is None else {"base": spec.to_dict(), "output": "kept" if keep_quantization else output_dtype or "bfloat16"},
            "modified": [
                {**{k: v for k, v in e.to_dict().items() if k not in ("resid_axis",)},
                 "dtype": md.logical[e.key].dtype,
                 "along_before": results[e.key][0], "along_after": results[e.key][1]}
                for e in edits
            ],
            "router_suppressed": [
                {**se.to_dict(), "dtype": md.logical[se.key].dtype, "before": results[se.key][0], "after": results[se.key][1],
                 "reason": ("auto: " + auto["method"]) if auto is not None else "listed in suppress_experts"}
                for se in supp
            ],
            "suppress_auto": None if auto is None else {k: v for k, v in auto.items() if k != "experts"},
            "inputs": hashes,  # SHA-256 of every file read (audit/model/hashes.py)
            "timings": {"plan_s": round(t_plan, 3), "hash_s": hashes["seconds"], "write_s": round(t_write, 3),
                        "edit_s": round(sum(v[2] for v in results.values()), 3),
                        "total_s": round(time.perf_counter() - t_start, 3)},
        }
        (od.tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        od.commit()
    md.close()
    return manifest
