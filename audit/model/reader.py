"""The (ablated, base) tensor pairs of two model directories, in chunks, straight from the page cache.

Each run of neighbouring tensors is memory-mapped on its own and unmapped as soon as the last view
of it is gone, so every byte is read once, by the arithmetic itself (no copy into a buffer first),
and resident memory stays at the chunks being judged, whatever the model size. Mapping whole shards
instead would keep every touched page resident until the end. A file cannot shrink under the
mapping unnoticed: model_dir.read_header checks every offset against the file size first. Where a
file system cannot map, the run is read into a buffer instead. Pairs are of logical tensors
(audit/model/logical.py): a quantized weight comes with its scales mapped beside it, as one lazy float32
reader (audit/model/quant.py).
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import warnings
from typing import TYPE_CHECKING

import torch

from audit.model.logical import LogicalTensor, source
from audit.model.shards import DTYPES, TensorInfo
from checks.errors import AuditError
from checks.pair_stats import bytes_equal

if TYPE_CHECKING:  # annotations only: the directory reads through this module
    from audit.model.directory import ModelDir

PAGE = mmap.ALLOCATIONGRANULARITY


def _open(md: ModelDir, shard: str, fds: dict) -> int:
    fd = fds.get((md.path, shard))
    if fd is None:
        fd = os.open(md.file(shard), os.O_RDONLY)
        fds[(md.path, shard)] = fd
    return fd


def _check(md: ModelDir, info: TensorInfo) -> tuple[torch.dtype, int]:
    dtype, size = DTYPES[info.dtype]
    if dtype is None:
        raise AuditError(f"{md.file(info.shard)}: {info.name} has dtype {info.dtype}, which this torch build cannot read")
    if info.end - info.begin != math.prod(info.shape) * size:
        raise AuditError(f"{md.file(info.shard)}: {info.name} occupies {info.end - info.begin} bytes, its shape {info.shape} x {info.dtype} "
                         f"needs {math.prod(info.shape) * size}")
    return dtype, size


_first = threading.Lock()
_warned = False


def _frombuffer(mm: mmap.mmap) -> torch.Tensor:
    """torch.frombuffer of a read-only mapping, without torch's one-time "buffer is not writable" warning (nothing here writes to inputs)."""
    global _warned
    if not _warned:
        with _first, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(mm, dtype=torch.uint8)
            _warned = True  # torch warns once per process
            return t
    return torch.frombuffer(mm, dtype=torch.uint8)


def pread_into(fd: int, dst: torch.Tensor, offset: int, path) -> torch.Tensor:
    """Fill the uint8 tensor ``dst`` from byte ``offset`` of the open file ``path`` (AuditError if it ends first); returns ``dst``."""
    mv, got, n = memoryview(dst.numpy()), 0, dst.numel()
    while got < n:
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k <= 0:
            raise AuditError(f"{path}: truncated at byte {offset + got}; re-download or re-copy it")
        got += k
    return dst


def _runs(infos: list[TensorInfo], max_gap: int) -> list[list[TensorInfo]]:
    runs: list[list[TensorInfo]] = []
    for info in sorted(infos, key=lambda t: (t.shard, t.begin)):
        if runs and runs[-1][-1].shard == info.shard and 0 <= info.begin - runs[-1][-1].end <= max_gap:
            runs[-1].append(info)
        else:
            runs.append([info])
    return runs


def map_tensors(md: ModelDir, infos: list[TensorInfo], fds: dict, max_gap: int = 1 << 16) -> dict[str, torch.Tensor]:
    """Read-only tensors mapped from the files, one mapping per run of neighbours (gaps up to ``max_gap`` bytes).

    A mapping lives as long as one of its tensors does. Tensors unaligned in the file get an aligned copy.
    """
    out: dict[str, torch.Tensor] = {}
    for run in _runs(infos, max_gap):
        checked = [_check(md, info) for info in run]
        off = run[0].begin // PAGE * PAGE
        if run[-1].end == off:  # empty tensors only: nothing to map
            mem = torch.empty(0, dtype=torch.uint8)
        else:
            fd = _open(md, run[0].shard, fds)
            try:
                mem = _frombuffer(mmap.mmap(fd, run[-1].end - off, offset=off, access=mmap.ACCESS_READ))  # holds the mapping
            except OSError:  # a file system that cannot map (some FUSE and network mounts): read a copy
                mem = pread_into(fd, torch.empty(run[-1].end - off, dtype=torch.uint8), off, md.file(run[0].shard))
        for info, (dtype, size) in zip(run, checked):
            n, at = info.end - info.begin, info.begin - off
            if n == 0:
                out[info.name] = torch.empty(info.shape, dtype=dtype)
                continue
            raw = mem[at:at + n]
            if at % size:
                raw = raw.clone()
            out[info.name] = raw.view(dtype).reshape(info.shape)
    return out


def chunks(order: list, chunk: int) -> list[list]:
    """Consecutive tensors (TensorInfo or LogicalTensor) of one shard grouped into chunks of about ``chunk`` bytes (a larger tensor is a chunk of its own)."""
    groups: list[list[TensorInfo]] = []
    size = 0
    for info in order:
        if not groups or size + info.nbytes > chunk or groups[-1][-1].shard != info.shard:
            groups.append([])
            size = 0
        groups[-1].append(info)
        size += info.nbytes
    return groups


def read_pairs(md_a: ModelDir, md_b: ModelDir, group: list[LogicalTensor], fds: dict
               ) -> list[tuple[LogicalTensor, LogicalTensor | None, object, object, bool | None]]:
    """(lt_a, lt_b, ablated, base, identical) for the ablated model's logical tensors ``group`` and the base's of the same names.

    A tensor is the mapped tensor itself, or for a quantized one its lazy reader. Bit-identity by libc memcmp
    of every stored part (None when the dtypes or formats differ). Pairs that cannot be compared (missing in
    the base, another shape) come with None tensors.
    """
    logical_a, logical_b = md_a.logical, md_b.logical
    group = [ia if isinstance(ia, LogicalTensor) else logical_a.get(ia.name) or LogicalTensor(ia.name, ia.shape, ia.dtype, (ia,))
             for ia in group]  # stored tensors (TensorInfo) stand for their logical tensor
    pairs = [(ia, logical_b.get(ia.name)) for ia in group]
    ok = [(ia, ib) for ia, ib in pairs if ib is not None and ib.shape == ia.shape]
    ta = map_tensors(md_a, [p for ia, _ in ok for p in ia.parts], fds)
    tb = map_tensors(md_b, [p for _, ib in ok for p in ib.parts], fds)
    out = []
    for ia, ib in pairs:
        if ib is None or ib.shape != ia.shape:
            out.append((ia, ib, None, None, None))
            continue
        same = None
        if ia.dtype == ib.dtype and ia.method == ib.method:
            same = all(bytes_equal(tb[pb.name], ta[pa.name]) for pa, pb in zip(ia.parts, ib.parts))
        out.append((ia, ib, source(ia, ta), source(ib, tb), same))
    return out
