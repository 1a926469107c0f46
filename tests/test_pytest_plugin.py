"""The pytest plugin (audit/pytest_plugin.py) as a team's CI uses it: `pytest --audit-model=DIR --audit-base=BASE` in a
folder with no test file, on ablations of the glm4_moe organism (one sound, one unsound made "by another tool").

Each scenario runs one audit (small budgets) and then reuses it from pytest's cache; the items pytest reports are held
to the results.json and junit.xml the same audit wrote.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from audit.ablation.ablate import MANIFEST_NAME, ablate
from audit.forward.measure import measure_directions
from audit.intent.config import AblationConfig
from audit.model.directory import ModelDir
from audit.model.prompts import load_prompts
from audit.organisms.build import cached_organism, read_meta
from audit.pipeline.gate_file import gate_config
from audit.pipeline.options import RunOptions
from audit.pytest_plugin import inputs_hash, outcomes
from checks.gate import GateConfig, evaluate_gate
from reports.junit import build_junit

pytest_plugins = ("pytester",)  # pytest in this process, for a usage error that needs torch loaded (a new process takes ~15 s here)

BUDGET = ["--audit-limit=16", "--audit-max-new-tokens=16"]  # flags as one word each: see test_a_path_given_as_a_second_word_is_refused
ALL_WRITERS = ["embed", "attn_out", "mlp_down", "experts_down", "shared_down"]


@pytest.fixture(scope="module")
def organism():
    """(base path, its directions), measured once for the module."""
    path = cached_organism("glm4_moe", "base", 0)
    dirs = measure_directions(ModelDir(path), load_prompts(str(path / "prompts" / "train_harmful.txt"), "harmful"),
                              load_prompts(str(path / "prompts" / "train_harmless.txt"), "harmless"))
    return path, dirs


def _ablate(organism, out: Path, components: list[str], layers: list[int]) -> Path:
    path, dirs = organism
    m = read_meta(path)["separating_index"]
    ablate(path, AblationConfig.from_dict({"components": components, "ablate": [{"layer": l, "measurement": m} for l in layers]}), out,
           directions=dirs)
    return out


def _pytest(folder: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """pytest in ``folder`` as a CI job runs it (its own process; no addopts from this session)."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {"COLUMNS": "300"}  # summary lines uncut
    return subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:randomly", *args], cwd=folder, capture_output=True,
                          text=True, env={**base_env, **(env or {})})


def _cases(path: Path) -> dict[tuple[str, str], ET.Element]:
    """(classname, name) -> testcase element of a junit.xml (the audit's, or the one pytest --junitxml wrote)."""
    return {(c.get("classname"), c.get("name")): c for c in ET.parse(path).getroot().iter("testcase")}


def _outcome(case: ET.Element) -> str:
    skipped = case.find("skipped")
    if case.find("failure") is not None or case.find("error") is not None:
        return "fail"
    if skipped is not None:
        return "xfail" if skipped.get("type") == "pytest.xfail" else "skip"
    return "pass"


def _held_to_the_audit(folder: Path, run: subprocess.CompletedProcess, out: str = "audit-out") -> dict:
    """The run's items are the audit's junit.xml test cases, one per check and per gate threshold, with the gate's outcomes."""
    report_dir = folder / out
    results = json.loads((report_dir / "results.json").read_text())
    ours, audits = _cases(folder / "pytest-junit.xml"), _cases(report_dir / "junit.xml")
    assert set(ours) == set(audits), (sorted(ours), sorted(audits))  # the same names as `audit run`'s junit.xml
    rows = results["gate"]["thresholds"]
    assert len(ours) == len(results["checks"]) + len(rows)  # one item per check and one per threshold row
    report = f"{(report_dir / 'report.html').resolve()}"
    for row in rows:
        case = ours["moe-ablation-audit.gate", row["name"]]
        expected = {"pass": "pass", "not-applicable": "skip", "skipped": "skip", "waived": "xfail"}.get(row["state"], "fail")
        assert _outcome(case) == expected, (row, ET.tostring(case))
        if expected == "fail":
            text = case.find("failure").get("message")
            assert row["message"] in text and f"read: {report}#gate" in text
        if expected == "skip":
            assert row["message"] in case.find("skipped").get("message")
    for key, check in results["checks"].items():
        case = ours["moe-ablation-audit.checks", check.get("name") or key]
        waived = any(r.get("check") == key and r["state"] == "waived" for r in rows)
        assert _outcome(case) == ("pass" if check["status"] != "fail" else "xfail" if waived else "fail"), (key, check["status"])
        if check["status"] == "fail" and not waived:
            text = case.find("failure").get("message")
            assert f"read: {report}#check-{key}" in text
            assert all(f["message"] in text for f in check["findings"] if f["severity"] == "fail")
    assert f"report: {report}" in run.stdout  # the terminal summary names the report
    assert run.returncode == (0 if results["verdict"] == "pass" else 1), run.stdout[-3000:] + run.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def sound(organism, tmp_path_factory):
    """A sound ablation (our own, every writer at every layer) audited once in a folder with no test file."""
    folder = tmp_path_factory.mktemp("ci-sound")
    model = _ablate(organism, tmp_path_factory.mktemp("models") / "sound", ALL_WRITERS, [0, 1, 2, 3])
    flags = [f"--audit-model={model}", f"--audit-base={organism[0]}", *BUDGET]
    return folder, model, flags, _pytest(folder, *flags, "--junitxml=pytest-junit.xml")


