"""Where a loaded transformers model keeps what the forward passes hook: decoder layers, final norm, feed-forward
block, router, shared experts, top-k, and what a router returns. One home for these lookups (probe, measurement,
generation, interventions); unsupported structures are an AuditError naming the class."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from checks.errors import AuditError


def decoder_layers(model) -> Sequence[torch.nn.Module]:
    inner = getattr(model, "model", model)
    for obj in (inner, getattr(inner, "language_model", None)):
        if obj is not None and isinstance(getattr(obj, "layers", None), torch.nn.ModuleList):
            return obj.layers
    raise AuditError(f"{type(model).__name__}: no decoder layers found (expected model.model.layers); this architecture is not supported by the probe")


def final_norm(model):
    inner = getattr(model, "model", model)
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise AuditError(f"{type(model).__name__}: no final norm (model.model.norm); this architecture is not supported by the probe")
    return norm


def ffn_block(layer) -> torch.nn.Module:
    for name in ("mlp", "block_sparse_moe", "feed_forward"):
        m = getattr(layer, name, None)
        if m is not None:
            return m
    raise AuditError(f"{type(layer).__name__}: no feed-forward block (mlp / block_sparse_moe / feed_forward)")


def router_of(block) -> torch.nn.Module | None:
    for name in ("gate", "router"):
        m = getattr(block, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def shared_of(block) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    for name in ("shared_experts", "shared_expert", "shared_mlp"):
        m = getattr(block, name, None)
        if isinstance(m, torch.nn.Module):
            return m, getattr(block, "shared_expert_gate", None)
    return None, None


def top_k_of(router, experts) -> int:
    for obj in (router, experts):
        for name in ("top_k", "num_experts_per_tok"):
            v = getattr(obj, name, None)
            if isinstance(v, int):
                return v
    raise AuditError(f"{type(router).__name__}: cannot tell how many experts each token uses (no top_k)")


def unpack_router(out, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [N, k] long, weights [N, k] float) from what the router module returned.

    transformers 5 routers return (logits, top-k weights, top-k indices); Llama-4's returns
    (scores [N, E], logits) with unselected experts at sigmoid(-inf) = 0: its choice is the top-k of
    the scores it returned.
    """
    if isinstance(out, tuple) and len(out) == 3 and not out[2].is_floating_point():
        return out[2].reshape(-1, out[2].shape[-1]).long(), out[1].reshape(-1, out[1].shape[-1]).float()
    if isinstance(out, tuple) and len(out) == 2 and out[0].is_floating_point():
        scores = out[0].reshape(-1, out[0].shape[-1])
        w, idx = torch.topk(scores.float(), top_k, dim=-1)
        return idx, w
    raise AuditError(f"router returned {type(out).__name__} of {len(out) if isinstance(out, tuple) else 1} item(s); "
                     "expected (logits, weights, indices) as transformers 5 routers return; upgrade transformers or report this family")


def last_logits_kwargs(model) -> dict:
    """``logits_to_keep=1`` where the model takes it (transformers 5 causal LMs do): no [B, T, V] logits for one row."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}
