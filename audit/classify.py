"""`audit classify FILE`: judge completions someone else generated (JSONL or CSV) and write JSONL with verdicts.

Each row needs a ``completion`` (or ``response``) column; ``prompt`` and ``finish_reason`` are used
when present. Output rows are the input fields plus ``refused`` (true / false / null), ``reason``,
``judge_label`` (refusal / compliance / unknown) and ``judge_score`` (refusal confidence).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from checks.errors import AuditError
from checks.refusal import judge

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


def classify_rows(rows: list[dict], col: str) -> list[dict]:
    out = []
    for r in rows:
        text = r.get(col)
        prompt = r.get("prompt")
        j = judge(text if isinstance(text, str) else (None if text is None else str(text)),
                  prompt if isinstance(prompt, str) else None, truncated=r.get("finish_reason") == "length")
        out.append({**r, "refused": j.refused, "reason": j.reason, "judge_label": j.label, "judge_score": round(j.score, 3)})
    return out


def is_classify_output(path: Path) -> bool:
    """Whether ``path`` is JSONL written by `audit classify` (every row carries judge_label): --force may replace it."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        return "judge_label" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return False


def classify_file(path: str | Path, out: str | Path | None = None, force: bool = False) -> dict:
    """Judge every row of ``path``; write JSONL to ``out`` (stdout when None). Returns counts."""
    from audit.outputs import check_destination, write_file

    if out is not None:
        check_destination(out, [path], force, kind="file", ours=is_classify_output)
    rows = read_rows(path)
    judged = classify_rows(rows, text_column(rows, path))
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
