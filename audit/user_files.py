"""Files the user points at that are not model directories (configs, gates, prompts, directions, completions, results),
read with bounds: each must be a regular file (a named pipe, a device or a folder is said to be what it is, never
waited on), YAML is read only up to a size, a nesting depth and an expanded size (anchors and aliases counted as what
they expand to: a "billion laughs" file is refused before anything is built), with no duplicate key, and validated
against its JSON Schema (checks/schemas/) with messages that name the file, the key and what it takes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from functools import lru_cache
from pathlib import Path
from typing import Any

from checks.errors import AuditError

SCHEMAS = Path(__file__).resolve().parents[1] / "checks" / "schemas"
MAX_YAML_BYTES = 1 << 20  # a config or gate file is a few KB; 1 MiB is far beyond any real one
MAX_YAML_NODES = 100_000  # scalars, lists and mappings once anchors and aliases are expanded
MAX_YAML_DEPTH = 32


def regular_file(path: str | os.PathLike, kind: str) -> Path:
    """``path`` when it is a regular file (through symlinks); an AuditError saying what it is otherwise."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise AuditError(f"{p}: no such {kind} file" + (" (a broken symlink)" if p.is_symlink() else "")) from None
    except OSError as e:  # a symlink loop, a path through a file, no permission
        if e.errno == errno.ELOOP:
            raise AuditError(f"{p}: is a symlink loop (its links lead back to themselves), not a {kind} file; replace it with the file") from None
        raise AuditError(f"{p}: cannot read this {kind} file ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode):
        return p
    what = ("a folder" if stat.S_ISDIR(st.st_mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
    raise AuditError(f"{p}: is {what}, not a {kind} file; pass the path of a regular file")


# -- YAML -------------------------------------------------------------------------------------------


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """yaml.SafeLoader that refuses a key given twice in one mapping (the last would win silently)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for k, _ in node.value:
                if k.tag == "tag:yaml.org,2002:merge":  # "<<: *base": merged keys may be overridden, that is the point
                    continue
                key = self.construct_object(k, deep=True)
                try:
                    if key in seen:
                        raise AuditError(f"line {k.start_mark.line + 1}: key {key!r} is given twice (also on line {seen[key] + 1}); "
                                         "keep one")
                    seen[key] = k.start_mark.line
                except TypeError:  # an unhashable key: SafeLoader says so below
                    pass
            return super().construct_mapping(node, deep=deep)

    return Loader


def _expanded_size(node, memo: dict, depth: int = 0) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (shared nodes counted at each use)."""
    if depth > MAX_YAML_DEPTH:
        raise AuditError(f"nested more than {MAX_YAML_DEPTH} levels deep")
    if id(node) in memo:
        return memo[id(node)]
    size = 1
    if isinstance(node.value, list):
        for item in node.value:
            for child in (item if isinstance(item, tuple) else (item,)):
                size += _expanded_size(child, memo, depth + 1)
                if size > MAX_YAML_NODES:
                    raise AuditError(f"stands for more than {MAX_YAML_NODES:,} values once its anchors and aliases are expanded")
    memo[id(node)] = size
    return size


def read_yaml(path: str | os.PathLike, kind: str) -> Any:
    """The content of a YAML file, read with the bounds above; AuditError naming the file otherwise."""
    import yaml

    p = regular_file(path, kind)
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise AuditError(f"{p}: {size:,} bytes; a {kind} file is at most {MAX_YAML_BYTES:,} (it holds a few settings)")
    try:
        text = p.read_text(encoding="utf-8")
        loader = _loader()(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node, {})
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except AuditError as e:
        raise AuditError(f"{p}: {e}") from None
    except RecursionError:
        raise AuditError(f"{p}: nested more than {MAX_YAML_DEPTH} levels deep") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise AuditError(f"{p}: not valid YAML ({e})") from None


# -- JSON Schema ------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _validator(name: str):
    """checks/schemas/{name}.schema.json's validator; a tuple counts as an array (configs built in code use them)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("array", lambda _, x: isinstance(x, (list, tuple)))
    cls = jsonschema.validators.extend(base, type_checker=checker)
    return cls(json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8")))


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nonfinite(data, path=()):
    """The path of the first NaN or infinite number in ``data`` (YAML's .nan / .inf), or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return path
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for k, v in items:
        found = _nonfinite(v, (*path, k))
        if found is not None:
            return found
    return None


def validate(data: Any, schema: str, source: str) -> None:
    """``data`` against checks/schemas/{schema}.schema.json; AuditError "SOURCE: KEY: what is wrong; what KEY takes"."""
    from jsonschema.exceptions import best_match

    bad = _nonfinite(data)
    if bad is not None:
        raise AuditError(f"{source}: {_where(bad) or 'the file'}: must be a finite number, not {_at(data, bad)}")
    validator = _validator(schema)
    err = best_match(validator.iter_errors(data))
    if err is None:
        return
    where = _where(err.absolute_path)
    at = f"{source}: {where}" if where else source
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(str(k) for k in err.instance if k not in allowed)
        raise AuditError(f"{at}: unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(allowed)}")
    shown = json.dumps(err.instance, default=str)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    reason = f" ({err.message})" if len(err.message) <= 100 and err.validator not in ("pattern", "enum", "oneOf") else ""
    takes = _description(validator, list(err.absolute_path))
    what = f"unknown {shown}" if err.validator == "enum" else f"{shown} is not allowed{reason}"
    raise AuditError(f"{at}: {what}" + (f"; {where or 'the file'} takes {takes}" if takes else ""))


def _description(validator, path: list) -> str | None:
    """The description of the nearest schema (walking down ``path`` from the root) that has one: what the key takes."""
    root = validator.schema

    def resolve(s):  # our schemas refer only within themselves: "#/$defs/name"
        while isinstance(s, dict) and str(s.get("$ref", "")).startswith("#/"):
            ref, s = s["$ref"], root
            for key in ref[2:].split("/"):
                s = s[key]
        return s

    schema, found = resolve(root), None
    for part in path:
        found = schema.get("description", found) if isinstance(schema, dict) else found
        options = [resolve(o) for o in schema.get("oneOf", [])] if isinstance(schema, dict) else []
        nxt = None
        for s in [schema, *options]:
            if not isinstance(s, dict):
                continue
            if isinstance(part, str) and part in s.get("properties", {}):
                nxt = s["properties"][part]
            elif isinstance(part, int) and ("items" in s or "prefixItems" in s):
                nxt = (s.get("prefixItems") or [])[part] if part < len(s.get("prefixItems") or []) else s.get("items")
            if nxt is not None:
                break
        if nxt is None:
            return found
        found = nxt.get("description", found) if isinstance(nxt, dict) else found
        schema = resolve(nxt)
    return schema.get("description", found) if isinstance(schema, dict) else found


def _at(data, path):
    for k in path:
        data = data[k]
    return data
