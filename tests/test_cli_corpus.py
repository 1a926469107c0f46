"""The CLI on everything a careless user can give it: the right exit code, a message naming the problem, no
traceback, and every input byte-identical afterwards (issue 15; the corpus is tests/cli_corpus.py, and
scripts/cli_corpus.py runs the same cases as real subprocesses)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cli_corpus
from audit.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paths = cli_corpus.build(root)
    return root, paths, cli_corpus.inputs(root)


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: usage errors exit 2 with a message
        code = e.code
    cap = capsys.readouterr()
    return code, cap.err + cap.out


def test_every_case_exits_as_it_must_without_a_traceback(corpus, capsys):
    root, paths, before = corpus
    wrong = []
    for case in cli_corpus.cases(paths):
        code, text = _run(case.argv, capsys)  # an exception escaping main() is a traceback: the test errors out
        if code != case.code or (case.says and case.says.lower() not in text.lower()) or "Traceback" in text:
            wrong.append(f"{case.name}: exit {code} (want {case.code}); {text.strip()[-300:]!r}")
    assert not wrong, "\n".join(wrong)
    assert cli_corpus.inputs(root) == before, "an input changed"


def test_internal_errors_exit_3_with_a_log_and_memory_errors_say_how_to_lower_memory(corpus, capsys, monkeypatch):
    root, paths, _ = corpus
    from audit.weights import static_audit

    def boom(*a, **k):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(static_audit, "static_audit", boom)
    out = root / "out" / "crash"
    code, text = _run(["static", str(paths["abl"]), "-o", str(out)], capsys)
    assert code == 3 and "internal error" in text and "Traceback" not in text
    log = out / "audit-error.log"
    assert log.is_file() and "ValueError: a bug, not bad input" in log.read_text() and "Traceback" in log.read_text()

    def oom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(static_audit, "static_audit", oom)
    code, text = _run(["static", str(paths["abl"]), "-o", str(root / "out" / "oom")], capsys)
    assert code == 3 and "out of memory" in text and "--batch-size" in text and "--device auto" in text


def test_a_closed_pipe_is_not_a_traceback(corpus):
    """`audit classify big.jsonl | head -1`: the reader leaves early; the writer stops quietly."""
    _, paths, _ = corpus
    p = subprocess.run(f"{sys.executable} -m audit.cli classify {paths['c_ok']} | head -1", shell=True, capture_output=True, text=True)
    assert p.stdout.count("\n") == 1 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr[-500:]
