"""Write the default capability items (audit/data/capability_mmlu.jsonl) from MMLU's test CSVs.

Source: MMLU (Hendrycks et al., ICLR 2021), the authors' repository github.com/hendrycks/test at commit ac4f211 (the
last commit that held data/test/*.csv; MIT licence, Copyright (c) 2020 Dan Hendrycks). docs/capability-data-card.md
says what was taken and why. Usage:

    git -C test show ac4f211:data/test/astronomy_test.csv > mmlu/astronomy_test.csv   # one per SUBJECTS entry
    python scripts/capability_items.py mmlu/ -o audit/data/capability_mmlu.jsonl

The selection is fixed, not tuned: per subject, the first PER_SUBJECT rows (file order) whose question and choices are
short (an item is scored as four sequences) and whose choices stand on their own (no "all/none of the above", no
"both A and B": each choice is scored as a continuation by itself, without the others in view).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

SUBJECTS = ("astronomy", "conceptual_physics", "high_school_biology", "high_school_geography", "high_school_psychology",
            "management", "marketing", "miscellaneous", "nutrition", "world_religions")
PER_SUBJECT = 15
MAX_CHARS = 400  # question plus the longest choice
NOT_ON_ITS_OWN = re.compile(r"\b(all|none|both|neither) of (the )?(above|these|them)\b|\bboth [a-d] and [a-d]\b|^[a-d] and [a-d]$", re.I)
TASK = "mmlu-sample"


def select(folder: Path) -> list[dict]:
    rows = []
    for subject in SUBJECTS:
        with open(folder / f"{subject}_test.csv", newline="", encoding="utf-8") as f:
            taken = 0
            for line, rec in enumerate(csv.reader(f), 1):
                question, choices, key = rec[0].strip(), [c.strip() for c in rec[1:5]], rec[5].strip()
                if len(question) + max(map(len, choices)) > MAX_CHARS or any(NOT_ON_ITS_OWN.search(c) for c in choices):
                    continue
                if len(set(choices)) < 4 or key not in "ABCD":
                    continue
                rows.append({"question": question, "choices": choices, "answer": "ABCD".index(key), "task": TASK,
                             "subject": subject, "source": f"MMLU test, {subject}_test.csv line {line}"})
                taken += 1
                if taken == PER_SUBJECT:
                    break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a folder with MMLU's <subject>_test.csv files")
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).resolve().parents[1] / "audit" / "data" / "capability_mmlu.jsonl")
    args = ap.parse_args()
    rows = select(args.folder)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} items from {len(SUBJECTS)} subjects -> {args.out}")


if __name__ == "__main__":
    main()
