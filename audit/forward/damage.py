"""How far the ablated model's next-token distributions moved from the base model's on harmless prompts.

KL(base || ablated), per prompt, in float32 log-softmax: at the first answer token (what heretic
optimizes), and averaged over the base model's own greedy answer, teacher-forced through both
models, which catches damage that shows only a few tokens in. Non-finite logits give NaN, which
the damage check reports as ``nan-inf``.
"""

from __future__ import annotations

import torch

from audit.forward.generate import Completion, LocalBackend, last_token_logprobs
from audit.forward.structure import last_logits_kwargs
from audit.model.loading import input_device


def kl_rows(lp_base: torch.Tensor, lp_abl: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last axis from float32 log-probabilities; NaN where either side is NaN."""
    p = lp_base.exp()
    kl = torch.where(p > 0, p * (lp_base - lp_abl), torch.zeros_like(p)).sum(-1)
    broken = torch.isnan(lp_base).any(-1) | torch.isnan(lp_abl).any(-1)
    return torch.where(broken, torch.full_like(kl, float("nan")), kl.clamp_min(0.0))


@torch.inference_mode()
def kl_first_token(base_model, abl_model, tokenizer, prompts: list, batch_size: int = 16) -> list[float]:
    """Per-prompt KL(base || ablated) of the first answer token's distribution."""
    lp_b = last_token_logprobs(base_model, tokenizer, prompts, batch_size)
    lp_a = last_token_logprobs(abl_model, tokenizer, prompts, batch_size)
    return kl_rows(lp_b, lp_a).tolist()


@torch.inference_mode()
def kl_teacher_forced(base_model, abl_model, tokenizer, prompts: list, base_completions: list[Completion | list[int] | str],
                      batch_size: int = 8) -> list[float]:
    """Per-prompt mean KL(base || ablated) over the base completion's tokens, both models fed the same tokens.

    ``base_completions`` are the base model's greedy completions (Completion with token ids, or
    ids, or text that is re-tokenized). Position t's distribution predicts answer token t, so the
    first answer token is included; an empty completion falls back to the first token alone.
    """
    if len(prompts) != len(base_completions):
        raise ValueError(f"kl_teacher_forced: {len(prompts)} prompts but {len(base_completions)} completions")
    enc = LocalBackend(base_model, tokenizer).encode(prompts)
    answers = [_ids(c, tokenizer) for c in base_completions]
    out: list[float] = []
    for s in range(0, len(enc), batch_size):
        seqs = [p + a for p, a in zip(enc[s:s + batch_size], answers[s:s + batch_size])]
        spans = [(len(p) - 1, len(p) - 1 + max(1, len(a))) for p, a in zip(enc[s:s + batch_size], answers[s:s + batch_size])]
        width = max(map(len, seqs))
        pad = tokenizer.pad_token_id
        dev_b, dev_a = input_device(base_model), input_device(abl_model)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in seqs], device=dev_b)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=dev_b)
        lb = torch.log_softmax(base_model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1).cpu()
        la = torch.log_softmax(abl_model(input_ids=ids.to(dev_a), attention_mask=mask.to(dev_a)).logits.float(), dim=-1).cpu()
        for row, (x, (a, b)) in enumerate(zip(seqs, spans)):
            shift = width - len(x)  # left padding
            kl = kl_rows(lb[row, shift + a: shift + b], la[row, shift + a: shift + b])
            out.append(float(kl.mean()))
    return out


def _ids(c, tokenizer) -> list[int]:
    """The answer's token ids (the end-of-sequence token kept: whether the model stops is part of its behaviour)."""
    if isinstance(c, Completion):
        if c.token_ids is not None:
            return list(c.token_ids)
        c = c.text
    if isinstance(c, str):
        return tokenizer(c, add_special_tokens=False)["input_ids"]
    return list(c)


# -- one model at a time: the ablated model's answer distributions kept compact, the base's judged against them --

TOPK = 64  # next-token probabilities kept per answer position: a greedy answer's distributions hold nearly all their mass there


@torch.inference_mode()
def answer_distributions(model, tokenizer, prompts: list, completions: list, k: int = TOPK, batch_size: int = 8,
                         progress=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt, the model's next-token distribution at every position of ``completions`` (teacher-forced), kept as
    (ids [T, k] int64, log-probs [T, k] float32): prompts x tokens x k numbers, never the vocabulary."""
    out = []
    for lp in _forced_logprobs(model, tokenizer, prompts, completions, batch_size, progress):
        top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        out.append((top.indices.cpu(), top.values.cpu()))
    return out


@torch.inference_mode()
def kl_against_compact(model, tokenizer, prompts: list, completions: list, reference: list, batch_size: int = 8, progress=None) -> list[float]:
    """Per prompt, mean over answer positions of KL(model || reference), the reference kept as its top-k (answer_distributions).

    The vocabulary is coarse-grained into the reference's top-k tokens and one "rest" bucket; KL over that partition is
    a lower bound of the full KL (data processing) and equals it when both distributions keep their mass in those k
    tokens, as greedy answers do. NaN where either side is not finite.
    """
    if len(reference) != len(prompts):
        raise ValueError(f"kl_against_compact: {len(prompts)} prompts but {len(reference)} reference distributions")
    out = []
    for lp_full, (ids, lq) in zip(_forced_logprobs(model, tokenizer, prompts, completions, batch_size, progress), reference):
        n = min(len(ids), lp_full.shape[0])
        lp_s = lp_full[:n].gather(-1, ids[:n].to(lp_full.device)).cpu()  # the model's log-probs on the reference's top-k
        lq = lq[:n]
        p_s, q_s = lp_s.exp(), lq.exp()
        p_rest = (1 - p_s.sum(-1)).clamp_min(0)
        q_rest = (1 - q_s.sum(-1)).clamp_min(1e-12)
        kl = (p_s * (lp_s - lq)).sum(-1) + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), torch.zeros_like(p_rest))
        broken = ~(torch.isfinite(lp_s).all(-1) & torch.isfinite(lq).all(-1))
        kl = torch.where(broken, torch.full_like(kl, float("nan")), kl.clamp_min(0.0))
        out.append(float(kl.mean()) if n else float("nan"))
    return out


def _forced_logprobs(model, tokenizer, prompts: list, completions: list, batch_size: int, progress=None):
    """Per prompt, the float32 log-probabilities [n, V] of the positions that predict the answer's tokens (n = its
    length, at least 1), batch by batch (``progress(k)`` after each). Only the batch's last ``longest answer + 1``
    positions get logits (``logits_to_keep``), and each prompt's log-softmax covers its own answer positions: never
    [B, T, V] in float32. Positions count real tokens only (left padding), as in generation and the probe."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    enc = LocalBackend(model, tokenizer).encode(prompts)
    answers = [_ids(c, tokenizer) for c in completions]
    dev = input_device(model)
    can_keep = bool(last_logits_kwargs(model))
    for s in range(0, len(enc), batch_size):
        P, A = enc[s:s + batch_size], answers[s:s + batch_size]
        seqs = [p + a for p, a in zip(P, A)]
        width = max(map(len, seqs))
        keep = min(width, max(len(a) for a in A) + 1) if can_keep else width
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in seqs], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=dev)
        kw = {"logits_to_keep": keep} if can_keep else {}
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw).logits  # [B, keep, V]: the last positions
        for row, a in enumerate(A):
            a0 = width - len(a) - 1 - (width - keep)  # left padding: the answer ends the sequence; a0 predicts its first token
            yield torch.log_softmax(logits[row, a0: a0 + max(1, len(a))].float(), dim=-1)
        del logits
        if progress is not None:
            progress(len(A))
