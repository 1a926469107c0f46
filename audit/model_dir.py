"""Hugging Face model directories on disk: open and validate, list tensors, read lazily, write atomically.

Reading never loads a shard whole: safetensors headers are parsed directly (names, shapes, dtypes
and byte ranges, without touching data) and tensors come one at a time through ``safe_open``.
Writing goes to a temporary folder beside the destination, renamed into place when complete;
an input directory is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from checks.errors import AuditError
from checks.layout import Layout, build_layout

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")

# safetensors dtype tags -> (torch dtype, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1),
}
TAG_OF = {v[0]: k for k, v in DTYPES.items() if v[0] is not None}


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


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse a .safetensors header: tensor infos, __metadata__, and where the data starts.

    Checks what a truncated or corrupt file breaks: header length, JSON, offsets against the file size.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise AuditError(f"{path}: too short to be a safetensors file ({size} bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise AuditError(f"{path}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file); re-download or re-save it")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if isinstance(e, AuditError):
            raise
        raise AuditError(f"{path}: cannot read the safetensors header ({e}); re-download or re-save the file") from None
    if not isinstance(header, dict):
        raise AuditError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    infos, data_end = {}, 0
    for name, h in header.items():
        try:
            b, e = (int(x) for x in h["data_offsets"])
            shape = tuple(int(x) for x in h["shape"])
            tag = str(h["dtype"])
        except (KeyError, TypeError, ValueError):
            raise AuditError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        infos[name] = TensorInfo(name, shape, tag, path.name, start + b, start + e)
        data_end = max(data_end, e)
    if start + data_end > size:
        raise AuditError(f"{path}: truncated: the header needs {start + data_end} bytes, the file has {size}; re-download or re-copy it")
    return infos, meta, start


class ModelDir:
    """A model directory opened for reading: config, tensor index, lazy tensor access, tokenizer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise AuditError(f"{self.path}: no such directory; pass the path of a Hugging Face model directory")
        if not self.path.is_dir():
            raise AuditError(f"{self.path}: not a directory; pass the folder that holds config.json and *.safetensors")
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        self.shard_meta: dict[str, dict] = {}
        for shard in self._shard_files():
            infos, meta, _ = read_header(self.path / shard)
            self.shard_meta[shard] = meta
            for name, info in infos.items():
                if name in self.tensors:
                    raise AuditError(
                        f"{self.path}: tensor {name!r} is stored twice, in {self.tensors[name].shard} and {shard}; "
                        "remove the stale shard or fix model.safetensors.index.json"
                    )
                self.tensors[name] = info
        self._check_index_agrees()
        self._handles: dict[str, object] = {}
        self._layout: Layout | None = None
        self._logical: dict | None = None

    # -- opening -----------------------------------------------------------------------------
    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise AuditError(f"{cfg}: missing; a model directory needs its config.json (copy it from the base model)")
        try:
            config = json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AuditError(f"{cfg}: not valid JSON ({e}); restore it from the base model") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise AuditError(f"{cfg}: has no 'model_type'; restore it from the base model")
        return config

    def _shard_files(self) -> list[str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise AuditError(f"{index}: not a valid index (needs a 'weight_map' object): {e}") from None
            root = self.path.resolve()
            for s in shards:
                p = (self.path / s).resolve()
                if root not in p.parents:
                    raise AuditError(f"{index}: names shard {s!r} outside the model directory; refusing to read it")
                if not p.is_file():
                    raise AuditError(f"{index}: names shard {s!r}, which is missing from {self.path}; re-download it")
            self._weight_map = weight_map
            return shards
        self._weight_map = None
        if (self.path / SINGLE_NAME).is_file():
            return [SINGLE_NAME]
        singles = sorted(p.name for p in self.path.glob("*.safetensors"))
        if len(singles) == 1:
            return singles
        if singles:
            raise AuditError(f"{self.path}: {len(singles)} .safetensors files but no {INDEX_NAME}; restore the index")
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")) or list(self.path.glob("*.pth")):
            raise AuditError(
                f"{self.path}: only pickle weights (.bin/.pt); they can run code when loaded, so the audit reads safetensors only. "
                "Convert once in a trusted environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
            )
        raise AuditError(f"{self.path}: no *.safetensors weights found")

    def _check_index_agrees(self) -> None:
        if self._weight_map is None:
            return
        for name, shard in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None:
                raise AuditError(f"{self.path / INDEX_NAME}: lists {name!r} in {shard}, but no shard holds it; re-download that shard")
            if info.shard != shard:
                raise AuditError(f"{self.path / INDEX_NAME}: says {name!r} is in {shard}, but it is in {info.shard}")

    # -- reading -----------------------------------------------------------------------------
    @property
    def logical(self) -> dict:
        """Tensors as the model holds them: a quantized weight and its scales as one float tensor (audit/logical.py)."""
        if self._logical is None:
            from audit.logical import logical_tensors

            self._logical = logical_tensors(self)
        return self._logical

    @property
    def layout(self) -> Layout:
        """Every tensor placed by role, quantized weights by their logical names (raises AuditError listing keys it cannot place)."""
        if self._layout is None:
            shapes = {k: v.shape for k, v in self.logical.items()}
            self._layout = build_layout(self.config, shapes, source=str(self.path))
        return self._layout

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def shards(self) -> list[str]:
        return sorted(self.shard_meta)

    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + 1
        return out

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(str(self.path / shard), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise AuditError(f"{self.path / shard}: cannot open ({e}); re-download or re-save it") from None
            self._handles[shard] = h
        return h

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (memory-mapped; only this tensor is materialised)."""
        info = self.tensors.get(name)
        if info is None:
            raise AuditError(f"{self.path}: has no tensor {name!r}")
        return self._handle(info.shard).get_tensor(name)

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors one at a time, in on-disk order (shard, then offset) so reads stream."""
        wanted = self.tensors.values() if names is None else [self.tensors[n] for n in names]
        for info in sorted(wanted, key=lambda t: (t.shard, t.begin)):
            yield info.name, self.tensor(info.name)

    def close(self) -> None:
        self._handles.clear()

    def tokenizer(self):
        """The directory's tokenizer (transformers AutoTokenizer, no remote code)."""
        from transformers import AutoTokenizer

        if not any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise AuditError(f"{self.path}: no tokenizer files (tokenizer.json / tokenizer_config.json); copy them from the base model")
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:
            raise AuditError(f"{self.path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
        if tok.chat_template is None:
            raise AuditError(f"{self.path}: the tokenizer has no chat template; prompts must be formatted as the model was trained")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return tok

    def load_model(self, dtype: torch.dtype | str = "auto", device: str | None = None):
        """The model through transformers (safetensors only, no remote code), in eval mode."""
        import sys

        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        if not sys.stderr.isatty():  # progress bars only on a terminal; CI logs stay readable
            hf_logging.disable_progress_bar()
        kwargs = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
        if device not in (None, "cpu"):
            kwargs["device_map"] = device
        try:
            if self.config.get("quantization_config") is not None:  # FP8 / MXFP4: dequantized on load (audit/logical.py)
                from audit.logical import load_quantized

                model = load_quantized(self, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(self.path), **kwargs)
        except AuditError:
            raise
        except Exception as e:
            raise AuditError(f"{self.path}: transformers cannot load this model ({type(e).__name__}: {e})") from None
        return model.eval()


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy everything that is not weights (config, tokenizer, generation config, templates)."""
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX_NAME and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)


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


def check_destination(dest: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """The absolute destination, after refusing one inside an input or (without ``force``) a non-empty one.

    Called before long work starts, so a bad -o fails in a second, not after the run.
    """
    dest = Path(dest).absolute()
    for inp in inputs:
        ip = Path(inp).resolve()
        dp = dest.resolve()
        if dp == ip or ip in dp.parents:
            raise AuditError(f"{dest}: is inside the input {ip}; the audit never writes into an input directory")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise AuditError(f"{dest}: exists and is not empty; choose another -o or pass --force to replace it")
    return dest


class OutputDir:
    """Build an output directory in a temporary sibling folder; ``commit`` renames it into place.

    Refuses a destination inside (or equal to) any of ``inputs``, and a non-empty destination
    unless ``force``. On an exception inside ``with`` the temporary folder is removed.
    """

    def __init__(self, dest: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False):
        self.dest = check_destination(dest, inputs, force)
        self.force = force
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        return self.dest


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
