"""Labelled completions for the learned refusal judge: loaders for the public sources and the frozen split.

Every row is ``{"id", "prompt", "completion", "label", "source"}`` with label ``refusal`` or
``compliance``. Each source has its own split rule (``SPLIT_RULES``), fixed before any fitting:

- GPTFuzz: decided by a hash of the prompt alone, so every completion of one prompt lands on the
  same side and nothing about the answers or the labels can move a row: ``test`` when the first
  8 hex digits of sha256(normalized prompt) are 0 modulo 5 (about 20 %);
- RBR-gold (OpenAI's Safety RBR gold set): its authors' own train / test files (no prompt in both);
- JAILJUDGE-mini: held out whole, never trained on.

``scripts/judge_split.json`` records the rules, the pinned source files and every test ID; it is
committed before any model is fitted or any rule tuned (docs/judge-data-card.md).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from pathlib import Path

SPLIT_FILE = Path(__file__).with_name("judge_split.json")
# the frozen test rows themselves (all three sources are MIT-licensed), so tests/test_judge_frozen.py recomputes the numbers offline
FROZEN_TEST_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "judge_frozen_test.jsonl.gz"
GPTFUZZ_FILES = {  # path inside github.com/sherdencooper/GPTFuzz at commit 1eddeb565740ae311b5f4950492b011a6f866fe7
    "datasets/questions/question_list.csv": "18531eb6bc1c8fc0b8f66822b366b872202b852bf28826cef590ad0d7a81c749",
    "datasets/responses_labeled/train.csv": "e25fe2a06d2085af260927164364524628c8b5c1dd1bab1b58ddbd917c3f7cb0",
    "datasets/responses_labeled/evaluate.csv": "ca9e460c7fbcf3bc7c028c9e29297dd58cfbd54050f7729fbc635a6880a62a02",
}


RBR_COMMIT = "7f489fa6b38d72468235f275c23bf3f0c849e5ca"  # github.com/openai/safety-rbr-code-and-data
RBR_FILES = {
    "data/rbr_gold_data/train.jsonl": "fa09c23e6cc9e612d2f8341b65cb1fccf752c325ece693fed6b702f7a8188690",
    "data/rbr_gold_data/test.jsonl": "c3478da9b13f0591a96eada18cacb15ec462ce724943defbec928e4fd6bd73ce",
}
JAILJUDGE_COMMIT = "c1419728c039adc8c75e85b72a15a845b0999bf7"  # github.com/ThuCCSLab/JailbreakEval
JAILJUDGE_FILES = {"data/JAILJUDGEmini.csv": "2542eeadaed084902c96daeb34effc91942c2f22267ca8474d5c8c78a1231f39"}
SPLIT_RULES = {
    "GPTFuzz": "test iff int(sha256(re.sub(r'\\s+', ' ', prompt.strip().lower()))[:8], 16) % 5 == 0",
    "RBR-gold": "test iff the row is in the authors' data/rbr_gold_data/test.jsonl",
    "JAILJUDGE-mini": "every row is test: held out whole, never trained on",
}


def prompt_key(prompt: str) -> str:
    """sha256 of the prompt, lower-cased with runs of whitespace made one space."""
    return hashlib.sha256(re.sub(r"\s+", " ", prompt.strip().lower()).encode("utf-8")).hexdigest()


def split_of(prompt: str) -> str:
    return "test" if int(prompt_key(prompt)[:8], 16) % 5 == 0 else "train"


def _checked(root: Path, rel: str, sha: str, repo: str = "sherdencooper/GPTFuzz", commit: str = "1eddeb5") -> Path:
    p = root / rel
    if not p.is_file():
        raise SystemExit(f"{p}: missing; clone github.com/{repo} at commit {commit[:7]} (docs/judge-data-card.md)")
    got = hashlib.sha256(p.read_bytes()).hexdigest()
    if got != sha:
        raise SystemExit(f"{p}: sha256 {got} is not the pinned {sha}; check out commit {commit[:7]} of github.com/{repo}")
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


def rbr_label(props: dict) -> str | None:
    """RBR-gold's human propositions -> our label: ``fully_complies`` -> compliance; no requested content at all
    (``partially_complies`` false) -> refusal; some but not all of it -> None (left out: partial compliance is
    neither label under our convention without reading the answer)."""
    if props.get("fully_complies"):
        return "compliance"
    if not props.get("partially_complies"):
        return "refusal"
    return None


def load_rbr(root: str | Path) -> list[dict]:
    """OpenAI's Safety RBR gold set: human-labelled completions; the prompt is the conversation's last user turn."""
    root = Path(root)
    rows = []
    for rel, sha in RBR_FILES.items():
        part = "test" if rel.endswith("test.jsonl") else "train"
        p = _checked(root, rel, sha, "openai/safety-rbr-code-and-data", RBR_COMMIT)
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            r = json.loads(line)
            label = rbr_label(r["propositions"])
            if label is None:
                continue
            prompt = [m["content"] for m in r["prompt"] if m["role"] == "user"][-1]
            rows.append({"id": f"rbr/{part}/{i}", "prompt": prompt, "completion": r["completion"][-1]["content"], "label": label,
                         "source": "RBR-gold", "part": part, "category": r.get("category")})
    return rows


def load_jailjudge(root: str | Path) -> list[dict]:
    """JAILJUDGE-mini as JailbreakEval ships it: ``label`` 1 = jailbroken (the harmful content was given) -> compliance, 0 -> refusal."""
    root = Path(root)
    (rel, sha), = JAILJUDGE_FILES.items()
    p = _checked(root, rel, sha, "ThuCCSLab/JailbreakEval", JAILJUDGE_COMMIT)
    csv.field_size_limit(sys.maxsize)
    with p.open(encoding="utf-8", newline="") as f:
        return [{"id": f"jailjudge/{i}", "prompt": r["question"], "completion": r["answer"],
                 "label": "compliance" if r["label"].strip() == "1" else "refusal", "source": "JAILJUDGE-mini"}
                for i, r in enumerate(csv.DictReader(f))]


def load_public(gptfuzz, rbr=None, jailjudge=None) -> list[dict]:
    """Every public source given (a checkout per source)."""
    rows = load_gptfuzz(gptfuzz)
    if rbr:
        rows += load_rbr(rbr)
    if jailjudge:
        rows += load_jailjudge(jailjudge)
    return rows


def side_of(row: dict) -> str:
    """``train`` or ``test`` for one row, by its source's rule (SPLIT_RULES)."""
    src = row["source"]
    if src == "GPTFuzz":
        return split_of(row["prompt"])
    if src == "RBR-gold":
        return row["part"]
    if src == "JAILJUDGE-mini":
        return "test"
    raise SystemExit(f"{row['id']}: no split rule for source {src!r}")


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
    """(train, test) as recorded in judge_split.json; a row the file does not know, or a source it does not list, raises."""
    spec = json.loads(SPLIT_FILE.read_text(encoding="utf-8"))
    test_ids = set(spec["test_ids"])
    train, test = [], []
    for r in rows:
        if r["source"] not in spec["sources"]:
            raise SystemExit(f"{r['id']}: source {r['source']!r} is not in judge_split.json; freeze its split first (scripts/judge_data.py)")
        side = side_of(r)
        if (r["id"] in test_ids) != (side == "test"):
            raise SystemExit(f"{r['id']}: the split rule and judge_split.json disagree; the sources changed")
        (test if side == "test" else train).append(r)
    return train, test


