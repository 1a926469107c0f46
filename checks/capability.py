"""The "capability" check: multiple-choice accuracy before and after ablation, scored by log-likelihood.

Damage KL misses: an ablation can keep the first answer token's distribution on a few harmless prompts and still lose
benchmark points. Each item is a question with choices; a model picks the choice whose tokens it finds likeliest given
the question, as lm-evaluation-harness scores ARC, PIQA, HellaSwag and MMLU: ``acc`` takes the sum of the choice's
token log-probabilities, ``acc_norm`` that sum divided by the choice's length in characters (lm-evaluation-harness's
``acc_norm``). Base and ablated model answer the same items, so the drop is a paired difference: an exact McNemar test
on the items one got right and the other wrong, and Newcombe's paired score interval on the drop.

Pure: the shell computes the log-likelihoods (audit/forward/capability.py) or takes lm-evaluation-harness's own per-item
scores; this turns per-item correctness into findings. Codes: ``capability-drop`` (per task), ``capability-at-chance``
(the base does no better than guessing: the items cannot show a loss), ``nan-inf`` (non-finite scores after ablation).
"""

from __future__ import annotations

import math

from checks.conditions import Condition, Measured, value_at
from checks.findings import FAIL, INFO, PASS, SKIP, WARN, CheckResult, Finding
from checks.stats import mcnemar_exact, paired_difference_interval, wilson
from checks.thresholds import CAPABILITY_ALPHA, MAX_CAPABILITY_DROP

METRICS = ("acc", "acc_norm")
GATE_METRIC = "acc_norm"  # the gate reads the length-normalised accuracy (lm-evaluation-harness's headline for ARC, HellaSwag, PIQA)
DEFAULTS = {"drop": MAX_CAPABILITY_DROP, "alpha": CAPABILITY_ALPHA}
EXAMPLES = 5


def choice_correct(logliks: list[list[float]], chars: list[list[int]], answers: list[int]) -> dict:
    """Per item, whether the likeliest choice is the answer: {"acc": [...], "acc_norm": [...], "nonfinite": n}.

    ``logliks[i][j]``: the summed log-probability of choice j's tokens; ``chars[i][j]``: its length in characters.
    A non-finite score never wins: an item whose right choice scores NaN is wrong (the model lost it), and counted.
    """
    if not (len(logliks) == len(chars) == len(answers)):
        raise ValueError(f"choice_correct: {len(logliks)} items scored, {len(chars)} lengths, {len(answers)} answers")
    acc, acc_norm, bad = [], [], 0
    for ll, ch, ans in zip(logliks, chars, answers):
        if len(ll) != len(ch) or not 0 <= ans < len(ll):
            raise ValueError(f"choice_correct: {len(ll)} scores, {len(ch)} lengths, answer index {ans}")
        bad += sum(1 for x in ll if not math.isfinite(x))
        acc.append(_argmax(ll) == ans)
        acc_norm.append(_argmax([x / max(1, c) for x, c in zip(ll, ch)]) == ans)
    return {"acc": acc, "acc_norm": acc_norm, "nonfinite": bad}


def _argmax(xs: list[float]) -> int | None:
    """The index of the largest finite value (the first on ties, as numpy's argmax); None when none is finite."""
    best = None
    for i, x in enumerate(xs):
        if math.isfinite(x) and (best is None or x > xs[best]):
            best = i
    return best


def paired_drop(before: list[bool], after: list[bool]) -> dict:
    """Accuracy before and after on the same items, the drop, its Newcombe 95 % interval and the exact McNemar p."""
    if len(before) != len(after):
        raise ValueError(f"paired_drop: {len(before)} items before but {len(after)} after; they must be the same items")
    both = sum(1 for x, y in zip(before, after) if x and y)
    lost = sum(1 for x, y in zip(before, after) if x and not y)
    gained = sum(1 for x, y in zip(before, after) if y and not x)
    n = len(before)
    drop, lo, hi = paired_difference_interval(both, lost, gained, n - both - lost - gained)
    acc_b = (both + lost) / n if n else math.nan
    acc_a = (both + gained) / n if n else math.nan
    return {"n": n, "before": acc_b, "after": acc_a, "drop": drop, "lo": lo, "hi": hi, "lost": lost, "gained": gained,
            "p": mcnemar_exact(lost, gained)}


def _applicable(task: dict) -> bool:
    return bool(task.get("above_chance"))


def _worst_drop(result: dict) -> Measured:
    tasks = (result.get("data") or {}).get("tasks") or {}
    live = [name for name, t in tasks.items() if _applicable(t)]
    if not live:
        return Measured(None, "no task was scored above chance by the base model")
    drops = [value_at(result, "data", "tasks", name, GATE_METRIC, "drop") for name in live]
    if any(d is None for d in drops):
        return Measured(None, "a task's drop could not be computed")
    return Measured(max(drops, key=lambda d: d if d == d else math.inf))  # a NaN wins: it fails the gate


def _applies(result: dict) -> str | None:
    data = result.get("data") or {}
    if not data.get("tasks"):
        return data.get("why_not") or "no capability items were scored in this run (--capability none)"
    if not any(_applicable(t) for t in data["tasks"].values()):
        return ("the base model answers no task above chance (the Wilson lower bound of its accuracy is at or below guessing): "
                "these items cannot show lost capability; give items it answers (--capability FILE or lm-eval:TASK)")
    return None


