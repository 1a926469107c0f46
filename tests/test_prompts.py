"""Prompt sets: embedded defaults, every file form, clear errors, chat formatting."""

import csv
import json

import pytest

from audit.model.prompts import format_prompts, load_prompts
from checks.errors import AuditError


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_embedded_sets_are_large_and_distinct(kind):
    ps = load_prompts(None, kind)
    assert len(ps) >= 140
    assert len(set(ps)) == len(ps)
    assert all(len(p) > 15 and p == p.strip() for p in ps)


def test_embedded_sets_do_not_overlap():
    assert not set(load_prompts(None, "harmful")) & set(load_prompts(None, "harmless"))


def test_txt_one_per_line_blank_lines_dropped(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("first prompt\n\n  second prompt  \n")
    assert load_prompts(str(p), "harmful") == ["first prompt", "second prompt"]


@pytest.mark.parametrize("col", ["prompt", "instruction", "text"])
def test_jsonl_and_csv_columns(tmp_path, col):
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps({col: f"ask {i}", "other": i}) for i in range(3)))
    assert load_prompts(j, "harmless") == ["ask 0", "ask 1", "ask 2"]
    c = tmp_path / "p.csv"
    with open(c, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", col])
        w.writeheader()
        w.writerows([{"id": i, col: f"row {i}"} for i in range(4)])
    assert load_prompts(c, "harmless") == [f"row {i}" for i in range(4)]


def test_json_list_of_strings_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = tmp_path / "p.json"
    j.write_text(json.dumps(["a b c", "d e f"]))
    assert load_prompts(j, "harmful") == ["a b c", "d e f"]
    q = tmp_path / "p.parquet"
    pq.write_table(pa.table({"instruction": ["x y", "z w", ""]}), q)
    assert load_prompts(q, "harmful") == ["x y", "z w"]


def test_missing_column_names_columns(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(AuditError, match="question"):
        load_prompts(j, "harmful")


def test_empty_set_is_an_error(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n   \n")
    with pytest.raises(AuditError, match="empty"):
        load_prompts(p, "harmful")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(AuditError, match="no such prompt file"):
        load_prompts(str(tmp_path / "nope.txt"), "harmless")


def test_bad_jsonl_line_named(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('"ok"\n{broken\n')
    with pytest.raises(AuditError, match=r"p.jsonl:2"):
        load_prompts(j, "harmless")


def test_format_prompts_uses_chat_template(tiny_tok):
    out = format_prompts(tiny_tok, ["write a poem"])
    assert out == ["<|user|>write a poem<|assistant|>"]


def test_format_prompts_needs_template(tiny_tok):
    class NoTemplate:
        chat_template = None

    with pytest.raises(AuditError, match="chat template"):
        format_prompts(NoTemplate(), ["x"])
