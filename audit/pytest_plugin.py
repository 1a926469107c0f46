"""The gate inside a team's own pytest CI: `pytest --audit-model=DIR --audit-base=BASE [--audit-gate=GATE]`.

With an ablated model named (``--audit-model`` or the ini option ``audit_model``), pytest runs the audit once per
session through the library (``run_audit``), keeps the results in pytest's cache under a hash of every input, and
collects one item per check and one per gate threshold, named as the audit's junit.xml names its test cases
(reports/junit.py), in any folder, with no test file. The ``audit`` fixture gives a team's own tests the results.

Outcomes follow the gate (checks/gate.py): a threshold fails when the gate says fail, not-measured or non-finite;
it is skipped only when the gate says not-applicable (or skipped: optional in the gate file); a waived check is an
expected failure (xfail). A check's item fails when its status is fail, unless the gate waives it.

Registered as the pytest11 entry point ``audit.pytest_plugin``, so pytest loads this module in every session of an
environment that has the package: torch and the pipeline are imported only when an audit is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from audit.pipeline.options import RunOptions
from checks.errors import AuditError
from reports.junit import TOOL, build_junit

CACHE_KEY = "moe-ablation-audit/audit"  # one entry: the last audit's input hash and its results.json text
HASH_WHOLE = 256 << 20  # files up to this size are hashed whole; bigger ones (weight shards) by size, mtime, head and tail
EDGE = 1 << 20  # bytes read at each end of a big file


@dataclass(frozen=True)
class Flag:
    """One input of the audit: ``--audit-NAME`` on the command line, ``audit_NAME`` in the ini file, a RunOptions field."""

    name: str
    field: str
    kind: str  # path (must exist), out (a folder to write), prompts (a file or a dataset name), text, count, seconds, memory, switch
    help: str
    metavar: str = ""

    @property
    def flag(self) -> str:
        return f"--audit-{self.name}"

    @property
    def ini(self) -> str:
        return "audit_" + self.name.replace("-", "_")


FLAGS = (
    Flag("model", "model_dir", "path", "the ablated model directory to audit (switches the audit on)", "DIR"),
    Flag("base", "base", "path", "the model it was ablated from (default: the base its ablation-manifest.json names)", "DIR"),
    Flag("gate", "gate", "path", "gate thresholds (YAML); default: [tool.audit.gate] in ./pyproject.toml, else the built-in defaults", "FILE"),
    Flag("config", "config", "path", "the ablation config that states what was meant (ours or llm-abliteration's YAML)", "FILE"),
    Flag("directions", "directions", "path", "refusal directions (audit measure's .safetensors or llm-abliteration's .pt)", "FILE"),
    Flag("harmful", "harmful", "prompts", "harmful prompts (txt/JSONL/CSV/Parquet or a datasets name); default: the model's prompts/ or the embedded set", "FILE"),
    Flag("harmless", "harmless", "prompts", "harmless prompts, same forms", "FILE"),
    Flag("out", "out", "out", "folder for report.html, results.json and junit.xml (default: audit-out; replaced only when it is ours)", "DIR"),
    Flag("judge", "judge", "text", "refusal judge: rules (default), rules-only, classifier:DIR, server:URL[#MODEL]", "JUDGE"),
    Flag("limit", "limit", "count", "use at most this many prompts per set", "N"),
    Flag("max-new-tokens", "max_new_tokens", "count", "tokens generated per answer (default 128)", "N"),
    Flag("batch-size", "batch_size", "count", "prompts per forward pass (default 16)", "N"),
    Flag("no-simulate", "simulate", "switch", "skip the in-memory simulation of each fix (the gate does not need it)"),
    Flag("device", "device", "text", "torch device (default cpu), e.g. cuda, or auto: accelerate's device map", "DEVICE"),
    Flag("dtype", "dtype", "text", "auto (the stored dtype, default), float32, bfloat16 or float16", "DTYPE"),
    Flag("max-memory", "max_memory", "memory", "with --audit-device auto: memory per device, e.g. cpu=2GiB or 0=70GiB,cpu=200GiB", "SPEC"),
    Flag("offload-folder", "offload_folder", "out", "with --audit-device auto: where weights offloaded to disk go", "DIR"),
    Flag("server", "server", "text", "an OpenAI-compatible server (vLLM, SGLang, llama.cpp) serving the ablated model", "URL"),
    Flag("served-model", "served_model", "text", "the name --audit-server serves the ablated model under (default: --audit-model)", "NAME"),
    Flag("base-server", "base_server", "text", "an OpenAI-compatible server serving the base model", "URL"),
    Flag("served-base-model", "served_base_model", "text", "the name --audit-base-server serves the base under (default: --audit-base)", "NAME"),
    Flag("server-timeout", "server_timeout", "seconds", "seconds one server request may take in all (default 300)", "SECONDS"),
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
NOT_RESULTS = {"model_dir", "base", "config", "gate", "harmful", "harmless", "directions",  # hashed by content instead
               "out", "force", "quiet", "command", "server_timeout", "offload_folder", "apply_fix"}  # do not change the results


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe-ablation-audit", "moe-ablation-audit: the audit's checks and gate thresholds as tests")
    for f in FLAGS:
        if f.kind == "switch":
            group.addoption(f.flag, action="store_true", default=None, dest=f.ini, help=f.help)
            parser.addini(f.ini, f.help + " (ini: true/false)", type="bool", default=None)
        else:
            group.addoption(f.flag, default=None, dest=f.ini, metavar=f.metavar, help=f.help)
            parser.addini(f.ini, f.help + (" (relative to this ini file)" if f.kind in ("path", "out", "prompts") else ""), default=None)


def _value(config: pytest.Config, f: Flag):
    """The flag's value (the command line wins over the ini file), converted; None when neither sets it."""
    raw, where, base = config.getoption(f.ini), f.flag, None
    if raw is None:
        raw = config.getini(f.ini)
        if raw is None or raw == "" or raw is False:  # unset (pytest < 9 gives "" and False for unset ini options)
            return None
        raw = raw.strip() if isinstance(raw, str) else raw
        where, base = f"{f.ini} in {config.inipath}", config.inipath.parent if config.inipath else config.rootpath
    if f.kind == "switch":
        return not raw if f.field == "simulate" else bool(raw)
    if f.kind in ("path", "out", "prompts"):
        p = Path(raw).expanduser()
        full = p if p.is_absolute() else (base or config.invocation_params.dir) / p
        if f.kind == "path" and not full.exists():
            raise pytest.UsageError(f"{where}: {full} does not exist (expected: {f.help.split(' (')[0]})")
        if f.kind == "prompts" and not full.exists():
            return raw  # a datasets name (load_prompts says so when it is neither)
        return str(full) if base else raw  # a flag's path as given: vLLM's default served name is the path as given
    if f.kind in ("count", "seconds"):
        try:
            v = int(raw) if f.kind == "count" else float(raw)
        except ValueError:
            raise pytest.UsageError(f"{where}: {raw!r} is not {'an integer' if f.kind == 'count' else 'a number of seconds'}") from None
        if not v > 0 or v != v or v == float("inf"):
            raise pytest.UsageError(f"{where}: must be {'at least 1' if f.kind == 'count' else 'a positive number of seconds'}, got {raw}")
        return v
    if f.kind == "memory":
        from audit.model.loading import parse_max_memory

        try:
            return parse_max_memory(raw)
        except AuditError as e:
            raise pytest.UsageError(f"{where}: {e}") from None
    if f.field == "dtype" and raw not in DTYPES:
        raise pytest.UsageError(f"{where}: {raw!r} is not one of {', '.join(DTYPES)}")
    return raw


