"""Everything `audit run` needs from one model, measured while that model alone is loaded.

The ablated model goes first: probes (routing, writes along r) and, from the same forward pass, the last prompt
token's log-probabilities (harmless prompts: for KL; every prompt: the first-token refusal score the simulator
calibrates on); greedy completions (local, or from a server); its answer distributions on harmless prompts kept
compact (top-k per position). It is then released and the base model measures the same, plus the KL against what
the ablated model left. What crosses between the two is sized by prompts and tokens, never by weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from audit.forward.damage import answer_distributions, kl_against_compact
from audit.forward.generate import Completion
from audit.forward.probe import ProbeResult, probe
from audit.model.prompts import conversations

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
    forced_harmless: list | None = None  # the harmless completions as first generated (the teacher-forced KL reads these)
    seconds: dict = field(default_factory=dict)
    capability: dict | None = None  # per task: per-item correctness on the multiple-choice items (audit/forward/capability.py)
    second_turn: dict[str, list[Completion]] | None = None  # per set: answers to a second user turn after a benign first exchange


def _scores(lp: torch.Tensor, token_ids) -> torch.Tensor:
    ids = torch.tensor(sorted({int(t) for t in token_ids}), dtype=torch.long)
    ref = torch.logsumexp(lp[:, ids], dim=-1).clamp(max=-1e-7)
    return ref - torch.log(-torch.expm1(ref))


@contextmanager
def _quiet_step(name: str, total: int | None = None):
    yield lambda n=1: None


def measure(model, tok, prompts: dict[str, list], r: torch.Tensor, generator, max_new_tokens: int, batch_size: int, refusal_ids,
            keep_answer_dists: bool = False, against: tuple[list, list] | None = None, stage=None, extend=None, capability=None,
            multi_turn: int = 0) -> Passes:
    """The passes of one loaded ``model``; ``generator`` produces its completions (local or a server).

    ``keep_answer_dists``: keep the compact answer distributions of the harmless completions (for the other side's KL).
    ``against``: (completions, compact distributions) of the other model on the harmless prompts: KL(this || that).
    ``extend(set, prompts, completions)``: returns the completions with cut-off ones generated further while this model is
    loaded (audit/judgement/extend.py); the first-token checks and the KL read the answers as first generated.
    ``stage(name, total)`` returns a context manager that times a step and yields ``advance(n)`` for its progress bar
    (audit/pipeline/run.py's); a server's completions are checked against this model's greedy first token (check_first_tokens).
    ``capability``: an audit.forward.capability.CapabilitySpec scored on this model; ``multi_turn``: how many prompts per set
    get a second-turn conversation (after a harmless question and this model's own answer to it).
    """
    step = stage or _quiet_step
    n = {k: len(prompts[k]) for k in SETS}
    with step("probes", sum(n.values())) as advance:
        # one probe over both sets: the hooks go on once, offloaded expert weights are read once for r's projections
        both = prompts["harmful"] + prompts["harmless"]
        seen = [0]

        def progress(done, _total):
            advance(done - seen[0])
            seen[0] = done

        pr, lp_all = probe(model, tok, both, r, batch_size=batch_size, progress=progress, return_logprobs=True)
        cut = n["harmful"]
        probes = {"harmful": pr.subset(slice(0, cut)), "harmless": pr.subset(slice(cut, None))}
        lp = {"harmful": lp_all[:cut], "harmless": lp_all[cut:]}
        del lp_all
    scores = {k: _scores(lp[k], refusal_ids) for k in SETS}
    with step("completions", sum(n.values())) as advance:
        completions = {k: generator.complete(prompts[k], max_new_tokens, batch_size, progress=advance) for k in SETS}
    if getattr(generator, "remote", False):
        generator.check_first_tokens(completions, lp)
    first = completions
    if extend is not None:
        with step("extending cut-off answers"):
            completions = {k: extend(k, prompts[k], completions[k]) for k in SETS}
    del lp["harmful"]
    forced = n["harmless"] * (int(keep_answer_dists) + int(against is not None))
    with step("teacher-forced pass", forced or None) as advance:
        dists = answer_distributions(model, tok, prompts["harmless"], first["harmless"], progress=advance) if keep_answer_dists else None
        kl_tf = kl_against_compact(model, tok, prompts["harmless"], against[0], against[1], progress=advance) if against is not None else None
    out = Passes(probes, completions, lp["harmless"], scores, dists, kl_tf, forced_harmless=first["harmless"])
    if multi_turn:
        firsts = ([c.prompt for c in first["harmless"]], [c.answer for c in first["harmless"]])
        convs = {k: conversations(prompts[k], *firsts, multi_turn) for k in SETS}
        with step("second-turn completions", sum(map(len, convs.values()))) as advance:
            out.second_turn = {k: generator.complete(convs[k], max_new_tokens, batch_size, progress=advance) for k in SETS}
    if capability is not None:
        with step("capability items", capability.total()) as advance:
            out.capability = capability.score(model, tok, batch_size, progress=advance)
    return out
