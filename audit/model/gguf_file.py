"""A GGUF file (llama.cpp, Ollama, LM Studio) read as the ablated model: header validated, tensors placed under the base's
names, values decoded block by block.

Reading: the ``gguf`` package's reader parses the header, the metadata and the tensor table; before it makes a
single view of tensor data, every entry is checked here as strictly as a safetensors header is
(audit/model/shards.py): a type the audit decodes (audit/model/gguf_quant.py), 1 to 4 dimensions, rows of whole
blocks, an aligned offset, a byte range inside the file, no overlap, no gap or trailing bytes beyond the alignment
padding. Anything else is an AuditError naming the file and the tensor. The file is opened read-only (a read-only
mapping); nothing is ever written to it.

Placing: llama.cpp's converter renames each Hugging Face tensor with gguf-py's tables (``gguf.get_tensor_name_map``),
stacks the routed experts of a layer into one tensor (``blk.N.ffn_{gate,up,down}_exps``, [E, out, in]) and, for
llama-style architectures (``LlamaModel.undo_permute``), reorders the q/k projection rows. Here each of the base's
tensors gets its GGUF name from the same table (per-expert keys through the stacked name, expert e being the e-th
slice), and the permuted rows are read back in the Hugging Face order. A base tensor the table cannot name, or a
GGUF tensor no base tensor maps to, is an AuditError listing them: a family the mapping cannot place is never
skipped silently. A base tensor the file lacks is reported as missing by the weights check.

The model: ``GGUFModel`` offers what the audit reads of a model directory (config, logical tensors, layout, a
tokenizer, ``load_model``), with the base's config.json and tokenizer (the GGUF's metadata is checked against them).
Its forward passes run the base's architecture on the GGUF's dequantized values (the values llama.cpp computes with,
not its kernels); generation can come from llama.cpp itself (``llama-server``, OpenAI-compatible, ``--server``).
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from audit.model.gguf_quant import KINDS, Kind
from audit.model.logical import LogicalTensor
from audit.model.shards import TensorInfo
from checks.errors import AuditError
from checks.layout import Layout, build_layout

SUFFIX = ".gguf"
MAX_DIMS = 4  # GGML_MAX_DIMS
INSTALL = "the gguf package is not installed: pip install 'moe-ablation-audit[gguf]' (or pip install gguf)"
# llama.cpp's architecture for each family the audit audits as GGUF (convert_hf_to_gguf.py's registrations)
GGUF_ARCH = {"glm4_moe": "glm4moe", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "mixtral": "llama", "llama": "llama",
             "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2",
             "kimi_k2": "deepseek2", "phimoe": "phimoe", "granitemoe": "granitemoe", "gpt_oss": "gpt-oss", "llama4_text": "llama4"}
# architectures whose converter (a LlamaModel that keeps undo_permute = True) reorders the q/k rows for rotary pairs
UNPERMUTE_ARCHS = ("llama", "granite", "granitemoe")
GENERATED = ("rope_freqs", "rope_factors_long", "rope_factors_short")  # computed by the converter, no Hugging Face tensor
EXPERT_KEY = re.compile(r"^(?P<pre>.*\.experts)\.(?P<e>\d+)\.(?P<rest>.+)$")


def is_gguf(path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; the header is checked when it is read)."""
    return path is not None and str(path).lower().endswith(SUFFIX) and not Path(path).is_dir()


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the GGUF table describes it: the Hugging Face-order shape (dims reversed), its type, its bytes."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    begin: int
    end: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    arch: str
    metadata: dict  # scalar fields; arrays by their length
    tensors: dict[str, GGUFTensorInfo]
    alignment: int
    data_start: int
    size: int


def _gguf():
    try:
        import gguf
    except ImportError:
        raise AuditError(INSTALL) from None
    return gguf


def _reader_class():
    gguf = _gguf()

    class Reader(gguf.GGUFReader):
        """gguf's reader, with every tensor entry validated before any view of its data is made."""

        def __init__(self, path, mode="r"):
            self.audit_path = Path(path)
            super().__init__(path, mode)

        def _build_tensors(self, start_offs, fields):
            self.checked = _validate_table(self.audit_path, int(self.data.size), int(start_offs), int(self.alignment), fields)
            return super()._build_tensors(start_offs, fields)

    return Reader