def run_options(config: pytest.Config) -> RunOptions | None:
    """The audit's RunOptions from the flags and the ini file; None when no model is named (the plugin then does nothing)."""
    values = {f.field: v for f in FLAGS if (v := _value(config, f)) is not None}
    if "model_dir" not in values:
        given = sorted(f.flag for f in FLAGS if f.field in values)
        if given:
            raise pytest.UsageError(f"{', '.join(given)} given without --audit-model DIR (or audit_model in the ini file): name the ablated model to audit")
        return None
    command = "pytest " + " ".join(config.invocation_params.args)
    return RunOptions(**values, force=True, command=command)  # force replaces only a folder of ours (audit/outputs.py)


class AuditState:
    """This session's one audit: its options, the input hash, the results (results.json's content) and where they are."""

    def __init__(self, opts: RunOptions):
        self.opts = opts
        self.results: dict | None = None
        self.outcomes: list[Outcome] = []
        self.cached = False
        self.seconds = 0.0

    @property
    def report(self) -> Path:
        return Path(self.opts.out).resolve() / "report.html"


STATE = pytest.StashKey[AuditState]()


def pytest_configure(config: pytest.Config) -> None:
    _check_rootdir(config)
    opts = run_options(config)
    if opts is not None:
        config.stash[STATE] = AuditState(opts)


