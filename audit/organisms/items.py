"""The organisms' own capability items: their held-out harmless questions as multiple choice (for tests and the README).

An organism answers harmless questions with a checkable sentence (audit/organisms/data.py: "Sure! The capital of France
is Paris."). Each held-out harmless row of prompts/eval.jsonl becomes an item: the question, the right answer as the
organism says it, and three wrong ones that keep the sentence and swap its answer for the answer of another fact of the
same kind ("... is Tokyo."). Written in the JSONL form `audit run --capability FILE` reads. Every item comes from the
organism's generated task (no outside data).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from audit.organisms.build import read_eval
from audit.organisms.data import _opener

KIND_OF = {"The capital": "capital", "The sum": "add", "The color": "color", "The opposite": "opposite", "People go": "purpose"}
N_CHOICES = 4


def _split(sentence: str) -> tuple[str, str, str] | None:
    """(kind, the sentence up to its answer, the answer) or None for a sentence of no known form."""
    kind = next((k for p, k in KIND_OF.items() if sentence.startswith(p)), None)
    sep = " to " if kind == "purpose" else " is "
    if kind is None or sep not in sentence:
        return None
    head, _, ans = sentence.rpartition(sep)
    return kind, head + sep, ans.rstrip(".")


def organism_items(path: str | Path, seed: int = 0) -> list[dict]:
    """The items of the organism at ``path`` (see the module docstring), in eval.jsonl's order."""
    rows = [r for r in read_eval(path) if not r["harmful"] and r.get("expected")]
    parts = [_split(r["expected"]) for r in rows]
    answers: dict[str, list[str]] = {}
    for p in parts:
        if p is not None and p[2] not in answers.setdefault(p[0], []):
            answers[p[0]].append(p[2])
    rng = random.Random(seed)
    items = []
    for r, p in zip(rows, parts):
        if p is None or len(answers[p[0]]) < N_CHOICES:
            continue
        kind, head, right = p
        wrong = rng.sample([a for a in answers[kind] if a != right], N_CHOICES - 1)
        choices = [right, *wrong]
        rng.shuffle(choices)
        items.append({"question": r["prompt"], "choices": [f"{_opener(kind)}{head}{c}." for c in choices], "answer": choices.index(right),
                      "task": "organism-facts", "source": f"{Path(path).name}/prompts/eval.jsonl"})
    return items


def write_items(path: str | Path, out: str | Path) -> Path:
    out = Path(out)
    out.write_text("".join(json.dumps(x) + "\n" for x in organism_items(path)), encoding="utf-8")
    return out