def _validate_table(path: Path, size: int, start: int, alignment: int, fields) -> dict[str, GGUFTensorInfo]:
    """Each tensor entry: name, dimensions, a type the audit decodes, rows of whole blocks, an aligned offset, bytes inside the
    file; then the byte ranges together: sorted, no overlap, gaps and the tail no longer than the alignment padding."""
    gguf = _gguf()

    def bad(name, why):
        return AuditError(f"{path}: corrupt GGUF tensor table: tensor {name!r} {why}; re-download or re-convert the file")

    out: dict[str, GGUFTensorInfo] = {}
    for field in fields:
        _, name_data, n_dims, dims, raw_type, offset = field.parts
        try:
            name = bytes(name_data).decode("utf-8")
        except UnicodeDecodeError:
            raise AuditError(f"{path}: corrupt GGUF tensor table: a tensor name is not UTF-8; re-download or re-convert the file") from None
        nd = int(n_dims[0])
        if not 1 <= nd <= MAX_DIMS or len(dims) != nd:
            raise bad(name, f"has {nd} dimensions (GGUF allows 1 to {MAX_DIMS})")
        ne = [int(x) for x in dims]
        if any(x < 1 for x in ne):
            raise bad(name, f"has the dimensions {ne}; each must be at least 1")
        tid = int(raw_type[0])
        kind = KINDS.get(tid)
        if kind is None:
            try:
                tname = gguf.GGMLQuantizationType(tid).name
            except ValueError:
                raise bad(name, f"has the unknown type id {tid}") from None
            raise AuditError(f"{path}: tensor {name!r} is stored as {tname}, a GGUF type the audit does not decode "
                             f"(it reads {', '.join(k.name for k in KINDS.values())}); audit a GGUF converted to one of those")
        if ne[0] % kind.block:
            raise bad(name, f"has rows of {ne[0]} values, not whole {kind.name} blocks of {kind.block}")
        nbytes = math.prod(ne) // kind.block * kind.size
        off = int(offset[0])
        if off % alignment:
            raise bad(name, f"starts at data offset {off}, not a multiple of the file's alignment {alignment}")
        begin = start + off
        if begin + nbytes > size:
            raise AuditError(f"{path}: tensor {name!r} (bytes {begin}..{begin + nbytes}) runs past the end of the file ({size} bytes): "
                             "the file is truncated or its tensor offsets are wrong; re-download or re-convert it")
        if name in out:
            raise bad(name, "appears twice")
        out[name] = GGUFTensorInfo(name, tuple(reversed(ne)), kind, begin, begin + nbytes)
    pos, prev = start, None
    for t in sorted(out.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < pos:
            raise bad(t.name, f"overlaps {prev!r} (bytes {t.begin}..{t.end} against ..{pos})")
        if t.begin - pos >= alignment:
            raise bad(t.name, f"leaves a gap of {t.begin - pos} bytes before it (more than the alignment padding)")
        pos, prev = t.end, t.name
    if out and size - pos >= alignment:
        raise AuditError(f"{path}: corrupt GGUF file: {size - pos} bytes after the last tensor that no table entry describes; "
                         "re-download or re-convert it")
    return out


def read_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Parse and fully validate a GGUF file's header (see the module docstring); no tensor data is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(24)
    except FileNotFoundError:
        raise AuditError(f"{path}: no such file; pass the path of a .gguf file") from None
    except IsADirectoryError:
        raise AuditError(f"{path}: a directory, not a .gguf file") from None
    except PermissionError as e:
        raise AuditError(f"{path}: cannot read it ({e.strerror}); fix its permissions") from None
    if len(head) < 24:
        raise AuditError(f"{path}: too short to be a GGUF file ({size} bytes); re-download or re-convert it")
    if head[:4] != b"GGUF":
        raise AuditError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, a GGUF file with b'GGUF'); pass a .gguf written by llama.cpp")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise AuditError(f"{path}: GGUF version {version}; the audit reads versions 2 and 3 (little-endian)")
    if n_tensors * 24 + n_kv * 12 > size:  # each tensor entry takes at least 24 bytes, each metadata entry 12
        raise AuditError(f"{path}: corrupt GGUF header: it claims {n_tensors} tensors and {n_kv} metadata entries in a {size}-byte file; "
                         "re-download or re-convert it")
    try:
        reader = _reader_class()(path, "r")
    except AuditError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError) as e:
        raise AuditError(f"{path}: cannot read its GGUF header ({type(e).__name__}: {e}): the file is truncated or corrupt; "
                         "re-download or re-convert it") from None
    meta = {}
    gguf = _gguf()
    for name, field in reader.fields.items():
        try:
            meta[name] = len(field.data) if field.types and field.types[0] == gguf.GGUFValueType.ARRAY else field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            raise AuditError(f"{path}: corrupt GGUF metadata entry {name!r}; re-download or re-convert the file") from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise AuditError(f"{path}: the GGUF metadata has no general.architecture; re-convert it with llama.cpp's convert_hf_to_gguf.py")
    header = GGUFHeader(path, int(version), arch, meta, reader.checked, int(reader.alignment), int(reader.data_offset), size)
    del reader  # the header's values are copied out; its mapping of the file goes
    return header