def test_a_sound_ablation_passes_every_item(sound):
    folder, _, _, run = sound
    assert "auditing" in run.stdout and "not re-run" not in run.stdout  # this one ran the audit
    results = _held_to_the_audit(folder, run)
    assert results["verdict"] == "pass" and run.returncode == 0
    assert "no tests ran" not in run.stdout and " passed" in run.stdout
    # the only skip: the capability threshold, which does not apply where the base answers the embedded MMLU items at chance,
    # as the organism does (issue 29; the check itself reports skip and its item passes)
    na = [t["name"] for t in results["gate"]["thresholds"] if t["state"] == "not-applicable"]
    assert na == ["max_capability_drop"] and results["checks"]["capability"]["status"] == "skip" and re.search(r"\b1 skipped", run.stdout), run.stdout[-1500:]


def test_the_second_run_reuses_the_cached_audit(sound):
    folder, _, flags, first = sound
    before = (folder / "audit-out" / "results.json").stat()
    again = _pytest(folder, *flags, "--junitxml=pytest-junit.xml")
    assert "inputs unchanged since the cached audit" in again.stdout and "not re-run" in again.stdout
    assert "[audit] weights" not in again.stderr + again.stdout  # no stage of the audit ran
    after = (folder / "audit-out" / "results.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # the output folder was not rewritten
    _held_to_the_audit(folder, again)
    assert again.returncode == first.returncode == 0


def test_the_fixture_and_the_ini_options_serve_a_teams_own_tests(sound, organism):
    """pytest.ini instead of flags (paths relative to it), the plugin named in conftest.py with autoloading off, the
    `audit` fixture in the team's own test file; a new audit_out is written from the cache, not by a new audit."""
    folder, model, _, _ = sound
    (folder / "pytest.ini").write_text(f"[pytest]\naudit_model = {os.path.relpath(model, folder)}\naudit_base = {organism[0]}\n"
                                       "audit_limit = 16\naudit_max_new_tokens = 16\naudit_out = audit-out-2\n")
    (folder / "conftest.py").write_text('pytest_plugins = ["audit.pytest_plugin"]\n')
    (folder / "test_release.py").write_text(
        "import json, pathlib\n\n"
        "def test_refusal_low(audit):\n"
        "    assert audit['checks']['refusal']['data']['after']['rate'] < 0.05\n\n"
        "def test_the_fixture_is_results_json(audit):\n"
        "    assert audit == json.loads((pathlib.Path(__file__).parent / 'audit-out' / 'results.json').read_text())\n")
    run = _pytest(folder, env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "not re-run" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert "PASSED test_release.py::test_refusal_low" in run.stdout and "PASSED test_release.py::test_the_fixture_is_results_json" in run.stdout
    assert (folder / "audit-out-2" / "results.json").read_text() == (folder / "audit-out" / "results.json").read_text()
    assert run.returncode == 0, run.stdout[-3000:]


def test_an_unsound_foreign_ablation_fails_with_the_findings(organism, tmp_path):
    """Attention at one layer only, made "by another tool" (no manifest: nothing states the intent): the refusal items
    fail with their messages, the intent threshold is skipped as not applicable, the exit code is 1."""
    model = _ablate(organism, tmp_path / "models" / "unsound", ["attn_out"], [1])
    (model / MANIFEST_NAME).unlink()  # our own copy: now it reads like an ablation made by another tool
    folder = tmp_path / "ci"
    folder.mkdir()
    run = _pytest(folder, f"--audit-model={model}", f"--audit-base={organism[0]}", *BUDGET, "--junitxml=pytest-junit.xml")
    results = _held_to_the_audit(folder, run)
    assert results["verdict"] == "fail" and run.returncode == 1
    states = {r["name"]: r["state"] for r in results["gate"]["thresholds"]}
    assert states["max_refusal_after"] == "fail" and states["forbid_unintended"] == "not-applicable", states
    assert "FAILED moe-ablation-audit.gate::max_refusal_after - refusal rate on harmful prompts after ablation" in run.stdout
    assert "SKIPPED [1] audit-out/report.html: tensors changed outside the stated intent: not applicable" in run.stdout


def test_bad_input_is_a_usage_error_not_a_traceback(organism, tmp_path, pytester):
    missing = _pytest(tmp_path, f"--audit-model={tmp_path / 'nope'}")
    assert missing.returncode == 4 and "ERROR: --audit-model:" in missing.stderr and "does not exist" in missing.stderr
    zero = _pytest(tmp_path, f"--audit-model={organism[0]}", "--audit-limit=0")
    assert zero.returncode == 4 and "--audit-limit: must be at least 1" in zero.stderr
    alone = _pytest(tmp_path, "--audit-limit=3")
    assert alone.returncode == 4 and "without --audit-model" in alone.stderr
    for r in (missing, zero, alone):
        assert "Traceback" not in r.stdout + r.stderr and "INTERNALERROR" not in r.stdout + r.stderr
    # a bad gate file is found when the session starts collecting (in this process: torch is loaded already)
    gate = tmp_path / "gate.yaml"
    gate.write_text("max_refusal: 0.1\n")
    other = tmp_path / "another-base"  # a base that is not the model itself (that would be refused first, as its own mistake)
    other.mkdir()
    bad = pytester.runpytest_inprocess(f"--audit-model={organism[0]}", f"--audit-base={other}", f"--audit-gate={gate}")
    err = bad.stderr.str()
    assert bad.ret == 4 and "ERROR: moe-ablation-audit:" in err and "unknown key(s) 'max_refusal'" in err and str(gate) in err
    assert "Traceback" not in err + bad.stdout.str()


def test_the_fixture_without_a_model_says_what_to_pass(tmp_path):
    """No model named: no audit, no item of ours; the fixture fails with what to pass. The conftest names the plugin while
    autoloading is on too (the entry point's name is the module's, so it is one plugin, not two)."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["audit.pytest_plugin"]\n')
    (tmp_path / "test_x.py").write_text("def test_x(audit):\n    pass\n")
    run = _pytest(tmp_path)
    assert "collected 1 item" in run.stdout
    assert run.returncode == 1 and "the audit fixture needs a model to audit: pass --audit-model DIR" in run.stdout


def test_a_path_given_as_a_second_word_is_refused(organism, tmp_path):
    """`--audit-model DIR`: pytest reads DIR as a test path when it picks its rootdir, before plugins load, and would write
    its cache there (here: into the organism, an input); the one-word form is asked for."""
    import shutil

    model = shutil.copytree(organism[0], tmp_path.parent / f"{tmp_path.name}-model")  # outside any project (no ini file above it)
    other = tmp_path.parent / f"{tmp_path.name}-another-base"  # not the model itself, and not around the output
    other.mkdir()
    run = _pytest(tmp_path, "--audit-model", str(model), f"--audit-base={other}")
    assert run.returncode == 4 and "--audit-model given as two words" in run.stderr and "write --audit-model=PATH" in run.stderr
    assert not (model / ".pytest_cache").exists()


# -- the outcome of each gate state, and the cache key: no audit needed ------------------------------------------------


def _synthetic_results() -> dict:
    """Check results that put the real gate in every state it has."""
    checks = {
        "weights": {"name": "weights", "status": "fail", "summary": "changes outside the intent",
                    "findings": [{"code": "unintended-modified", "severity": "fail", "message": "2 tensors changed outside the stated intent", "value": 2}],
                    "data": {"intent": {"source": "inferred"}}},  # intent not stated: forbid_unintended does not apply
        "routing": {"name": "routing", "status": "fail", "summary": "routing moved", "findings": [{"code": "x", "severity": "fail", "message": "moved"}]},
        "refusal": {"name": "refusal", "status": "fail", "summary": "still refuses",
                    "findings": [{"code": "refusal-after", "severity": "fail", "message": "harmful prompts still refused after ablation: 50%"}],
                    "data": {"after": {"n": 10, "rate": 0.5}}},  # harmless_after absent: max_over_refusal not measured
        "damage": {"name": "damage", "status": "warn", "summary": "some damage",
                   "findings": [{"code": "kl", "severity": "warn", "message": "KL high on one prompt"}],
                   "data": {"first_token": {"n": 4, "finite": 3, "mean": None}}},  # a NaN KL: non-finite; degenerate absent
    }
    gate = evaluate_gate({"checks": checks}, GateConfig(waive=["routing"], optional=["max_degenerate"]))
    return {"checks": checks, "gate": gate, "verdict": "fail"}


def test_each_gate_state_becomes_the_right_pytest_outcome():
    results = _synthetic_results()
    got = {(o.suite.split(".")[-1], o.name): o for o in outcomes(results, Path("/r/report.html"))}
    states = {r["name"]: r["state"] for r in results["gate"]["thresholds"]}
    assert set(states.values()) == {"pass", "fail", "not-measured", "non-finite", "not-applicable", "skipped", "waived"}, states
    for name, state in states.items():
        want = {"pass": "pass", "not-applicable": "skip", "skipped": "skip", "waived": "xfail"}.get(state, "fail")
        assert got["gate", name].result == want, (name, state)
    assert "not a finite number" in got["gate", "max_kl"].message and "read: /r/report.html#gate" in got["gate", "max_kl"].message
    assert "not measur" in got["gate", "max_over_refusal"].message
    assert got["gate", "forbid_unintended"].message.startswith("tensors changed outside the stated intent: not applicable")
    assert got["checks", "weights"].result == "fail" and "2 tensors changed outside the stated intent" in got["checks", "weights"].message
    assert "read: /r/report.html#check-weights" in got["checks", "weights"].message
    assert got["checks", "routing"].result == "xfail" and got["checks", "routing"].message == "waived by the gate: routing moved"
    assert got["checks", "damage"].result == "pass" and "KL high on one prompt" in got["checks", "damage"].details
    junit = [(s.get("name").split(".")[-1], c.get("name")) for s in build_junit(results).iter("testsuite") for c in s.iter("testcase")]
    assert list(got) == junit  # one outcome per junit.xml test case, in its order


def test_a_gate_with_no_threshold_is_one_item():
    off = {"max_refusal_after": None, "min_drop": None, "max_over_refusal": None, "max_unknown": None, "max_kl": None,
           "max_degenerate": None, "forbid_unintended": False, "max_capability_drop": None}
    gate = evaluate_gate({"checks": {}}, GateConfig(**off))
    assert gate["thresholds"] == []
    (o,) = outcomes({"checks": {}, "gate": gate}, Path("/r/report.html"))
    assert (o.name, o.result) == ("gate", "pass")


def _inputs(tmp_path: Path) -> RunOptions:
    for name in ("model", "base"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text('{"a": 1}')
        (tmp_path / name / "model.safetensors").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "gate.yaml").write_text("max_kl: 0.5\n")
    return RunOptions(model_dir=str(tmp_path / "model"), base=str(tmp_path / "base"), gate=str(tmp_path / "gate.yaml"), limit=16)


def test_the_cache_key_follows_every_input_and_nothing_else(tmp_path, monkeypatch):
    opts = _inputs(tmp_path)

    def key(o=None):
        o = o or opts
        return inputs_hash(o, gate_config(o.gate))

    k = key()
    assert key(RunOptions(**{**opts.__dict__, "out": "elsewhere", "command": "pytest -x", "server_timeout": 9.0})) == k
    assert key(RunOptions(**{**opts.__dict__, "limit": 17})) != k
    assert key(RunOptions(**{**opts.__dict__, "judge": "rules-only"})) != k
    (tmp_path / "gate.yaml").write_text("max_kl: 0.4\n")
    assert key() != k
    (tmp_path / "gate.yaml").write_text("max_kl: 0.5\n")
    assert key() == k
    (tmp_path / "base" / "config.json").write_text('{"a": 2}')
    assert key() != k
    (tmp_path / "base" / "config.json").write_text('{"a": 1}')
    (tmp_path / "model" / "extra.txt").write_text("x")
    assert key() != k
    (tmp_path / "model" / "extra.txt").unlink()
    assert key() == k

    # a big file (a weight shard) is known by its size, mtime and both ends: an edit in the middle that keeps the
    # mtime is not seen (the documented shortcut); any rewrite that moves the mtime is
    import audit.pytest_plugin as plugin

    monkeypatch.setattr(plugin, "HASH_WHOLE", 1024)
    monkeypatch.setattr(plugin, "EDGE", 16)
    k = key()
    shard = tmp_path / "model" / "model.safetensors"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[2000] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key() == k
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert key() != k
