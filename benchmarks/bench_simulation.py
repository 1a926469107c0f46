"""The fix simulation's cost per `audit run`, with the first-token proxy settling candidates and the sequential early stop
(the default) against generating as before (`--confirm-all`: generation at the largest candidate of every family, every
bypass index generated with its KL, the reproduction generated in full), on the failed cases of the diagnosis matrix.

Both runs of a case are measured side by side in one process, in CPU seconds of this process (steady on a shared
machine): the stages whose names start with "simulation". Printed per case and in total: the seconds, the ratio, and
whether the verdict and the top cause are the same.

    AUDIT_THREADS=1 python benchmarks/bench_simulation.py [--organisms glm,mix,oss] [--cases a,b] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit.organisms import build as O  # noqa: E402
from audit.organisms import cases as C  # noqa: E402


def simulation_cpu(res: dict) -> float:
    return sum(v for k, v in (res["run"].get("stages_cpu") or {}).items() if k.startswith("simulation"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organisms", default="glm,mix,oss")
    ap.add_argument("--cases", default=None)
    ap.add_argument("--limit", type=int, default=0, help="prompts per set (default 0: every held-out prompt of the organism, as a plain "
                    "`audit run` reads them; the matrix tests use 24, where a sequential test has little room to stop early)")
    args = ap.parse_args(argv)
    O._torch_threads()
    truth = {}
    for p in (ROOT / "tests" / "data").glob("diagnosis_truth*.json"):
        truth.update(json.loads(p.read_text())["cases"])
    orgs = args.organisms.split(",")
    names = args.cases.split(",") if args.cases else [n for n, sp in C.ALL_SPECS.items() if sp.organism in orgs
                                                       and truth.get(n, {}).get("expected_verdict") == "fail"]
    print("| case | as before (CPU s) | proxy + early stop (CPU s) | ratio | same verdict | same top cause |")
    print("|---|---|---|---|---|---|")
    tot_old = tot_new = 0.0
    same_all = True
    for n in names:
        over = {"limit": args.limit or None}
        old, _ = C.audit_case(n, confirm_all=True, **over)
        new, _ = C.audit_case(n, **over)
        a, b = simulation_cpu(old), simulation_cpu(new)
        tot_old, tot_new = tot_old + a, tot_new + b
        top = lambda r: (r["causes"] or [{}])[0].get("id")  # noqa: E731
        sv, st = old["verdict"] == new["verdict"], top(old) == top(new)
        same_all &= sv and st
        print(f"| {n} | {a:.1f} | {b:.1f} | {a / b if b else float('nan'):.2f} | {'yes' if sv else 'NO'} | "
              f"{'yes' if st else 'NO: ' + str(top(old)) + ' / ' + str(top(new))} |", flush=True)
    print(f"\ntotal simulation CPU: {tot_old:.1f} s as before, {tot_new:.1f} s now: {tot_old / tot_new if tot_new else float('nan'):.2f}x; "
          f"verdicts and top causes {'all the same' if same_all else 'NOT all the same'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
