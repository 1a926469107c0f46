"""Everything `audit run` needs from one model, measured while that model alone is loaded.

The ablated model goes first: probes (routing, writes along r), greedy completions, the last prompt
token's log-probabilities (harmless prompts: for KL; every prompt: the first-token refusal score the
simulator calibrates on) and its answer distributions on harmless prompts kept compact (top-k per
position). It is then released and the base model measures the same, plus the KL against what the
ablated model left. What crosses between the two is sized by prompts and tokens, never by weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from audit.damage import answer_distributions, kl_against_compact
from audit.generate import Completion, last_token_logprobs
from audit.probe import ProbeResult, probe

SETS = ("harmful", "harmless")


@dataclass
class Passes:
    """One model's measurements (see the module docstring)."""

    probes: dict[str, ProbeResult]
    completions: dict[str, list[Completion]]
    first_logprobs_harmless: torch.Tensor  # [n_harmless, V] float32: KL at the first answer token
    refusal_scores: dict[str, torch.Tensor]  # per set [n]: log-odds that the first answer token is a refusal token
    answer_dists: list | None = None  # compact distributions over the harmless completions (the ablated side)
    kl_tf: list[float] | None = None  # KL(this || the other side's compact distributions) per harmless prompt (the base side)
    seconds: dict = field(default_factory=dict)


def _scores(lp: torch.Tensor, token_ids) -> torch.Tensor:
    ids = torch.tensor(sorted({int(t) for t in token_ids}), dtype=torch.long)
    ref = torch.logsumexp(lp[:, ids], dim=-1).clamp(max=-1e-7)
    return ref - torch.log(-torch.expm1(ref))


def measure(model, tok, prompts: dict[str, list], r: torch.Tensor, generator, max_new_tokens: int, batch_size: int, refusal_ids,
            keep_answer_dists: bool = False, against: tuple[list, list] | None = None, stage=None) -> Passes:
    """The passes of one loaded ``model``; ``generator`` produces its completions (local or a server).

    ``keep_answer_dists``: keep the compact answer distributions of the harmless completions (for the other side's KL).
    ``against``: (completions, compact distributions) of the other model on the harmless prompts: KL(this || that).
    ``stage(name)`` returns a context manager that times a step (audit/run.py's).
    """
    from contextlib import nullcontext

    step = stage or (lambda name: nullcontext())
    with step("probes"):
        probes = {k: probe(model, tok, prompts[k], r, batch_size=batch_size) for k in SETS}
    with step("completions"):
        completions = {k: generator.complete(prompts[k], max_new_tokens, batch_size) for k in SETS}
    with step("logits"):
        lp = {k: last_token_logprobs(model, tok, prompts[k], batch_size) for k in SETS}
        scores = {k: _scores(lp[k], refusal_ids) for k in SETS}
        dists = answer_distributions(model, tok, prompts["harmless"], completions["harmless"]) if keep_answer_dists else None
        kl_tf = kl_against_compact(model, tok, prompts["harmless"], against[0], against[1]) if against is not None else None
    return Passes(probes, completions, lp["harmless"], scores, dists, kl_tf)
