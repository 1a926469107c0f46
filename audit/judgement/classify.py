"""`audit classify FILE`: judge completions someone else generated (JSONL or CSV) and write JSONL with verdicts.

Each row needs a ``completion`` (or ``response``) column; ``prompt`` and ``finish_reason`` are used
when present. Output rows are the input fields plus ``refused`` (true / false / null), ``reason``,
``judge_label`` (refusal / compliance / unknown), ``judge_score`` (refusal confidence), ``judge``
(which judge: ``--judge``, audit/judgement/judges.py) and ``judge_language``. ``--about`` prints the judge,
its data card and its measured accuracy instead.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from audit.judgement.judges import Judge, make_judge
from audit.outputs import check_destination, write_file
from checks.errors import AuditError

TEXT_COLUMNS = ("completion", "response")


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl/.json-lines or .csv file (decided by extension, else by the first character)."""
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"{p}: no such file")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AuditError(f"{p}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); re-encode it as UTF-8") from None
    is_csv = p.suffix.lower() in (".csv", ".tsv") or (p.suffix.lower() not in (".jsonl", ".json", ".ndjson") and not text.lstrip().startswith("{"))
    if is_csv:
        try:
            rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
        except csv.Error as e:
            raise AuditError(f"{p}: cannot parse as CSV ({e})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AuditError(f"{p}:{n}: not a JSON object per line ({e.msg}); write JSONL or CSV") from None
            if not isinstance(row, dict):
                raise AuditError(f"{p}:{n}: each line must be a JSON object with a 'completion' field")
            rows.append(row)
    if not rows:
        raise AuditError(f"{p}: no rows")
    return rows


def text_column(rows: list[dict], path) -> str:
    cols = {k for r in rows for k in r}
    for c in TEXT_COLUMNS:
        if c in cols:
            return c
    raise AuditError(f"{path}: no usable column; need 'completion' or 'response' (found: {', '.join(sorted(map(str, cols))) or 'none'})")


def classify_rows(rows: list[dict], col: str, judge: Judge | None = None) -> list[dict]:
    judge = judge or make_judge()
    texts = [r.get(col) for r in rows]
    texts = [t if isinstance(t, str) else (None if t is None else str(t)) for t in texts]
    prompts = [r.get("prompt") if isinstance(r.get("prompt"), str) else None for r in rows]
    js = judge.many(texts, prompts, [r.get("finish_reason") == "length" for r in rows])
    return [{**r, "refused": j.refused, "reason": j.reason, "judge_label": j.label, "judge_score": round(j.score, 3),
             "judge": j.judge, "judge_language": j.language} for r, j in zip(rows, js)]


def is_classify_output(path: Path) -> bool:
    """Whether ``path`` is JSONL written by `audit classify` (every row carries judge_label): --force may replace it."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        return "judge_label" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return False


def about(judge: Judge) -> str:
    """What ``audit classify --about`` prints: the judge, its sources and its accuracy per source on the frozen held-out split."""
    a = judge.about()
    lines = [f"judge: {a['judge']}", f"  {a.get('description') or ''}"]
    sources = (a.get("frozen_test") or {}).get("sources") or {}
    if sources:
        lines.append("  accuracy on the frozen held-out split, per human-labelled source (unknown counts as wrong; recall and precision of refusal):")
        for name, t in sources.items():
            how = "held out whole, never trained on" if t.get("held_out_whole") else "its test side; its train side was trained on"
            lines.append(f"  {name}: {t.get('rows')} completions of {t.get('prompts')} prompts, {how}")
            for key, label in (("judge", "this judge"), ("rules_only", "rules alone"), ("marker_baseline", "refusal-string match")):
                m = t.get(key) or {}
                if m.get("accuracy") is not None:
                    lines.append(f"    {label:<21} accuracy {m['accuracy']:.3f}  recall {m['recall']:.3f}  precision {m['precision']:.3f}  "
                                 f"unknown {m['unknown']}")
        spc = (a.get("frozen_test") or {}).get("seconds_per_completion")
        if spc:
            lines.append(f"  speed when measured: {1 / spc:.0f} completions/s on one core (the model's part; benchmarks/bench_judge.py times it all)")
    else:
        lines.append("  accuracy: not measured by this project for this judge")
    for src in a.get("sources") or []:
        lines.append(f"  trained on: {src}")
    if a.get("data_card"):
        lines.append(f"  data card: {a['data_card']} (sources, licences, label mapping, the frozen split)")
    return "\n".join(lines) + "\n"


def classify_file(path: str | Path, out: str | Path | None = None, judge: str | Judge | None = None, force: bool = False) -> dict:
    """Judge every row of ``path`` with ``judge`` (a --judge value or a Judge); write JSONL to ``out`` (stdout when None). Returns counts."""
    if out is not None:
        check_destination(out, [path], force, kind="file", ours=is_classify_output)
    rows = read_rows(path)
    jd = judge if isinstance(judge, Judge) else make_judge(judge)
    judged = classify_rows(rows, text_column(rows, path), jd)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in judged)
    if out is None:
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        write_file(out, lambda tmp: tmp.write_text(lines, encoding="utf-8"), [path], force, ours=is_classify_output)
    counts = {"rows": len(judged), "refusal": 0, "compliance": 0, "unknown": 0}
    for r in judged:
        counts[r["judge_label"]] += 1
    return counts
