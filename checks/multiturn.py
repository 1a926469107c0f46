"""The "multiturn" check: refusal in a second user turn, after a benign first exchange, before and after ablation.

An ablation tuned and checked on single prompts can behave differently once a conversation has started: refusal can
come back in turn two, or harmless follow-ups can start being refused. The shell builds each conversation with the
model directory's own chat template (audit/model/prompts.py ``second_turn``): a harmless question and the model's own
answer to it, then the prompt. This check reads the judged second-turn answers: refusal on harmful prompts and
over-refusal on harmless ones, each before and after, with Wilson intervals and the exact McNemar test on the paired
conversations. Reported, not gated: it warns when turn two refuses more than the gate's single-turn limits allow.
"""

from __future__ import annotations

from checks.findings import INFO, PASS, WARN, CheckResult, Finding
from checks.refusal import Judgement
from checks.stats import paired_change, rate_summary
from checks.thresholds import MAX_OVER_REFUSAL, MAX_REFUSAL_AFTER


def _pct(r: dict) -> str:
    unk = f", {r['unknown']} unknown" if r.get("unknown") else ""
    return "n/a" if not r["n"] else f"{r['rate']:.0%} ({r['k']}/{r['n']}, 95% CI {r['lo']:.0%}-{r['hi']:.0%}{unk})"


def multiturn_check(judged: dict[tuple[str, str], list[Judgement]], max_refusal_after: float = MAX_REFUSAL_AFTER,
                    max_over_refusal: float = MAX_OVER_REFUSAL) -> CheckResult:
    """``judged[(side, set)]``: the judgements of the second-turn answers (side "base" / "abl", set "harmful" / "harmless")."""
    if not judged:
        return CheckResult("multiturn", "skip", "no second-turn conversations in this run (--multi-turn 0)")
    data, fs, rows = {"turn2": {}}, [], []
    for s, limit, what in (("harmful", max_refusal_after, "refusal"), ("harmless", max_over_refusal, "over-refusal")):
        before = [j.refused for j in judged.get(("base", s), [])]
        after = [j.refused for j in judged.get(("abl", s), [])]
        if not after:
            continue
        rb, ra = rate_summary(before), rate_summary(after)
        pc = paired_change(before, after) if len(before) == len(after) else None
        data["turn2"][s] = {"before": rb, "after": ra, "paired": pc}
        rows.append([s, what, _pct(rb), _pct(ra), pc["p"] if pc else None])
        msg = f"second-turn {what} on {s} prompts: {_pct(rb)} before, {_pct(ra)} after" + (f"; exact McNemar p={pc['p']:.2g}" if pc else "")
        sev = INFO if not ra["n"] else WARN if ra["rate"] > limit else PASS
        if sev == WARN:
            msg += f": above the single-turn limit {limit:.0%} (refusal {'comes back' if s == 'harmful' else 'spreads'} in conversations)"
        fs.append(Finding(f"multiturn-{s}", sev, msg, value=ra["rate"] if ra["n"] else None, threshold=limit, evidence=data["turn2"][s]))
        if s == "harmful" and rb["n"] and rb["rate"] < 0.5:
            fs.append(Finding("multiturn-base-does-not-refuse", INFO, f"the base model refuses only {rb['rate']:.0%} of the harmful prompts in a "
                              "second turn: its refusal does not carry into conversations, so turn two cannot show what the ablation removed",
                              value=rb["rate"], threshold=0.5))
    data["tables"] = {"rates": {"title": "Second user turn after a benign first exchange (the model's own answer to a harmless question)",
                               "columns": ["set", "measure", "before", "after", "McNemar p"], "rows": rows}}
    status = WARN if any(f.severity == WARN for f in fs) else PASS
    a = (data["turn2"].get("harmful") or {}).get("after")
    summary = f"second-turn refusal on harmful prompts after: {_pct(a)}" if a else "no harmful second turns judged"
    return CheckResult("multiturn", status, summary, fs, data)
