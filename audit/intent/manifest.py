"""The ablation manifest `audit ablate` writes into its output (what was meant, what was written, from which base):
its names and its reading, light enough for the CLI to find an ablation's base before anything heavy is imported."""

from __future__ import annotations

import json
import os
from pathlib import Path

from checks.errors import AuditError

MANIFEST_NAME = "ablation-manifest.json"
DIRECTIONS_NAME = "directions.safetensors"
TOOL = "moe-ablation-audit"


def load_manifest(model_dir_path: str | os.PathLike) -> dict | None:
    """OUT's ablation manifest, or None when the directory has none; AuditError when it is unreadable."""
    p = Path(model_dir_path) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError, RecursionError) as e:
        raise AuditError(f"{p}: unreadable ablation manifest ({e or 'nested too deeply'}); re-run `audit ablate` or delete the file") from None
    if not isinstance(m, dict) or m.get("tool") != TOOL or "modified" not in m:
        raise AuditError(f"{p}: not an ablation manifest written by {TOOL}")
    return m


def manifest_base(model_dir_path: str | os.PathLike) -> str | None:
    """The base model an ablation of ours names in its manifest (None without a manifest or a base)."""
    m = load_manifest(model_dir_path) if Path(model_dir_path).is_dir() else None
    base = (m or {}).get("base") or {}
    return base.get("path") if isinstance(base, dict) and isinstance(base.get("path"), str) else None
