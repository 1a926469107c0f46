"""SHA-256 of every file a run reads, so that a verdict names the exact bytes it judged.

Each file is streamed once through hashlib in 8 MiB reads into one reused buffer (hashlib releases the interpreter
lock on large updates, so ``WORKERS`` threads hash files side by side at the speed the disk or page cache gives;
``benchmarks/bench_hash.py`` times it against ``sha256sum``). A file in the Hugging Face cache needs no reading:
a snapshot's weights are symlinks to ``blobs/<sha256 of the content>`` (Git LFS files are stored under their
SHA-256), so that name is the hash, recorded with ``source: hf-cache-blob``. Smaller files there (config.json,
tokenizer files) are blobs named by their git SHA-1, and are hashed. `audit verify` always re-hashes.

Each record says which input it is (``role``), the folder it was found in (``root``) and its name there (``name``),
so `audit verify` can look for the same file in another copy of the model.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checks.errors import AuditError

CHUNK = 8 << 20
WORKERS = 2
HF_BLOB = re.compile(r"^[0-9a-f]{64}$")  # an LFS blob: named by the SHA-256 of its content
# what of a model directory a run reads besides its weight shards
MODEL_SIDE_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "ablation-manifest.json", "directions.safetensors")


def hf_blob_sha256(path: Path) -> str | None:
    """The SHA-256 a Hugging Face cache file is stored under (a symlink into ``blobs/`` named by 64 hex digits), else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target.name if target.parent.name == "blobs" and HF_BLOB.match(target.name) else None


def sha256_file(path: Path, buf: bytearray | None = None) -> str:
    """The SHA-256 of a file, streamed in CHUNK reads into ``buf``."""
    h = hashlib.sha256()
    buf = buf if buf is not None else bytearray(CHUNK)
    mv = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                h.update(mv[:n])
    except FileNotFoundError:
        raise AuditError(f"{path}: no such file (it was there when the run started); hash a stable copy") from None
    except PermissionError as e:
        raise AuditError(f"{path}: cannot read it to hash it ({e.strerror}); fix its permissions") from None
    return h.hexdigest()


def model_files(md) -> list[tuple[Path, str]]:
    """(root, name) of each file of a model the audit reads: a GGUF file itself, or a directory's shards and side files."""
    path = Path(md.path)
    if path.is_file():
        return [(path.parent, path.name)]
    names = list(md.shards) + [n for n in MODEL_SIDE_FILES if (path / n).is_file()]
    return [(path, n) for n in dict.fromkeys(names)]


def input_entries(role: str, source) -> list[tuple[str, Path, str]]:
    """(role, root, name) for one input: a model (ModelDir / GGUFModel), a file path, or None (nothing)."""
    if source is None:
        return []
    if hasattr(source, "shards"):
        return [(role, r, n) for r, n in model_files(source)]
    p = Path(source)
    if not p.is_file():
        return []  # a datasets name, or a folder that is not a model: nothing to hash here
    return [(role, p.absolute().parent, p.name)]


def hash_inputs(entries: list[tuple[str, Path, str]], reuse_hf: bool = True, workers: int = WORKERS) -> dict:
    """Hash each (role, root, name) once (a file under two roles is read once); returns {"files": [...], "bytes", "bytes_hashed",
    "seconds", "workers"} with one record per entry: role, root, name, bytes, sha256, source (computed / hf-cache-blob)."""
    t0 = time.perf_counter()
    entries = list(dict.fromkeys((role, Path(root), name) for role, root, name in entries))
    seen: dict[str, dict] = {}
    todo = []
    for role, root, name in entries:
        p = Path(root) / name
        key = os.path.realpath(p)
        if key in seen:
            continue
        rec = {"bytes": p.stat().st_size}
        blob = hf_blob_sha256(p) if reuse_hf else None
        if blob is not None:
            rec.update(sha256=blob, source="hf-cache-blob")
        else:
            rec["source"] = "computed"
            todo.append((key, p))
        seen[key] = rec
    todo.sort(key=lambda kp: -seen[kp[0]]["bytes"])  # largest first: the threads finish together
    bufs: dict[int, bytearray] = {}

    def one(kp):
        import threading

        buf = bufs.setdefault(threading.get_ident(), bytearray(CHUNK))
        return kp[0], sha256_file(kp[1], buf)

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="audit-hash") as ex, \
            tqdm(total=sum(seen[k]["bytes"] for k, _ in todo), desc="sha256", unit="B", unit_scale=True, disable=None, leave=False) as bar:
        for key, digest in ex.map(one, todo):  # a bar on a terminal only (disable=None), quiet in CI
            seen[key]["sha256"] = digest
            bar.update(seen[key]["bytes"])
    files = []
    for role, root, name in entries:
        rec = seen[os.path.realpath(Path(root) / name)]
        files.append({"role": role, "root": str(Path(root).absolute()), "name": name, **rec})
    return {"files": files, "bytes": sum(r["bytes"] for r in seen.values()),
            "bytes_hashed": sum(r["bytes"] for r in seen.values() if r["source"] == "computed"),
            "seconds": round(time.perf_counter() - t0, 3), "workers": workers}
