"""The gate an `audit run` is held to: a YAML file (--gate), else ./pyproject.toml's [tool.audit.gate], else the defaults;
validated against checks/schemas/gate.schema.json before anything is loaded (the CLI reads it right after the flags)."""

from __future__ import annotations

from pathlib import Path

from audit.user_files import read_yaml, validate
from checks.errors import AuditError
from checks.gate import GateConfig


def gate_config(path: str | None):
    """The gate: a YAML file (``gate:`` at its top, or the thresholds themselves), else ./pyproject.toml's [tool.audit.gate],
    else the defaults; validated against checks/schemas/gate.schema.json with messages naming the file and the key."""
    if path is None:
        pp = Path("pyproject.toml")
        if pp.is_file():
            import tomllib

            try:
                data = tomllib.loads(pp.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise AuditError(f"{pp.resolve()}: not valid TOML ({e})") from None
            tbl = data.get("tool", {}).get("audit", {}).get("gate")
            if tbl is not None:
                source = f"{pp.resolve()} [tool.audit.gate]"
                validate(tbl, "gate", source)
                return GateConfig.from_dict(tbl, source), source
        return GateConfig(), "defaults"
    p = Path(path)
    d = read_yaml(p, "gate") or {}
    if not isinstance(d, dict):
        raise AuditError(f"{p}: a gate file is a mapping of thresholds, e.g. max_refusal_after: 0.1")
    d = d.get("gate", d)
    validate(d, "gate", str(p))
    return GateConfig.from_dict(d, str(p)), str(p)


def gate_record(cfg: GateConfig, source: str) -> dict:
    """The gate a run used, as results.json records it (``run.gate_config``): what `audit verify` evaluates the recorded checks with."""
    return {"source": source, "limits": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.limits.items()},
            "optional": sorted(cfg.optional), "required": sorted(cfg.required), "waive": sorted(cfg.waive)}


def gate_from_record(rec: dict) -> GateConfig:
    return GateConfig(optional=rec.get("optional", ()), waive=rec.get("waive", ()), required=rec.get("required", ()),
                      source=f"the recorded gate ({rec.get('source')})", **(rec.get("limits") or {}))
