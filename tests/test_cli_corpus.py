"""The CLI on everything a careless user can give it: the right exit code, a message naming the problem, no
traceback, and every input byte-identical afterwards (issue 15; the corpus is tests/cli_corpus.py, and
scripts/cli_corpus.py runs the same cases as real subprocesses). Round two (issue 26: hostile inputs, writes where
nothing may be written, bounded parsing) runs as real subprocesses here, one test per point of the issue
(tests/cli_corpus_round2.py; point 6, the judge's deadline, is tests/test_judges.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import cli_corpus
import cli_corpus_round2 as round2
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
    monkeypatch.setenv("AUDIT_CACHE", str(root / "cache"))
    out = root / "out" / "crash"
    code, text = _run(["static", str(paths["abl"]), "-o", str(out)], capsys)
    assert code == 3 and "internal error" in text and "Traceback" not in text
    assert not out.exists()  # a failed run leaves no output folder (it held only the log: a half output, issue 26)
    log = Path(text.split("traceback written to ")[1].split()[0])
    assert log.parent == root / "cache" / "logs" and "ValueError: a bug, not bad input" in log.read_text() and "Traceback" in log.read_text()
    from audit.outputs import OutputDir

    with OutputDir(root / "out" / "earlier") as od:  # an earlier output of ours (--force) keeps its own log
        ours = od.commit()
    code, text = _run(["static", str(paths["abl"]), "-o", str(ours), "--force"], capsys)
    assert code == 3 and (ours / "audit-error.log").is_file()

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


# -- round two (issue 26) ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("round2") / "scratch"
    paths = round2.build(root)
    with round2.servers() as (urls, target):
        yield root, round2.cases(paths, urls, target), round2.Snapshot()


@pytest.mark.parametrize("point", [n for n in range(1, 17) if n != 6])
def test_round_two_every_case_as_a_subprocess(scratch, point):
    """Each case of this point of issue 26: its exit code (2 with the file or flag named; 0/1 for valid input), no
    traceback, the refusal in time where the issue says so, and nothing written or deleted outside its outputs."""
    root, cases, snap = scratch
    mine = [c for c in cases if c.point == point]
    assert mine
    short = [f"{o.case.name}: {'; '.join(o.problems)}; said {o.text.strip()[-300:]!r}"
             for o in (round2.run_case(c, root, snap, round2.env()) for c in mine) if not o.held]
    assert not short, "\n".join(short)
