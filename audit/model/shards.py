"""Safetensors shards: headers read and validated (offsets, dtypes, shapes, sizes) before any byte is trusted, and
shards and their index written."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from checks.errors import AuditError


INDEX_NAME = "model.safetensors.index.json"


SINGLE_NAME = "model.safetensors"


# safetensors dtype tags -> (torch dtype or None where this torch build has none, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U64": (getattr(torch, "uint64", None), 8), "U32": (getattr(torch, "uint32", None), 4), "U16": (getattr(torch, "uint16", None), 2),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1),
}


TAG_OF = {v[0]: k for k, v in DTYPES.items() if v[0] is not None}


MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the file header describes it; no data read."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag, e.g. BF16
    shard: str  # file name inside the model directory
    begin: int  # absolute byte offset of the data in the shard
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"the key {k!r} appears twice")
        d[k] = v
    return d


def _entry(path: Path, name: str, h, start: int) -> TensorInfo:
    """One header entry, validated: a known dtype, a shape of non-negative integers, a byte range that fits it."""
    def bad(why: str) -> AuditError:
        return AuditError(f"{path}: corrupt safetensors header: tensor {name!r} {why}; re-download or re-save the file")

    if not isinstance(h, dict) or set(h) != {"dtype", "shape", "data_offsets"}:
        raise bad("needs exactly 'dtype', 'shape' and 'data_offsets'")
    tag, shape, offs = h["dtype"], h["shape"], h["data_offsets"]
    if tag not in DTYPES:
        raise bad(f"has the unknown dtype {tag!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in shape):
        raise bad(f"has the shape {shape!r}; a shape is a list of non-negative integers")
    if (not isinstance(offs, list) or len(offs) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in offs)
            or offs[0] < 0 or offs[1] < offs[0]):
        raise bad(f"has data_offsets {offs!r}; they must be [begin, end] with 0 <= begin <= end")
    need = math.prod(shape) * DTYPES[tag][1]
    if offs[1] - offs[0] != need:
        raise bad(f"occupies {offs[1] - offs[0]} bytes, but its shape {tuple(shape)} in {tag} needs {need}")
    return TensorInfo(name, tuple(shape), tag, path.name, start + offs[0], start + offs[1])


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse and fully validate a .safetensors header: tensor infos, __metadata__, and where the data starts.

    Everything a corrupt, truncated or hand-made file can break is checked here, before any byte of
    data is read: the header length and JSON, every entry (dtype tag, shape, byte range = shape x
    dtype), and the byte ranges together (sorted, no overlap, no gap, covering the data exactly).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise AuditError(f"{path}: too short to be a safetensors file ({size} bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, MAX_HEADER):
                raise AuditError(f"{path}: corrupt safetensors header (its first 8 bytes claim a {n}-byte header in a {size}-byte file); "
                                 "if it is a pickle renamed .safetensors, convert it in a trusted environment; else re-download it")
            text = f.read(n)
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except AuditError:
        raise
    except PermissionError as e:
        raise AuditError(f"{path}: cannot read it ({e.strerror}); fix its permissions") from None
    except RecursionError:
        raise AuditError(f"{path}: corrupt safetensors header (JSON nested too deeply); re-download or re-save the file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AuditError(f"{path}: not a readable safetensors header ({e}); re-download or re-save the file") from None
    if not isinstance(header, dict):
        raise AuditError(f"{path}: corrupt safetensors header (not a JSON object); re-download or re-save the file")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or any(not isinstance(v, str) for v in meta.values()):
        raise AuditError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings); re-download or re-save the file")
    start = 8 + n
    infos = {name: _entry(path, name, h, start) for name, h in header.items()}
    pos = start
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            what = "overlaps the previous tensor" if info.begin < pos else f"leaves a gap of {info.begin - pos} bytes before it"
            raise AuditError(f"{path}: corrupt safetensors header: tensor {info.name!r} {what} (byte {info.begin - start}); re-download or re-save the file")
        pos = info.end
    if pos > size:
        raise AuditError(f"{path}: truncated: the header needs {pos} bytes, the file has {size}; re-download or re-copy it")
    if pos < size:
        raise AuditError(f"{path}: corrupt safetensors file: {size - pos} bytes after the last tensor that no header entry describes; re-download or re-save it")
    return infos, meta, start


def write_shard(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict | None = None) -> None:
    """Write one .safetensors file from (name, tensor) pairs, streaming each tensor's bytes."""
    header, offset = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": TAG_OF[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, t in tensors:
            f.write(t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
