"""results.json: its one canonical text (validated against its schema) and validated reading.

Keys are sorted and floats rounded to a fixed number of significant digits, so two runs that
measured the same thing write the same bytes (CI artifacts can be diffed). NaN/Inf become null.
Every results.json the tool writes is checked against checks/schemas/results.schema.json first
(audit/pipeline/write.py writes it, through audit/outputs.py: a reader never sees half a file).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from checks.errors import AuditError
from checks.findings import jsonable

SCHEMA_VERSION = "1.0"  # the results.json format this tool writes; a reader takes any 1.x (checks/schemas/results.schema.json)
FLOAT_DIGITS = 8  # significant digits kept in results.json
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "checks" / "schemas" / "results.schema.json"


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def validate_results(doc: dict) -> None:
    """``doc`` against checks/schemas/results.schema.json; a mismatch is this tool's bug (ValueError naming where)."""
    from jsonschema.exceptions import best_match

    err = best_match(_validator().iter_errors(doc))
    if err is not None:
        raise ValueError(f"results.json does not match {SCHEMA_FILE.name} at {err.json_path}: {err.message}")


def dumps_results(results: dict) -> str:
    """The canonical text of results.json (rounded, sorted, NaN/Inf as null), validated against its schema: every
    results.json this tool writes goes through here."""
    doc = jsonable(results, FLOAT_DIGITS)
    validate_results(doc)
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


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
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AuditError(f"{path}: not valid JSON ({e}). Re-run `audit run` to regenerate it.") from None
    if not isinstance(data, dict):
        raise AuditError(f"{path}: expected a JSON object at the top level, found {type(data).__name__}.")
    version = data.get("schema_version", SCHEMA_VERSION)
    if _major(version) is None or _major(version) > _major(SCHEMA_VERSION):
        raise AuditError(f"{path}: schema_version {version!r} is newer than this tool understands ({SCHEMA_VERSION}). "
                         "Upgrade moe-ablation-audit.")
    return data