def _check_rootdir(config: pytest.Config) -> None:
    """pytest picks its rootdir (where its cache and ini file are) before plugins load, reading the word after an unknown
    flag as a test path: `--audit-model /models/x` can put its cache in /models. Refused, with the one-word form to use."""
    args, here = config.invocation_params.args, config.invocation_params.dir
    valued = {f.flag for f in FLAGS if f.kind != "switch"}
    two_words = [a for a, v in zip(args, args[1:]) if a in valued and (here / v).exists()]
    if two_words and config.inipath is None and config.rootpath != here:
        raise pytest.UsageError(f"{', '.join(two_words)} given as two words: pytest took the path for a test path and made "
                                f"{config.rootpath} its rootdir (its cache would be written there); write {two_words[0]}=PATH")


# -- the input hash ---------------------------------------------------------------------------------------------------


def _digest_file(h, path: Path) -> None:
    st = path.stat()
    h.update(f"{st.st_size}\0".encode())
    with open(path, "rb") as f:
        if st.st_size <= HASH_WHOLE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:  # a weight shard: a rewrite changes its mtime; reading hundreds of GB per pytest run is not affordable
            h.update(f"{st.st_mtime_ns}\0".encode() + f.read(EDGE))
            f.seek(st.st_size - EDGE)
            h.update(f.read(EDGE))


def digest_path(h, path: str | os.PathLike | None) -> None:
    """Feed a file's or a folder's files' content (names included) into ``h``; a missing path counts by its name."""
    if path is None:
        h.update(b"none\0")
        return
    p = Path(path)
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0".encode())
            _digest_file(h, f)
    elif p.is_file():
        _digest_file(h, p)
    else:
        h.update(f"missing:{path}\0".encode())


def tool_digest() -> str:
    """The installed tool's own code and data (a changed check or judge must not reuse an old audit)."""
    import audit
    import checks
    import reports

    h = hashlib.sha256(audit.__version__.encode())
    for pkg in (audit, checks, reports):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".so", ".pyd"):
                h.update(f"{pkg.__name__}/{f.relative_to(root).as_posix()}\0".encode())
                _digest_file(h, f)
    return h.hexdigest()


def base_dir(opts: RunOptions) -> str | None:
    """--audit-base, else the base the ablated model's manifest names (as run_audit finds it)."""
    from audit.intent.manifest import load_manifest

    return opts.base or ((load_manifest(opts.model_dir) or {}).get("base") or {}).get("path")


def inputs_hash(opts: RunOptions, gate) -> str:
    """The hash an audit is cached under: where the inputs are and what they hold (both models' files, the config and
    its measurement, directions, prompts, the judge's folder), the gate as read (file or pyproject), the options that
    change results, and the tool itself."""
    from audit.intent.config import load_config, resolve_measurements

    h = hashlib.sha256()

    def part(label: str, value) -> None:
        h.update(f"\n{label}=".encode() + json.dumps(value, sort_keys=True, default=str).encode())

    part("tool", tool_digest())
    measurement = resolve_measurements(load_config(opts.config)) if opts.config else None
    judge_dir = opts.judge.split(":", 1)[1] if opts.judge.startswith("classifier:") else None
    for label, path in (("model", opts.model_dir), ("base", base_dir(opts)), ("config", opts.config), ("measurement", measurement),
                        ("directions", opts.directions), ("harmful", opts.harmful), ("harmless", opts.harmless), ("judge", judge_dir)):
        part(label, str(Path(path).resolve()) if path is not None and Path(path).exists() else path)  # results.json names it
        digest_path(h, path)
    cfg, source = gate
    part("gate", {"limits": cfg.limits, "optional": sorted(cfg.optional), "required": sorted(cfg.required), "waive": sorted(cfg.waive),
                  "source": source})
    options = {k: v for k, v in asdict(opts).items() if k not in NOT_RESULTS}
    options["max_memory"] = sorted((str(k), v) for k, v in (opts.max_memory or {}).items())  # keys 0 and "cpu" do not sort together
    part("options", options)
    return h.hexdigest()


# -- running (or reusing) the audit -----------------------------------------------------------------------------------


def _say(config: pytest.Config, text: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"{TOOL}: {text}")


