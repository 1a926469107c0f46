"""How far the ablated model's next-token distributions moved from the base model's on harmless prompts.

KL(base || ablated), per prompt, in float32 log-softmax: at the first answer token (what heretic
optimizes), and averaged over the base model's own greedy answer, teacher-forced through both
models, which catches damage that shows only a few tokens in. Non-finite logits give NaN, which
the damage check reports as ``nan-inf``.
"""

from __future__ import annotations

import torch

from audit.generate import Completion, LocalBackend, last_token_logprobs


def _kl_rows(lp_base: torch.Tensor, lp_abl: torch.Tensor) -> torch.Tensor:
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
    return _kl_rows(lp_b, lp_a).tolist()


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
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in seqs], device=base_model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=base_model.device)
        lb = torch.log_softmax(base_model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1).cpu()
        la = torch.log_softmax(abl_model(input_ids=ids.to(abl_model.device), attention_mask=mask.to(abl_model.device)).logits.float(), dim=-1).cpu()
        for row, (x, (a, b)) in enumerate(zip(seqs, spans)):
            shift = width - len(x)  # left padding
            kl = _kl_rows(lb[row, shift + a: shift + b], la[row, shift + a: shift + b])
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