# -- names ------------------------------------------------------------------------------------------


def gguf_names(arch: str, n_blocks: int, keys) -> tuple[dict[str, tuple[str, int | None, str]], list[str]]:
    """For each base tensor key: (GGUF name, expert index in the stacked tensor or None, gguf-py's MODEL_TENSOR name), by
    gguf-py's own table for ``arch``; and the keys the table cannot name."""
    gguf = _gguf()
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise AuditError(f"the GGUF's architecture {arch!r} is unknown to the installed gguf package; upgrade it (pip install -U gguf)")
    tmap = gguf.get_tensor_name_map(arch_id, n_blocks)
    out, unnamed = {}, []
    for key in keys:
        m = EXPERT_KEY.match(key)
        stem = f"{m['pre']}.{m['rest']}" if m else key  # per-expert keys go through the stacked tensor's name
        spellings = [stem]
        if re.search(r"_(bias|weight)$", stem):  # the converter renames e.g. gate.e_score_correction_bias -> gate.e_score_correction.bias
            spellings.append(re.sub(r"_(bias|weight)$", r".\1", stem))
        found = None
        for s in spellings:
            found = tmap.get_type_and_name(s, try_suffixes=(".weight", ".bias"))
            if found is not None:
                break
        if found is None:
            unnamed.append(key)
        else:
            out[key] = (found[1], int(m["e"]) if m else None, found[0].name)
    return out, unnamed


# -- the model --------------------------------------------------------------------------------------