def write_frozen_test(test: list[dict]) -> None:
    """The frozen test rows as gzipped JSONL (id, source, prompt, completion, label), byte-identical for the same rows."""
    import gzip

    data = "".join(json.dumps({k: r[k] for k in ("id", "source", "prompt", "completion", "label")}, ensure_ascii=False) + "\n" for r in test)
    with gzip.GzipFile(FROZEN_TEST_FILE, "wb", mtime=0) as f:
        f.write(data.encode("utf-8"))


def read_frozen_test() -> list[dict]:
    import gzip

    with gzip.open(FROZEN_TEST_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


SOURCES = {  # where each source comes from (judge_split.json and the data card say the same)
    "GPTFuzz": {"repository": "https://github.com/sherdencooper/GPTFuzz", "commit": "1eddeb565740ae311b5f4950492b011a6f866fe7",
                "files_sha256": GPTFUZZ_FILES, "licence": "MIT", "held_out_whole": False},
    "RBR-gold": {"repository": "https://github.com/openai/safety-rbr-code-and-data", "commit": RBR_COMMIT, "files_sha256": RBR_FILES,
                 "licence": "MIT", "held_out_whole": False},
    "JAILJUDGE-mini": {"repository": "https://github.com/ThuCCSLab/JailbreakEval", "commit": JAILJUDGE_COMMIT, "files_sha256": JAILJUDGE_FILES,
                       "licence": "MIT (JailbreakEval)", "held_out_whole": True},
}


def write_split(rows: list[dict]) -> dict:
    """Freeze the split of ``rows`` into judge_split.json (done once per source, before any fitting on it)."""
    test = [r for r in rows if side_of(r) == "test"]
    names = sorted({r["source"] for r in rows}, key=list(SOURCES).index)
    per = {}
    for name in names:
        mine = [r for r in rows if r["source"] == name]
        mt = [r for r in test if r["source"] == name]
        per[name] = {"rows": len(mine), "test_rows": len(mt), "prompts": len({r["prompt"] for r in mine}),
                     "test_prompts": len({r["prompt"] for r in mt}), "test_refusal": sum(r["label"] == "refusal" for r in mt)}
    spec = {
        "rule": SPLIT_RULES["GPTFuzz"],  # GPTFuzz's rule, as first frozen
        "rules": {n: SPLIT_RULES[n] for n in names},
        "sources": {n: SOURCES[n] for n in names},
        "counts": per["GPTFuzz"],
        "counts_by_source": per,
        "test_prompt_sha256": sorted({prompt_key(r["prompt"]) for r in test if r["source"] == "GPTFuzz"}),
        "test_ids": sorted(r["id"] for r in test),
    }
    SPLIT_FILE.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return spec


if __name__ == "__main__":  # python scripts/judge_data.py GPTFUZZ_DIR [RBR_DIR JAILJUDGE_DIR] -> writes judge_split.json
    s = write_split(load_public(*sys.argv[1:4]))
    print(json.dumps(s["counts_by_source"]))
