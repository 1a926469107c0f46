"""results.json on disk: stable, diff-friendly writing and validated reading.

Keys are sorted and floats rounded to a fixed number of significant digits, so two runs that
measured the same thing write the same bytes (CI artifacts can be diffed). NaN/Inf become null.
The file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from checks.errors import AuditError
from checks.findings import jsonable

SCHEMA_VERSION = 1  # major version understood; results.json writes "1.x" (checks/schemas/results.schema.json)
FLOAT_DIGITS = 8  # significant digits kept in results.json


def dumps_results(results: dict) -> str:
    """The canonical text of results.json."""
    return json.dumps(jsonable(results, FLOAT_DIGITS), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder (fsynced, the user's umask), then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes it private; an output gets the user's umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_results_json(results: dict, path: str | os.PathLike) -> Path:
    """Write results.json atomically."""
    return write_text_atomic(path, dumps_results(results))


def _major(version: Any) -> int | None:
    """Major schema version of 1, "1" or "1.3"; None when unreadable."""
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version
    m = re.fullmatch(r"(\d+)(?:\.\d+)*", str(version).strip())
    return int(m.group(1)) if m else None


def load_results(path: str | os.PathLike) -> dict:
    """Read a results.json written by `audit run`; clear AuditError if it is missing, not JSON or too new."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise AuditError(f"{path}: no such results file. Pass the results.json that `audit run` wrote (or its output folder).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(f"{path}: not valid JSON ({e}). Re-run `audit run` to regenerate it.") from None
    if not isinstance(data, dict):
        raise AuditError(f"{path}: expected a JSON object at the top level, found {type(data).__name__}.")
    version = data.get("schema_version", SCHEMA_VERSION)
    if _major(version) is None or _major(version) > SCHEMA_VERSION:
        raise AuditError(f"{path}: schema_version {version!r} is newer than this tool understands ({SCHEMA_VERSION}). "
                         "Upgrade moe-ablation-audit.")
    return data
