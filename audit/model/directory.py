"""Hugging Face model directories on disk: open and validate, list tensors, read lazily, write atomically.

Reading never loads a shard whole: safetensors headers are parsed directly (names, shapes, dtypes
and byte ranges, without touching data) and tensors come one at a time through ``safe_open``.
Writing outputs safely (temporary folders, markers, never over an input) is audit/outputs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from audit.model.loading import bounded_loading, load_quantized, release_scratch, torch_dtype
from audit.model.logical import logical_tensors
from audit.model.shards import INDEX_NAME, SINGLE_NAME, TensorInfo, read_header
from audit.outputs import scratch_folder
from checks.errors import AuditError
from checks.layout import Layout, build_layout

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


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
        """Tensors as the model holds them: a quantized weight and its scales as one float tensor (audit/model/logical.py)."""
        if self._logical is None:
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

    def file(self, shard: str) -> Path:
        """The file a shard name stands for (a GGUF model answers its one file)."""
        return self.path / shard

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
            if max_memory:
                kwargs["max_memory"] = dict(max_memory)
            scratch = scratch_folder(offload_folder, "audit-offload", inputs=[self.path, *inputs])
            kwargs["offload_folder"] = str(scratch)
        elif max_memory or offload_folder:
            raise AuditError("--max-memory and --offload-folder place a model through accelerate's device map: pass --device auto with them")
        try:
            with bounded_loading():
                if self.config.get("quantization_config") is not None:  # FP8 / MXFP4: dequantized on load (audit/model/logical.py)
                    model = load_quantized(self, **kwargs)
                else:
                    model = AutoModelForCausalLM.from_pretrained(str(self.path), **kwargs)
        except AuditError:
            release_scratch(scratch)
            raise
        except Exception as e:
            release_scratch(scratch)
            if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
                raise
            raise AuditError(f"{self.path}: transformers cannot load this model ({type(e).__name__}: {e})") from None
        if scratch is not None:
            weakref.finalize(model, release_scratch, scratch)  # the offloaded weights live as long as the model
        return model.eval()


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy everything that is not weights (config, tokenizer, generation config, templates)."""
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX_NAME and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)


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
