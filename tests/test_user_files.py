"""audit/user_files.py: files the user points at are regular files, YAML is read with bounds, and configs and gates are
checked against their JSON Schemas with messages naming the file and the key (issues 26 and 31)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from audit.intent.config import MAX_SCALE, load_config
from audit.pipeline.gate_file import gate_config
from audit.user_files import MAX_YAML_BYTES, SCHEMAS, read_yaml, regular_file, validate
from checks.errors import AuditError
from checks.gate import CHECKS, CONDITIONS
from checks.layout import TARGETS

LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n" for i in range(9))


def test_the_schemas_name_what_the_code_knows():
    """The schema files list the target groups, conditions and checks the code has: a new one in code fails here until
    its schema says it too."""
    cfg = json.loads((SCHEMAS / "config.schema.json").read_text())
    gate = json.loads((SCHEMAS / "gate.schema.json").read_text())
    assert tuple(cfg["$defs"]["target"]["enum"]) == TARGETS
    assert cfg["properties"]["scale"]["maximum"] == cfg["$defs"]["entry"]["properties"]["scale"]["maximum"] == MAX_SCALE
    assert tuple(gate["properties"]["must_ablate"]["items"]["enum"]) == TARGETS
    names = set(CONDITIONS)
    assert set(gate["properties"]) == names | {"optional", "required", "waive"}
    assert set(gate["$defs"]["conditions"]["oneOf"][0]["enum"]) == names
    assert tuple(gate["properties"]["waive"]["oneOf"][0]["enum"]) == CHECKS


def test_a_fifo_a_folder_or_a_missing_file_is_said_to_be_what_it_is(tmp_path):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    t = time.monotonic()
    with pytest.raises(AuditError, match=r"cfg.yaml: is a named pipe \(FIFO\), not a config file"):
        load_config(fifo)  # never opened: opening a FIFO with no writer would wait forever
    assert time.monotonic() - t < 5
    with pytest.raises(AuditError, match="is a folder, not a gate file"):
        regular_file(tmp_path, "gate")
    with pytest.raises(AuditError, match="no such prompt file"):
        regular_file(tmp_path / "none.txt", "prompt")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(AuditError, match="is a symlink loop"):
        regular_file(loop, "config")


@pytest.mark.parametrize("name,text,says", [
    ("duplicate key", "scale: 1\nablate: [{layer: 1}]\nscale: 2\n", "line 3: key 'scale' is given twice (also on line 1)"),
    ("billion laughs", LAUGHS + "model: *l8\n", "more than 100,000 values once its anchors and aliases are expanded"),
    ("deep flow nesting", "ablate: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 32 levels deep"),
    ("deep block nesting", "ablate:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(1, 60)) + "  " * 60 + "- 1\n", "nested more than"),
    ("not yaml", "ablate: [{layer: 1", "not valid YAML"),
])
def test_yaml_is_bounded_before_anything_is_built(tmp_path, name, text, says):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    t = time.monotonic()
    with pytest.raises(AuditError, match=f"^{str(f)}: .*" if name == "not yaml" else None) as e:
        read_yaml(f, "config")
    assert says in str(e.value) and str(f) in str(e.value)
    assert time.monotonic() - t < 10  # bounded: the old reader ran out of memory or past 120 s


def test_a_huge_yaml_is_refused_by_its_size_without_being_read(tmp_path):
    f = tmp_path / "big.yaml"
    with open(f, "wb") as h:
        h.truncate(50 << 20)  # 50 MB (sparse): parsing it took minutes
    t = time.monotonic()
    with pytest.raises(AuditError, match=f"big.yaml: 52,428,800 bytes; a gate file is at most {MAX_YAML_BYTES:,}"):
        read_yaml(f, "gate")
    assert time.monotonic() - t < 5


def test_merge_keys_may_override_what_they_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ablate:\n  - &e {layer: 1, scale: 0.5}\n  - {<<: *e, layer: 2, scale: 0.7}\n")
    assert [(e.layer, e.scale) for e in load_config(f).entries] == [(1, 0.5), (2, 0.7)]


@pytest.mark.parametrize("text,says", [
    ("scale: 1.0e+308\nablate: [{layer: 1}]\n", "scale: 1e+308 is not allowed (1e+308 is greater than the maximum of 100); scale takes"),
    ("scale: 1.0e+30\nablate: [{layer: 1}]\n", "scale: 1e+30 is not allowed"),
    ("ablate: [{layer: 1, scale: .nan}]\n", "ablate[0].scale: must be a finite number, not nan"),
    ("ablate: [{layer: '0-99999999999'}]\n", "ablate[0].layer: \"0-99999999999\" is not allowed; ablate[0].layer takes a layer index (0 to 65535) or a range"),
    ("ablate: [{layer: '0-70000'}]\n", "ablate[0]: layer range '0-70000' goes past layer 65535"),
    ("ablate: [{layer: 1}]\nwibble: 3\n", "unknown key(s) 'wibble'; allowed: ablate, biprojection"),
    ("method: fast\nablate: [{layer: 1}]\n", "method: unknown \"fast\"; method takes standard or norm_preserving"),
])
def test_config_values_are_checked_by_the_schema_naming_file_and_key(tmp_path, text, says):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    t = time.monotonic()
    with pytest.raises(AuditError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: ") and says in str(e.value), str(e.value)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("text,says", [
    ("max_refusal_after: -0.5\n", "max_refusal_after: -0.5 is not allowed (-0.5 is less than the minimum of 0); max_refusal_after takes"),
    ("max_refusal_after: 5\n", "max_refusal_after: 5 is not allowed (5 is greater than the maximum of 1)"),
    ("max_kl: -1\n", "max_kl: -1 is not allowed"),
    ("optional: [nope]\n", "optional[0]: unknown \"nope\"; optional[0] takes a list of conditions"),
    ("optional: " + "x" * 10 + "\n" + LAUGHS.replace("l", "q") + "waive: *q8\n", "anchors and aliases"),
    ("gate:\n  max_kl: 0.5\n  max_kl: 0.7\n", "key 'max_kl' is given twice"),
])
def test_gate_values_are_checked_by_the_schema_naming_file_and_key(tmp_path, text, says):
    f = tmp_path / "gate.yaml"
    f.write_text(text)
    with pytest.raises(AuditError) as e:
        gate_config(str(f))
    assert str(e.value).startswith(f"{f}") and says in str(e.value), str(e.value)


def test_required_is_a_list_of_condition_names_in_the_gates_schema():
    validate({"required": ["max_kl", "max_refusal_after"], "optional": "max_unknown"}, "gate", "g.yaml")
    with pytest.raises(AuditError, match=r"g.yaml: required\[0\]: unknown \"max_refusal\""):
        validate({"required": ["max_refusal"]}, "gate", "g.yaml")


def test_a_pyproject_gate_table_is_checked_too(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.audit.gate]\nmax_unknown = 2\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AuditError, match=r"pyproject.toml \[tool.audit.gate\]: max_unknown: 2 is not allowed"):
        gate_config(None)
    assert Path("pyproject.toml").is_file()
