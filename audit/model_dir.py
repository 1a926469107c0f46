"""Hugging Face model directories on disk: open and validate, list tensors, read lazily, write atomically.

Reading never loads a shard whole: safetensors headers are parsed directly (names, shapes, dtypes
and byte ranges, without touching data) and tensors come one at a time through ``safe_open``.
Writing outputs safely (temporary folders, markers, never over an input) is audit/outputs.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from checks.errors import AuditError
from checks.layout import Layout, build_layout

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")

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


class ModelDir:
    """A model directory opened for reading: config, tensor index, lazy tensor access, tokenizer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise AuditError(f"{self.path}: no such directory; pass the path of a Hugging Face model directory")
        if not self.path.is_dir():
            raise AuditError(f"{self.path}: not a directory; pass the folder that holds config.json and *.safetensors")
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise AuditError(f"{self.path}: cannot read this folder (permission denied); fix its permissions or run as its owner")
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
        except OSError as e:
            raise AuditError(f"{cfg}: cannot read it ({e.strerror}); fix its permissions") from None
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
            except OSError as e:
                raise AuditError(f"{index}: cannot read it ({e.strerror}); fix its permissions") from None
            for s in shards:
                # the *name* must stay in the folder; the file may be a symlink (the Hugging Face cache links
                # snapshots/REV/x.safetensors to ../../blobs/HASH) as long as it ends at a regular file
                parts = Path(s).parts if isinstance(s, str) else ()
                if not isinstance(s, str) or not parts or Path(s).is_absolute() or ".." in parts or len(parts) != 1:
                    raise AuditError(f"{index}: names shard {s!r} outside the model directory (not a plain file name in it); refusing to read it")
                if not (self.path / s).is_file():
                    raise AuditError(f"{index}: names shard {s!r}, which is missing from {self.path} (or a broken link); re-download it")
            self._weight_map = weight_map
            return shards
        self._weight_map = None
        if (self.path / SINGLE_NAME).is_file():
            return [SINGLE_NAME]
        singles = sorted(p.name for p in self.path.glob("*.safetensors") if p.is_file())
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

    def identity(self, window: int = 1 << 16) -> dict:
        """What identifies these weights without reading them all: config.json's hash, and per shard its size, its
        header's hash and the hash of three ``window``-byte samples of its data (start, middle, end)."""
        import hashlib

        def sha(b: bytes) -> str:
            return hashlib.sha256(b).hexdigest()

        shards = {}
        for name in self.shards:
            path = self.path / name
            size = path.stat().st_size
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = f.read(n)
                start = 8 + n
                h = hashlib.sha256()
                for at in sorted({start, start + max(0, (size - start - window) // 2), max(start, size - window)}):
                    h.update(os.pread(f.fileno(), window, at))
            shards[name] = {"bytes": size, "header_sha256": sha(header), "sample_sha256": h.hexdigest()}
        return {"config_sha256": sha((self.path / "config.json").read_bytes()), "shards": shards}

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

    def load_model(self, dtype: torch.dtype | str = "auto", device: str | None = None, max_memory: dict | None = None,
                   offload_folder: str | os.PathLike | None = None, inputs: Iterable = ()):
        """The model through transformers (safetensors only, no remote code), in eval mode.

        ``dtype``: "auto" keeps the stored dtype (bf16 stays bf16), or a torch dtype / its name. ``device``: None or
        "cpu", a torch device ("cuda:0"), or "auto": accelerate's device map over the GPUs, the CPU and the disk, bounded
        by ``max_memory`` (parse_max_memory); what goes to disk is written into a temporary folder of ours under
        ``offload_folder`` (default: the system's temporary folder; never in an input, ``inputs``), removed when the
        model is freed (or, after a killed run, by the next one).
        """
        import sys
        import weakref

        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        if not sys.stderr.isatty():  # progress bars only on a terminal; CI logs stay readable
            hf_logging.disable_progress_bar()
        kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": False, "use_safetensors": True}
        if device not in (None, "cpu"):
            kwargs["device_map"] = device
        scratch = None
        if device == "auto":
            from audit.outputs import scratch_folder

            if max_memory:
                kwargs["max_memory"] = dict(max_memory)
            scratch = scratch_folder(offload_folder, "audit-offload", inputs=[self.path, *inputs])
            kwargs["offload_folder"] = str(scratch)
        elif max_memory or offload_folder:
            raise AuditError("--max-memory and --offload-folder place a model through accelerate's device map: pass --device auto with them")
        try:
            with bounded_loading():
                if self.config.get("quantization_config") is not None:  # FP8 / MXFP4: dequantized on load (audit/logical.py)
                    from audit.logical import load_quantized

                    model = load_quantized(self, **kwargs)
                else:
                    model = AutoModelForCausalLM.from_pretrained(str(self.path), **kwargs)
        except AuditError:
            _remove_scratch(scratch)
            raise
        except Exception as e:
            _remove_scratch(scratch)
            if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
                raise
            raise AuditError(f"{self.path}: transformers cannot load this model ({type(e).__name__}: {e})") from None
        if scratch is not None:
            weakref.finalize(model, _remove_scratch, scratch)  # the offloaded weights live as long as the model
        return model.eval()


@contextmanager
def bounded_loading():
    """transformers' from_pretrained in about one model's worth of memory: each tensor read (pread) into its own buffer,
    and read when its conversion needs it.

    By default transformers 5 maps the shards (mmap) and keeps the tensors it loads as they are as views of the mapping,
    so every page it touched stays resident, the per-expert tensors it copies into fused ones included: 2x the
    checkpoint in RSS on a MoE model. Its thread pool also reads every tensor ahead of the conversions that consume
    them. Inside this block safetensors files are read with the pread backend (the one transformers uses on MPS and
    Windows) and loading is sequential (transformers' own HF_DEACTIVATE_ASYNC_LOAD); both are put back on exit.
    benchmarks/bench_run_memory.py measures the difference (peak RSS 3.0 -> 1.9 GB loading a 1.5 GB bf16 MoE).
    """
    try:
        import transformers.modeling_utils as mu
    except ImportError:  # pragma: no cover
        yield
        return
    real = getattr(mu, "safe_open", None)
    env = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")

    def pread_open(*args, **kwargs):
        if kwargs.get("device", "cpu") == "cpu" and kwargs.get("backend", "mmap") == "mmap":
            kwargs["backend"] = "pread"
        return real(*args, **kwargs)

    if real is not None:
        mu.safe_open = pread_open
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if real is not None:
            mu.safe_open = real
        if env is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = env


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """"auto" (the stored dtype) or a torch dtype, from a dtype or its name (--dtype)."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise AuditError(f"--dtype {dtype!r}: use auto (the stored dtype), {', '.join(DTYPE_NAMES)}")


def parse_max_memory(text: str | None) -> dict | None:
    """--max-memory "cpu=2GiB" or "0=70GiB,1=70GiB,cpu=200GiB" -> accelerate's max_memory ({0: "70GiB", "cpu": "200GiB"})."""
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, sep, size = (x.strip() for x in part.partition("="))
        if not sep or not key or not size:
            raise AuditError(f"--max-memory {text!r}: each entry is DEVICE=SIZE, e.g. cpu=2GiB or 0=70GiB,cpu=200GiB")
        dev = int(key) if key.isdigit() else key.lower()
        if not isinstance(dev, int) and dev not in ("cpu", "mps"):
            raise AuditError(f"--max-memory {text!r}: unknown device {key!r}; use a GPU number (0, 1, ...) or cpu")
        try:
            n = int(size) if size.isdigit() else convert_file_size_to_int(size)  # a plain number is bytes
        except (ValueError, TypeError):
            n = -1
        if not isinstance(n, int) or n < 0:
            raise AuditError(f"--max-memory {text!r}: {size!r} is not a size; write e.g. 500MB, 2GiB or a number of bytes")
        if dev in out:
            raise AuditError(f"--max-memory {text!r}: {key} is given twice")
        out[dev] = n
    if not out:
        raise AuditError(f"--max-memory {text!r}: give at least one DEVICE=SIZE, e.g. cpu=2GiB")
    return out


def input_device(model) -> torch.device:
    """Where a model's inputs go: its embeddings' execution device (accelerate's, when they are offloaded and sit on
    the meta device until a forward needs them), else where the embeddings are."""
    emb = model.get_input_embeddings()
    dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if dev is None:
        dev = emb.weight.device
    dev = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return torch.device("cpu") if dev.type == "meta" else dev


def weights_on(module: torch.nn.Module):
    """A context in which ``module``'s own weights are real tensors on its execution device: accelerate keeps offloaded
    modules' weights on the meta device and loads them only around their forward; code that reads weights outside
    that forward (the probe's expert maths, interventions that recompute experts) reads them inside this block."""
    from contextlib import nullcontext

    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # pragma: no cover -- accelerate is a dependency; without it nothing is offloaded
        return nullcontext()
    return align_module_device(module) if has_offloaded_params(module) else nullcontext()


def placement(model) -> dict[str, int]:
    """How many modules of accelerate's device map went where ({"cpu": 3, "disk": 5}); {} when the model is in one place."""
    out: dict[str, int] = {}
    for dev in (getattr(model, "hf_device_map", None) or {}).values():
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def _remove_scratch(path) -> None:
    if path is not None:
        from audit.outputs import remove_scratch

        remove_scratch(path)


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


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def identity_changes(recorded: dict, now: dict) -> list[str]:
    """How ``now`` (ModelDir.identity) differs from ``recorded``; [] when it is the same model."""
    out = []
    if recorded.get("config_sha256") != now.get("config_sha256"):
        out.append("config.json differs")
    rs, ns = recorded.get("shards") or {}, now.get("shards") or {}
    for name in sorted(set(rs) | set(ns)):
        if name not in ns:
            out.append(f"shard {name} is gone")
        elif name not in rs:
            out.append(f"shard {name} is new")
        elif rs[name] != ns[name]:
            what = next((w for k, w in (("bytes", "size"), ("header_sha256", "header"), ("sample_sha256", "content"))
                         if rs[name].get(k) != ns[name].get(k)), "content")
            out.append(f"shard {name} differs ({what})")
    return out