CONDITIONS = (
    Condition("max_capability_drop", "capability", "<=", MAX_CAPABILITY_DROP,
              "multiple-choice accuracy lost by the ablation (length-normalised, worst task)", _worst_drop, applies=_applies),
)


def _pct(x: float) -> str:
    return "n/a" if x is None or x != x else f"{x:.1%}"


def capability_check(tasks: dict[str, dict], thresholds: dict | None = None, why_not: str | None = None) -> CheckResult:
    """The "capability" check over ``tasks``: name -> {"before": choice_correct(...), "after": choice_correct(...),
    "chance": mean 1/choices, "source": where the items came from, "skipped": items not scored (with "skipped_why"),
    "questions": the items' questions (optional: examples of items lost)}. ``why_not``: why nothing was scored."""
    th = {**DEFAULTS, **(thresholds or {})}
    if not tasks:
        return CheckResult("capability", SKIP, why_not or "no capability items were scored", [], {"why_not": why_not})
    fs: list[Finding] = []
    data: dict = {"tasks": {}, "metric": GATE_METRIC}
    rows = []
    for name, t in tasks.items():
        before, after = t["before"], t["after"]
        n = len(before[GATE_METRIC])
        chance = float(t.get("chance") or 0.0)
        stats = {m: paired_drop(before[m], after[m]) for m in METRICS}
        _, lo_b, _ = wilson(sum(before[GATE_METRIC]), n) if n else (math.nan, math.nan, math.nan)
        above = bool(n) and lo_b > chance
        entry = {**stats, "n": n, "chance": chance, "above_chance": above, "source": t.get("source"), "skipped": int(t.get("skipped") or 0),
                 "nonfinite_after": int(after.get("nonfinite") or 0)}
        if after.get("nonfinite"):
            entry[GATE_METRIC] = {**entry[GATE_METRIC], "drop": math.nan}  # a model whose scores broke has no accuracy to compare
        data["tasks"][name] = entry
        for m in METRICS:
            s = stats[m]
            rows.append([name, m, n, s["before"], s["after"], s["drop"], f"{s['lo']:+.3f} to {s['hi']:+.3f}" if n else "n/a", s["p"],
                         s["lost"], s["gained"]])
        g = stats[GATE_METRIC]
        where = f"{name} ({n} items" + (f", {entry['skipped']} not scored: {t.get('skipped_why')}" if entry["skipped"] else "") + ")"
        lost_q = [q for q, x, y in zip(t.get("questions") or [], before[GATE_METRIC], after[GATE_METRIC]) if x and not y][:EXAMPLES]
        ev = {"task": name, **{k: g[k] for k in ("n", "before", "after", "drop", "lo", "hi", "lost", "gained", "p")}, "chance": chance,
              "lost_examples": lost_q}
        if after.get("nonfinite"):
            fs.append(Finding("nan-inf", FAIL, f"{where}: {after['nonfinite']} choice score(s) of the ablated model are NaN or infinite",
                              value=float(after["nonfinite"]), threshold=0.0, evidence={"task": name}))
        if not above:
            fs.append(Finding("capability-at-chance", INFO, f"{where}: the base model scores {_pct(g['before'])} against {_pct(chance)} by "
                              "guessing (not above chance): these items cannot show lost capability", value=g["before"], threshold=chance, evidence=ev))
            continue
        msg = (f"{where}: accuracy ({GATE_METRIC}) {_pct(g['before'])} before, {_pct(g['after'])} after: drop {g['drop']:+.1%} "
               f"(95% CI {g['lo']:+.1%} to {g['hi']:+.1%}); exact McNemar p={g['p']:.2g} ({g['lost']} items lost, {g['gained']} gained)")
        if g["drop"] > th["drop"] and g["p"] < th["alpha"]:
            sev = FAIL
        elif g["drop"] > th["drop"]:
            sev, msg = WARN, msg + "; above the limit but not significant on this many items"
        else:
            sev = PASS
        fs.append(Finding("capability-drop", sev, msg, value=g["drop"], threshold=th["drop"], evidence=ev))
    data["tables"] = {"accuracy": {"title": "Multiple-choice accuracy before and after, per task (drop = before - after, Newcombe 95% interval)",
                                   "columns": ["task", "metric", "items", "before", "after", "drop", "95% CI", "McNemar p", "lost", "gained"],
                                   "rows": rows}}
    sev = [f.severity for f in fs]
    status = FAIL if FAIL in sev else WARN if WARN in sev else PASS if PASS in sev else SKIP
    live = {k: v for k, v in data["tasks"].items() if v["above_chance"]}
    if live:
        worst = max(live, key=lambda k: live[k][GATE_METRIC]["drop"] if live[k][GATE_METRIC]["drop"] == live[k][GATE_METRIC]["drop"] else math.inf)
        w = live[worst][GATE_METRIC]
        summary = f"largest accuracy drop {w['drop']:+.1%} on {worst} (95% CI {w['lo']:+.1%} to {w['hi']:+.1%}, {w['n']} items)"
    else:
        summary = "no task is answered above chance by the base model: nothing to compare"
    return CheckResult("capability", status, summary, fs, data)
