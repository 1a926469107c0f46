"""Labelled completions for the learned refusal judge: loaders for the public sources and the frozen split.

Every row is ``{"id", "prompt", "completion", "label", "source"}`` with label ``refusal`` or
``compliance``. The split is decided by a hash of the prompt alone, so every completion of one
prompt lands on the same side and nothing about the answers or the labels can move a row:
``test`` when the first 8 hex digits of sha256(normalized prompt) are 0 modulo 5 (about 20 %).
``scripts/judge_split.json`` records the rule, the pinned source files and the test IDs; it was
committed before any model was fitted or any rule tuned (docs/judge-data-card.md).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from pathlib import Path

SPLIT_FILE = Path(__file__).with_name("judge_split.json")
GPTFUZZ_FILES = {  # path inside github.com/sherdencooper/GPTFuzz at commit 1eddeb565740ae311b5f4950492b011a6f866fe7
    "datasets/questions/question_list.csv": "18531eb6bc1c8fc0b8f66822b366b872202b852bf28826cef590ad0d7a81c749",
    "datasets/responses_labeled/train.csv": "e25fe2a06d2085af260927164364524628c8b5c1dd1bab1b58ddbd917c3f7cb0",
    "datasets/responses_labeled/evaluate.csv": "ca9e460c7fbcf3bc7c028c9e29297dd58cfbd54050f7729fbc635a6880a62a02",
}


def prompt_key(prompt: str) -> str:
    """sha256 of the prompt, lower-cased with runs of whitespace made one space."""
    return hashlib.sha256(re.sub(r"\s+", " ", prompt.strip().lower()).encode("utf-8")).hexdigest()


def split_of(prompt: str) -> str:
    return "test" if int(prompt_key(prompt)[:8], 16) % 5 == 0 else "train"


def _checked(root: Path, rel: str, sha: str) -> Path:
    p = root / rel
    if not p.is_file():
        raise SystemExit(f"{p}: missing; clone github.com/sherdencooper/GPTFuzz at commit 1eddeb5 (docs/judge-data-card.md)")
    got = hashlib.sha256(p.read_bytes()).hexdigest()
    if got != sha:
        raise SystemExit(f"{p}: sha256 {got} is not the pinned {sha}; check out commit 1eddeb5")
    return p


def load_gptfuzz(root: str | Path) -> list[dict]:
    """GPTFuzz's human-labelled responses (label 1 = the harmful content was given -> compliance, 0 -> refusal)."""
    root = Path(root)
    paths = {rel: _checked(root, rel, sha) for rel, sha in GPTFUZZ_FILES.items()}
    csv.field_size_limit(sys.maxsize)
    with paths["datasets/questions/question_list.csv"].open(encoding="utf-8", newline="") as f:
        questions = {int(r["index"]): r["text"] for r in csv.DictReader(f)}
    rows = []
    for part in ("train", "evaluate"):
        with paths[f"datasets/responses_labeled/{part}.csv"].open(encoding="utf-8", newline="") as f:
            for i, r in enumerate(csv.DictReader(f)):
                rows.append({"id": f"gptfuzz/{part}/{i}", "prompt": questions[int(r["question"])], "completion": r["Response"],
                             "label": "compliance" if r["label"].strip() == "1" else "refusal", "source": "GPTFuzz"})
    return rows


def load_jsonl(path: str | Path, prefix: str) -> list[dict]:
    """Project-written rows (their ``source`` says so); unknown-labelled rows are left out (the model has two classes)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            r = json.loads(line)
            if r["label"] in ("refusal", "compliance"):
                out.append({"id": f"{prefix}/{i}", "prompt": r.get("prompt") or "", "completion": r["completion"],
                            "label": r["label"], "source": r["source"]})
    return out


def frozen_split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, test) as recorded in judge_split.json; a row the file does not know raises."""
    spec = json.loads(SPLIT_FILE.read_text(encoding="utf-8"))
    test_ids = set(spec["test_ids"])
    train, test = [], []
    for r in rows:
        side = split_of(r["prompt"])
        if (r["id"] in test_ids) != (side == "test"):
            raise SystemExit(f"{r['id']}: the split rule and judge_split.json disagree; the sources changed")
        (test if side == "test" else train).append(r)
    return train, test


def write_split(rows: list[dict]) -> dict:
    """Freeze the split of ``rows`` into judge_split.json (done once, before any fitting)."""
    test = [r for r in rows if split_of(r["prompt"]) == "test"]
    spec = {
        "rule": "test iff int(sha256(re.sub(r'\\s+', ' ', prompt.strip().lower()))[:8], 16) % 5 == 0",
        "sources": {"GPTFuzz": {"repository": "https://github.com/sherdencooper/GPTFuzz",
                                "commit": "1eddeb565740ae311b5f4950492b011a6f866fe7", "files_sha256": GPTFUZZ_FILES}},
        "counts": {"rows": len(rows), "test_rows": len(test),
                   "prompts": len({r["prompt"] for r in rows}), "test_prompts": len({r["prompt"] for r in test}),
                   "test_refusal": sum(r["label"] == "refusal" for r in test)},
        "test_prompt_sha256": sorted({prompt_key(r["prompt"]) for r in test}),
        "test_ids": sorted(r["id"] for r in test),
    }
    SPLIT_FILE.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return spec


if __name__ == "__main__":  # python scripts/judge_data.py GPTFUZZ_DIR  -> writes judge_split.json
    s = write_split(load_gptfuzz(sys.argv[1]))
    print(json.dumps(s["counts"]))
