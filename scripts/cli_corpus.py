"""Run the bad-input corpus (tests/cli_corpus.py) as real `audit` subprocesses and print the table.

    python scripts/cli_corpus.py [--workdir DIR] [--quick]
    python scripts/cli_corpus.py --round 2 [--workdir DIR]

``--round 2`` runs issue 26's hostile inputs instead (tests/cli_corpus_round2.py): per case its point, exit code, time and
whether anything outside its outputs was written, then the table (cases, held, short, exit 3, writes outside outputs).

Per case: the exit code against the expected one, whether the message names the problem, whether a
traceback reached the terminal; at the end, whether every input is byte-identical. Also a closed pipe
(`audit classify | head -1`). Exit 0 when every case is right.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cli_corpus  # noqa: E402
import cli_corpus_round2  # noqa: E402


def round_two(workdir: str | None) -> int:
    root = Path(workdir or tempfile.mkdtemp(prefix="cli-corpus-")) / "scratch"
    t0 = time.time()
    paths = cli_corpus_round2.build(root)
    snap, outcomes = cli_corpus_round2.Snapshot(), []
    with cli_corpus_round2.servers() as (urls, target):
        for case in cli_corpus_round2.cases(paths, urls, target):
            o = cli_corpus_round2.run_case(case, root, snap, cli_corpus_round2.env())
            outcomes.append(o)
            last = o.text.strip().splitlines()[-1][:110] if o.text.strip() else ""
            print(f"{'ok ' if o.held else 'BAD'} {case.point:>2} {case.name:<58} exit {o.code} {o.seconds:5.1f} s  "
                  f"{'; '.join(o.problems) or last}", flush=True)
    print(f"\n{len(outcomes)} cases in {time.time() - t0:.0f} s\n")
    print(cli_corpus_round2.table(outcomes))
    return 0 if all(o.held for o in outcomes) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="where to build the workspace (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="skip the cases that run a model")
    ap.add_argument("--round", type=int, choices=(1, 2), default=1, help="1: issue 15's corpus (default); 2: issue 26's")
    args = ap.parse_args()
    if args.round == 2:
        return round_two(args.workdir)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="cli-corpus-")) / "ws"
    t0 = time.time()
    paths = cli_corpus.build(root)
    before = cli_corpus.inputs(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    rows, codes = [], Counter()
    cases = [c for c in cli_corpus.cases(paths) if not (args.quick and c.slow)]
    for case in cases:
        p = subprocess.run([sys.executable, "-m", "audit.cli", *case.argv], capture_output=True, text=True, env=env)
        text = p.stderr + p.stdout
        ok = p.returncode == case.code and (not case.says or case.says.lower() in text.lower()) and "Traceback" not in text
        codes[p.returncode] += 1
        rows.append((case.name, case.code, p.returncode, "Traceback" in text, ok, text.strip().splitlines()[-1][:110] if text.strip() else ""))
    pipe = subprocess.run(f"{sys.executable} -m audit.cli classify {paths['c_ok']} | head -1", shell=True, capture_output=True, text=True, env=env)
    pipe_ok = pipe.stdout.count("\n") == 1 and "Traceback" not in pipe.stderr
    same = cli_corpus.inputs(root) == before
    width = max(len(r[0]) for r in rows)
    for name, want, got, tb, ok, msg in rows:
        print(f"{'ok ' if ok else 'BAD'} {name:<{width}}  want {want} got {got}{'  TRACEBACK' if tb else ''}  {msg}")
    bad = [r for r in rows if not r[4]]
    print(f"\n{len(rows)} cases + 1 closed pipe in {time.time() - t0:.0f} s: exit codes {dict(sorted(codes.items()))}; "
          f"wrong {len(bad)}; tracebacks {sum(r[3] for r in rows)}; closed pipe {'ok' if pipe_ok else 'TRACEBACK'}; "
          f"inputs byte-identical: {'all' if same else 'NO'} ({len(before)} files)")
    return 0 if not bad and pipe_ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