def _load(state: AuditState, config: pytest.Config) -> None:
    """The results for these inputs: from pytest's cache when the inputs hash matches (the output folder re-written if it
    no longer holds them), else from a fresh run_audit, which writes report.html, results.json and junit.xml."""
    from audit.pipeline.gate_file import gate_config
    from audit.pipeline.run import run_audit
    from audit.pipeline.write import write_outputs

    opts = state.opts
    gate = gate_config(opts.gate)  # a bad gate file fails here, before anything is hashed or run
    key = inputs_hash(opts, gate)
    cache = config.cache if hasattr(config, "cache") else None  # None with -p no:cacheprovider
    hit = cache.get(CACHE_KEY, None) if cache is not None else None
    results_file = Path(opts.out) / "results.json"
    if isinstance(hit, dict) and hit.get("inputs") == key and isinstance(hit.get("results_json"), str):
        state.results, state.cached = json.loads(hit["results_json"]), True
        on_disk = results_file.read_text(encoding="utf-8") if results_file.is_file() else None
        if on_disk != hit["results_json"]:
            inputs = [opts.model_dir, base_dir(opts), opts.config, opts.gate, opts.harmful, opts.harmless, opts.directions]  # as run_audit's
            write_outputs(json.loads(hit["results_json"]), opts.out, inputs=inputs, force=True)
        _say(config, f"inputs unchanged since the cached audit ({key[:12]}): not re-run; report: {state.report}")
        return
    _say(config, f"auditing {opts.model_dir} against {opts.base or 'the base its manifest names'} (inputs {key[:12]}, no cached audit) ...")
    t0 = time.perf_counter()
    capman = config.pluginmanager.get_plugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():  # the stages and progress bars go to the terminal, as `audit run`'s do
            run_audit(opts)
    else:
        run_audit(opts)
    state.seconds = time.perf_counter() - t0
    text = results_file.read_text(encoding="utf-8")  # exactly what results.json holds, so a cache hit serves the same
    state.results = json.loads(text)
    if cache is not None:
        cache.set(CACHE_KEY, {"inputs": key, "results_json": text})
    _say(config, f"audit done in {state.seconds:.0f} s; report: {state.report}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE, None)
    if state is None:
        return
    try:
        _load(state, session.config)
        state.outcomes = outcomes(state.results, state.report)
    except AuditError as e:  # bad input: pytest's usage error (exit 4, one line), never a traceback
        raise pytest.UsageError(f"{TOOL}: {e}") from None


# -- the items --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one junit.xml test case becomes as a pytest item: pass, fail, skip or xfail, with the text to show."""

    suite: str  # the junit classname, e.g. moe-ablation-audit.gate
    name: str  # the junit test case name, e.g. max_refusal_after
    result: str  # pass / fail / skip / xfail
    message: str  # the failure, skip or xfail reason
    details: str  # shown in the item's report section


def _text(el, attr: str | None = None) -> str:
    if el is None:
        return ""
    return (el.get(attr) if attr else el.text) or ""


def _gate_outcome(case, row: dict, suite: str, report: Path) -> Outcome:
    name, state, msg = case.get("name"), row.get("state"), str(row.get("message") or "")
    if state == "pass":
        return Outcome(suite, name, "pass", "", msg)
    if state in ("not-applicable", "skipped"):  # the gate says it does not apply (or the gate file made it optional)
        return Outcome(suite, name, "skip", msg, msg)
    if state == "waived":
        return Outcome(suite, name, "xfail", msg, msg)
    body = f"{msg or _text(case.find('failure'), 'message')}\nread: {report}#gate"  # fail, not-measured, non-finite, or unknown: fails closed
    return Outcome(suite, name, "fail", body, "")


def _check_outcome(case, check: dict, waived: bool, suite: str, report: Path) -> Outcome:
    from reports.html import _anchor  # the report's section id for a check, written once there

    name, failure = case.get("name"), case.find("failure")
    if failure is None:  # junit.xml fails a check whose status is fail (with its summary and failing findings); else it passes here
        return Outcome(suite, name, "pass", "", _text(case.find("system-out")))
    summary = _text(failure, "message")
    body = "\n".join(x for x in (summary, _text(failure), f"read: {report}#{_anchor(check.get('name') or name)}") if x)
    if waived:
        return Outcome(suite, name, "xfail", f"waived by the gate: {summary}", body)
    return Outcome(suite, name, "fail", body, "")


def outcomes(results: dict, report: Path) -> list[Outcome]:
    """One Outcome per test case of the junit.xml `audit run` writes for ``results`` (build_junit names and orders them)."""
    checks = list((results.get("checks") or {}).items())
    gate = results.get("gate") or {}
    rows = [t for t in gate.get("thresholds") or [] if isinstance(t, dict)]
    waived = {r.get("check") for r in rows if r.get("state") == "waived"}
    out = []
    for suite in build_junit(results).findall("testsuite"):
        sname, cases = suite.get("name"), suite.findall("testcase")
        if sname == f"{TOOL}.checks":
            if len(cases) != len(checks) or any(c.get("name") not in (k, str(v.get("name"))) for c, (k, v) in zip(cases, checks)):
                raise RuntimeError("reports/junit.py's check test cases no longer follow results['checks'] in order")
            out += [_check_outcome(c, v, k in waived, sname, report) for c, (k, v) in zip(cases, checks)]
        elif rows:
            if [c.get("name") for c in cases] != [str(r.get("name")) for r in rows]:
                raise RuntimeError("reports/junit.py's gate test cases no longer follow the gate's thresholds in order")
            out += [_gate_outcome(c, r, sname, report) for c, r in zip(cases, rows)]
        else:  # a gate with every threshold off and no failed check: junit.xml's one "gate" case
            ok = gate.get("passed", True)
            out += [Outcome(sname, c.get("name"), "pass" if ok else "fail", "" if ok else "gate failed", "") for c in cases]
    return out


class AuditFailure(Exception):
    """A check or threshold the audit failed: its message is the report, no traceback."""


class AuditItem(pytest.Item):
    """One check or gate threshold of the audit; its outcome was decided when the audit's results were read. Skips and
    waived failures are pytest's own skip and xfail marks, so -rs, -m and --runxfail treat them as pytest's."""

    def __init__(self, *, outcome: Outcome, report: Path, **kw):
        super().__init__(**kw)
        self.outcome, self.report = outcome, report
        if outcome.result == "skip":
            self.add_marker(pytest.mark.skip(reason=outcome.message))
        elif outcome.result == "xfail":
            self.add_marker(pytest.mark.xfail(reason=outcome.message, raises=AuditFailure, strict=True))

    def runtest(self) -> None:
        o = self.outcome
        if o.details:
            self.add_report_section("call", TOOL, o.details)
        if o.result in ("fail", "xfail"):
            raise AuditFailure(o.message)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, AuditFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        # where to read about it: the report; and a heading that is not the nodeid, whose dots pytest would print as
        # Python's class.method separators
        return self.report, 0, f"{self.parent.name.removeprefix(TOOL + '.')}: {self.name}"


class AuditSuite(pytest.Collector):
    """A junit test suite of the audit (its checks, its gate): nodeid = the junit classname, so pytest's own --junitxml
    writes the same classname and name as the audit's junit.xml."""

    def collect(self):
        state = self.config.stash[STATE]
        for o in state.outcomes:
            if o.suite == self.name:
                yield AuditItem.from_parent(self, name=o.name, outcome=o, report=state.report)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """The session's collection gets the audit's suites beside whatever test files it found (none needed)."""
    rep = yield
    state = collector.config.stash.get(STATE, None)
    if isinstance(collector, pytest.Session) and state is not None and rep.passed:
        for name in dict.fromkeys(o.suite for o in state.outcomes):
            rep.result.append(AuditSuite.from_parent(collector, name=name, nodeid=name))
    return rep


@pytest.fixture(scope="session")
def audit(pytestconfig: pytest.Config) -> dict:
    """The results of this session's one audit (results.json's content: checks, gate, causes, run), for a team's own tests."""
    state = pytestconfig.stash.get(STATE, None)
    if state is None or state.results is None:
        pytest.fail("the audit fixture needs a model to audit: pass --audit-model DIR --audit-base BASE, or set audit_model and "
                    "audit_base in the ini file ([tool.pytest.ini_options] or pytest.ini)", pytrace=False)
    return json.loads(json.dumps(state.results))  # a copy: a test that edits it cannot change what the items judged


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None or state.results is None:
        return
    r = state.results
    terminalreporter.write_sep("-", TOOL)
    terminalreporter.write_line(f"verdict: {str(r.get('verdict')).upper()}  {r.get('headline', '')}")
    how = "reused from pytest's cache (inputs unchanged)" if state.cached else f"run in {state.seconds:.0f} s"
    terminalreporter.write_line(f"audit {how}")
    terminalreporter.write_line(f"report: {state.report}")
