"""The "health" check: how the answers read, before and after, beyond the judge's "degenerate".

Four rates per prompt set and model, each with examples:

- ``repetition``: answers whose word 3-grams repeat earlier ones at a share of LOOP_REPEAT or more (a reasoning or
  answer loop that still reads as words, which the judge's degenerate test only catches when it is exact);
- ``loop_at_limit``: answers that ran to the token limit (finish "length") with the second half of the answer repeating
  itself: the model would never have stopped;
- ``language_switch``: answers in another language than their prompt (checks/refusal_lang.py's detector);
- ``off_topic``: answers that do not address the prompt: a lexical relevance score, the share of the prompt's content
  words (lower case, three letters or more, not function words, a plural "s" dropped) that the answer uses; at or below
  OFF_TOPIC the answer is off topic. Refusals are left out (declining addresses the request), and so are prompts with
  fewer than two content words. Lexical, not a sentence encoder: it needs no model, it is the same on every machine,
  and its threshold means something readable; it misses paraphrases and answers in another language (counted above).

A rate after ablation HEALTH_MARGIN above the base's warns; nothing here fails the gate (the report shows the examples).
"""

from __future__ import annotations

import re

from checks.findings import INFO, PASS, WARN, CheckResult, Finding
from checks.refusal_lang import detect_language
from checks.stats import wilson
from checks.thresholds import HEALTH_MARGIN, LOOP_REPEAT, OFF_TOPIC

MEASURES = ("repetition", "loop_at_limit", "language_switch", "off_topic")
TEXT = {"repetition": "answers repeating their own 3-grams", "loop_at_limit": "answers cut at the token limit inside a loop",
        "language_switch": "answers in another language than the prompt", "off_topic": "answers that do not address the prompt"}
EXAMPLES = 3
MIN_NGRAMS = 6
_WORDS = re.compile(r"[^\W\d_]+|\d+", re.U)
_STOP = frozenset("""the and for are but not you your yours with what which who whom whose when where why how this that these those
there their them they then than can could would should will shall may might must have has had does did doing done was were
been being from into onto about above below over under again further once here all any both each few more most other some
such only own same too very just also please tell give know like want need help explain describe what's i'd i'm let
thanks thank quick question answer brief concise hey hi hello sure okay""".split())


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORDS.findall(text)]


def repeat_share(text: str, n: int = 3) -> float | None:
    """Share of the answer's word n-grams that repeat an earlier one (None when it has fewer than MIN_NGRAMS of them)."""
    w = _words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if len(grams) < MIN_NGRAMS:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def content_words(text: str) -> set[str]:
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in _words(text) if len(w) >= 3 and w not in _STOP and not w.isdigit()} | \
           {w for w in _words(text) if w.isdigit()}


def relevance(prompt: str, answer: str) -> float | None:
    """Share of the prompt's content words the answer uses (None when the prompt has fewer than two)."""
    p = content_words(prompt)
    if len(p) < 2:
        return None
    return len(p & content_words(answer)) / len(p)


def answer_health(prompt: str, answer: str, finish_reason: str, refused: bool | None = None) -> dict:
    """Each measure for one answer: True / False, or None where it does not apply."""
    rep = repeat_share(answer)
    half = answer[len(answer) // 2:]
    tail = repeat_share(half)
    lang_p, lang_a = detect_language(prompt)[0], detect_language(answer)[0]
    rel = relevance(prompt, answer) if answer.strip() and refused is not True else None
    return {"repetition": None if rep is None else rep >= LOOP_REPEAT,
            "loop_at_limit": finish_reason == "length" and tail is not None and tail >= LOOP_REPEAT,
            "language_switch": None if not answer.strip() else lang_a != lang_p,
            "off_topic": None if rel is None else rel <= OFF_TOPIC,
            "relevance": rel, "repeat_share": rep}


def _rate(flags: list[bool | None]) -> dict:
    k = sum(1 for f in flags if f)
    n = sum(1 for f in flags if f is not None)
    p, lo, hi = wilson(k, n) if n else (None, None, None)
    return {"k": k, "n": n, "rate": p, "lo": lo, "hi": hi}


def health_check(answers: dict[tuple[str, str], list[dict]], margin: float = HEALTH_MARGIN) -> CheckResult:
    """``answers[(side, set)]``: dicts with prompt, answer, finish_reason, refused (side "base" or "abl"). Rates per
    measure, side and set, with examples; a rate after ablation ``margin`` above the base's warns."""
    scored = {k: [(a, answer_health(a["prompt"], a["answer"], a.get("finish_reason") or "stop", a.get("refused"))) for a in v]
              for k, v in answers.items()}
    sets = sorted({s for _, s in answers})
    data: dict = {"rates": {}, "examples": {}}
    rows, fs = [], []
    for s in sets:
        for m in MEASURES:
            r = {side: _rate([h[m] for _, h in scored.get((side, s), [])]) for side in ("base", "abl")}
            data["rates"][f"{m}.{s}"] = r
            ex = [{"prompt": a["prompt"][:200], "answer": a["answer"][:400], **({"relevance": round(h["relevance"], 3)} if h["relevance"] is not None else {})}
                  for a, h in scored.get(("abl", s), []) if h[m]][:EXAMPLES]
            if ex:
                data["examples"][f"{m}.{s}"] = ex
            b, a = r["base"], r["abl"]
            rows.append([s, TEXT[m], _cell(b), _cell(a)])
            if a["rate"] is None:
                continue
            worse = b["rate"] is not None and a["rate"] > b["rate"] + margin
            sev = WARN if worse else PASS if a["k"] == 0 else INFO
            fs.append(Finding(f"health-{m.replace('_', '-')}", sev, f"{TEXT[m]}, {s} prompts: {_cell(b)} before, {_cell(a)} after",
                              value=a["rate"], threshold=(b["rate"] or 0.0) + margin, evidence={"before": b, "after": a, "set": s, "examples": ex}))
    data["tables"] = {"rates": {"title": "Generation health: share of answers, before and after (95% Wilson interval)",
                               "columns": ["set", "measure", "before", "after"], "rows": rows}}
    ex_rows = [[key.split(".")[1], TEXT[key.split(".")[0]], e["prompt"], e["answer"]] for key, es in data["examples"].items() for e in es]
    if ex_rows:
        data["tables"]["examples"] = {"title": "Examples after ablation", "columns": ["set", "measure", "prompt", "answer"], "rows": ex_rows}
    data["relevance_measure"] = "lexical: share of the prompt's content words in the answer"
    warn = [f for f in fs if f.severity == WARN]
    status = WARN if warn else PASS
    summary = "; ".join(f.message for f in warn[:3]) if warn else "no measure of answer health is worse after ablation than before"
    return CheckResult("health", status, summary, fs, data)


def _cell(r: dict) -> str:
    if not r["n"]:
        return "n/a"
    return f"{r['rate']:.0%} ({r['k']}/{r['n']}, {r['lo']:.0%}-{r['hi']:.0%})"
