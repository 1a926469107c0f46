"""Judge throughput: the offline judge (rules + linear model) beside the rules alone and the judge that reads meaning, on one core.

The completions are the project's own labelled examples (tests/data, scripts/judge_written.jsonl)
plus longer answers made from them (several joined, as a 256-token generation would be), so
short and long answers are both timed. Prints completions per second for each judge and the
ratio; the issue's target is >= 100 completions/s for the default judge (an audit judges ~1,000). ``--meaning``
adds ``--judge meaning`` (the sentence encoder; the [meaning] extra), timed through ``many`` as audit run calls it.

    python benchmarks/bench_judge.py [--n 2000] [--repeat 3] [--meaning]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def corpus(n: int) -> list[tuple[str, str]]:
    rows = []
    for f in (ROOT / "tests" / "data" / "labelled_completions.jsonl", ROOT / "scripts" / "judge_written.jsonl"):
        rows += [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    pairs = [(r.get("prompt") or "", r["completion"]) for r in rows]
    out = []
    i = 0
    while len(out) < n:
        p, c = pairs[i % len(pairs)]
        if i % 3 == 2:  # every third one long: this answer followed by the next four
            c = "\n\n".join([c] + [pairs[(i + k) % len(pairs)][1] for k in range(1, 5)])
        out.append((p, c))
        i += 1
    return out


def rate(judge, items, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p, c in items:
            judge(c, p)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def rate_many(judge, items, repeat: int) -> float:
    """Completions per second through judge.many (batched, as audit run calls it)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        judge.many([c for _, c in items], [p for p, _ in items])
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--meaning", action="store_true", help="also time --judge meaning (first --n/10 completions, once: it is slow)")
    a = ap.parse_args(argv)
    from audit.judgement.judges import OfflineJudge, RulesOnlyJudge

    items = corpus(a.n)
    chars = sum(len(c) for _, c in items) / len(items)
    offline, rules = OfflineJudge(), RulesOnlyJudge()
    offline(items[0][1], items[0][0])  # load and warm
    r_off, r_rules = rate(offline, items, a.repeat), rate(rules, items, a.repeat)
    out = {"completions": len(items), "mean_chars": round(chars), "offline_per_s": round(r_off, 1), "rules_only_per_s": round(r_rules, 1),
           "offline_over_rules_time": round(r_rules / r_off, 2), "target_per_s": 100, "meets_target": r_off >= 100}
    if a.meaning:
        from audit.judgement.judges import MeaningJudge

        meaning = MeaningJudge()
        meaning(items[0][1], items[0][0])  # load and warm
        few = items[: max(20, a.n // 10)]
        r_m = rate_many(meaning, few, 1)
        out.update(meaning_per_s=round(r_m, 1), meaning_ms_per_completion=round(1000 / r_m, 1), meaning_completions=len(few),
                   meaning_over_offline_time=round(r_off / r_m, 1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