class GGUFModel:
    """A GGUF file seen as the ablated model of ``base`` (a ModelDir): its tensors under the base's names (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, base):
        self.path = Path(path)
        self.base = base
        self.header = h = read_gguf(self.path)
        self.config = dict(base.config)
        self.arch = h.arch
        family = base.layout.family
        want = GGUF_ARCH.get(family)
        if want is not None and want != h.arch:
            raise AuditError(f"{self.path} is a GGUF of llama.cpp architecture {h.arch!r}, but the base {base.path} is {family} "
                             f"(llama.cpp converts it as {want!r}); pass the base this GGUF was converted from")
        self._check_metadata(base.layout)
        self.tensors = {n: TensorInfo(n, (t.end - t.begin,), "U8", self.path.name, t.begin, t.end) for n, t in h.tensors.items()}
        self.logical = self._place(base)
        self._layout: Layout | None = None

    # -- opening ---------------------------------------------------------------------------
    def _meta(self, key: str):
        return self.header.metadata.get(f"{self.arch}.{key}")

    def _check_metadata(self, lay: Layout) -> None:
        for key, have, want in (("embedding_length", self._meta("embedding_length"), lay.hidden_size),
                                ("expert_count", self._meta("expert_count"), lay.n_routed_experts or None)):
            if have is not None and want is not None and int(have) != int(want):
                raise AuditError(f"{self.path}: its metadata says {self.arch}.{key} = {have}, but the base {self.base.path} has {want}; "
                                 "it was converted from another model -- pass its base")
        blocks = self._meta("block_count")
        if blocks is not None and int(blocks) < lay.num_layers:
            raise AuditError(f"{self.path}: {self.arch}.block_count = {blocks}, but the base {self.base.path} has {lay.num_layers} layers; "
                             "it was converted from another model -- pass its base")

    def _place(self, base) -> dict[str, LogicalTensor]:
        h, cfg = self.header, base.config
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        blocks = int(self._meta("block_count") or base.layout.num_layers + int(text.get("num_nextn_predict_layers") or 0))
        names, unnamed = gguf_names(h.arch, blocks, base.logical)
        if unnamed:
            raise AuditError(f"{self.path}: gguf's name table for llama.cpp architecture {h.arch!r} has no name for {len(unnamed)} tensor(s) of "
                             f"the base ({', '.join(unnamed[:8])}{' ...' if len(unnamed) > 8 else ''}); the audit cannot place this family's "
                             "GGUF tensors -- audit the safetensors model instead")
        used: dict[str, set] = {}
        out: dict[str, LogicalTensor] = {}
        for key, (gname, expert, ttype) in names.items():
            t = h.tensors.get(gname)
            if t is None:
                continue  # missing from the file: the weights check reports it
            shape, begin, end, part = t.shape, t.begin, t.end, gname
            if expert is not None:
                if len(shape) < 2 or expert >= shape[0]:
                    raise AuditError(f"{self.path}: {gname} has shape {list(shape)}, so it cannot hold expert {expert} of {key}; "
                                     "it was converted from another model -- pass its base")
                per = (end - begin) // shape[0]
                shape, begin, end, part = shape[1:], begin + expert * per, begin + (expert + 1) * per, f"{gname}[{expert}]"
            used.setdefault(gname, set()).add(expert)
            heads = self._heads(ttype, shape, key) if h.arch in UNPERMUTE_ARCHS else 0
            kind = t.kind
            if kind.plain and not heads:  # a plain float tensor: read as it is
                info = TensorInfo(part, tuple(shape), kind.name, self.path.name, begin, end)
                out[key] = LogicalTensor(key, tuple(shape), f"GGUF {kind.name}", (info,))
            else:
                info = TensorInfo(part, (end - begin,), "U8", self.path.name, begin, end)
                out[key] = LogicalTensor(key, tuple(shape), f"GGUF {kind.name}", (info,), "gguf", None, (kind.id, heads))
        extra = sorted(n for n, t in h.tensors.items()
                       if (n not in used and n.split(".")[0] not in GENERATED)
                       or (n in used and None not in used[n] and len(used[n]) != t.shape[0]))
        if extra:
            raise AuditError(f"{self.path}: {len(extra)} GGUF tensor(s) stand for no tensor of the base {base.path} "
                             f"({', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}); it was converted from another model or another "
                             "architecture, or gguf's name table does not cover this family -- pass its base, or audit the safetensors model")
        return dict(sorted(out.items(), key=lambda kv: kv[1].begin))

    def _heads(self, ttype: str, shape: tuple, key: str) -> int:
        """The head count the q (ATTN_Q) or k (ATTN_K) rows of a llama-style converter were permuted with; 0 for other tensors."""
        if ttype not in ("ATTN_Q", "ATTN_K"):
            return 0
        text = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else self.config
        n = int(text.get("num_attention_heads") or 0)
        if ttype == "ATTN_K":
            n = int(text.get("num_key_value_heads") or n)
        rows = shape[0]
        if n <= 0 or rows % (2 * n):
            raise AuditError(f"{self.path}: {key} has {rows} rows, which {n} heads of llama.cpp's q/k permutation cannot split; "
                             "check the base's num_attention_heads / num_key_value_heads")
        return n

    # -- what the audit reads of a model -----------------------------------------------------
    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = build_layout(self.config, {k: v.shape for k, v in self.logical.items()}, source=str(self.path))
        return self._layout

    @property
    def nbytes(self) -> int:
        return sum(t.end - t.begin for t in self.header.tensors.values())

    @property
    def shards(self) -> list[str]:
        return [self.path.name]

    def file(self, shard: str) -> Path:
        return self.path

    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.header.tensors.values():
            out[t.kind.name] = out.get(t.kind.name, 0) + 1
        return out

    def summary(self) -> dict:
        """The file as results.json records it: architecture, version, tensor types."""
        return {"path": str(self.path.resolve()), "architecture": self.arch, "version": self.header.version, "bytes": self.header.size,
                "tensor_types": self.dtypes(), "file_type": self.header.metadata.get("general.file_type"),
                "name": self.header.metadata.get("general.name")}

    def close(self) -> None:
        pass

    def tokenizer(self):
        """The base's tokenizer (the GGUF's own vocabulary is the base's; its embedding's shape is checked against it)."""
        return self.base.tokenizer()

    def load_model(self, dtype="auto", device=None, max_memory=None, offload_folder=None, inputs=()):
        """The base's architecture with this file's dequantized values (every tensor decoded into memory, in ``dtype``)."""
        from audit.model.loading import load_state_dict

        missing = sorted(set(self.base.logical) - set(self.logical))
        if missing:
            raise AuditError(f"{self.path}: lacks {len(missing)} tensor(s) of the base ({', '.join(missing[:5])}); the model cannot run without them")
        if device == "auto" or max_memory or offload_folder:
            raise AuditError("--device auto / --max-memory / --offload-folder place safetensors models; a GGUF is dequantized into memory "
                             "(use --server with llama-server for big GGUF models)")
        return load_state_dict(self, self.base.path, dtype, device).eval()

