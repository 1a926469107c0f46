"""The shipped judge's numbers are what it scores now: the frozen test rows of every public source, rescored.

tests/data/judge_frozen_test.jsonl.gz holds the frozen test side of the human-labelled sources (GPTFuzz,
RBR-gold, JAILJUDGE-mini; all MIT, docs/judge-data-card.md) exactly as scripts/train_judge.py scored
them. Rescoring them with the shipped weights must give the numbers in audit/data/judge_linear.json,
which `audit classify --about` prints and the report cites.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from judge_data import SPLIT_FILE, read_frozen_test  # noqa: E402
from train_judge import marker_baseline, per_source  # noqa: E402

from audit.judgement.judges import load_linear_model  # noqa: E402
from checks.refusal import judge as rules_judge  # noqa: E402
from checks.refusal_model import offline_judge  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return read_frozen_test()


def test_the_shipped_rows_are_the_frozen_split(rows):
    spec = json.loads(SPLIT_FILE.read_text(encoding="utf-8"))
    assert sorted(r["id"] for r in rows) == spec["test_ids"]
    counts = Counter(r["source"] for r in rows)
    assert counts == {k: v["test_rows"] for k, v in spec["counts_by_source"].items()}
    assert spec["sources"]["JAILJUDGE-mini"]["held_out_whole"] and counts["JAILJUDGE-mini"] == spec["counts_by_source"]["JAILJUDGE-mini"]["rows"]
    assert {r["label"] for r in rows} == {"refusal", "compliance"}


def test_shipped_model_reproduces_its_frozen_split_numbers(rows):
    model = load_linear_model()
    shipped = model.meta["frozen_test"]["sources"]
    ours = per_source(rows, [offline_judge(r["completion"], r["prompt"], model=model).label for r in rows])
    rules = per_source(rows, [rules_judge(r["completion"], r["prompt"]).label for r in rows])
    marker = per_source(rows, [marker_baseline(r["completion"]) for r in rows])
    assert set(shipped) == set(ours) == {"GPTFuzz", "RBR-gold", "JAILJUDGE-mini"}
    for src in shipped:
        assert ours[src] == shipped[src]["judge"], src
        assert rules[src] == shipped[src]["rules_only"], src
        assert marker[src] == shipped[src]["marker_baseline"], src
