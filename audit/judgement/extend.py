"""Answers long enough to judge: cut-off completions whose judgement could still change are generated further.

A refusal that starts after the token limit would otherwise be counted as whatever came before it
(usually compliance). After a model's completions are generated, every one that hit the limit
(``finish_reason == "length"``) is judged; those whose judgement could change (checks/refusal.py
``could_change``: undecided, compliant, or a refusal without confidence) are generated again up to
``cap`` tokens in all, while the model is still loaded, and the longer answer replaces the short one.
``Extension`` says how many were cut off, extended, changed label, and remain cut off at the cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from audit.forward.generate import Completion
from checks.refusal import could_change


@dataclass
class Extension:
    limit: int  # --max-new-tokens
    cap: int  # --extend-to: the most tokens an extended answer may have
    truncated: int = 0  # completions that hit the limit
    extended: int = 0  # of them, generated further
    changed: int = 0  # of those, judged differently once longer
    still_truncated: int = 0  # completions cut off after all (at the limit, or at the cap)
    examples: list = field(default_factory=list)  # (prompt, label before, label after) of changed ones, a few

    def to_dict(self) -> dict:
        return {"limit": self.limit, "cap": self.cap, "truncated": self.truncated, "extended": self.extended, "changed": self.changed,
                "still_truncated": self.still_truncated, "examples": self.examples}


def extend_truncated(generator, prompts: list, completions: list[Completion], judge, limit: int, cap: int,
                     batch_size: int = 16) -> tuple[list[Completion], Extension]:
    """``completions`` (of ``prompts``) with the cut-off ones that ``judge`` could judge differently generated up to ``cap``
    tokens; and what happened.

    ``generator`` is the backend that made them (audit/forward/generate.py): ``extend(prompts, completions, cap, batch_size)``
    continues them. ``cap <= limit`` switches extension off (truncation is still counted)."""
    ext = Extension(limit, cap)
    cut = [i for i, c in enumerate(completions) if c.finish_reason == "length"]
    ext.truncated = len(cut)
    if not cut or cap <= limit:
        ext.still_truncated = len(cut)
        return completions, ext
    before = judge.many([completions[i].answer for i in cut], [completions[i].prompt for i in cut], [True] * len(cut))
    todo = [(i, j) for i, j in zip(cut, before) if could_change(j)]
    out = list(completions)
    if todo:
        longer = generator.extend([prompts[i] for i, _ in todo], [completions[i] for i, _ in todo], cap, batch_size)
        after = judge.many([c.answer for c in longer], [c.prompt for c in longer], [c.finish_reason == "length" for c in longer])
        for (i, j0), c, j1 in zip(todo, longer, after):
            out[i] = replace(c, extended_from=completions[i].n_tokens)
            if j1.label != j0.label:
                ext.changed += 1
                if len(ext.examples) < 5:
                    ext.examples.append({"prompt": c.prompt, "before": j0.label, "after": j1.label})
        ext.extended = len(todo)
    ext.still_truncated = sum(c.finish_reason == "length" for c in out)
    return out, ext
