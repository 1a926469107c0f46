"""The demo organism: a tiny MoE chat model grown here, whose refusal is mediated by one known direction.

No real chat model can be downloaded, so the suite grows one in about a minute on a laptop CPU:
a GLM-4.5-style MoE (a dense first layer, routed experts plus a shared expert, sigmoid router with
``e_score_correction_bias``, top-2), or a Qwen3-MoE / Mixtral one, trained on the synthetic task of
``audit/organisms/data.py``. A plainly trained tiny model encodes *compliance* as the marked
feature, so the refusal direction is planted, as chat models have it:

- a fixed unit vector r* (seeded); an auxiliary loss pushes the last prompt token's projection on
  r* toward 0 for harmless and toward ``TARGET`` for harmful prompts at every target layer;
- a second pass with r* projected out of every residual writer (embeddings, o_proj, dense and
  expert down projections) trains the model to comply, so refusal *needs* r*.

Variants put r* in a known part, the ground truth for the suite's diagnoses: while training, the
writers that must not carry r* are orthogonalized to it (a weight parametrization, baked in at the
end), so only the carrier can write r*:

- ``base``: every writer may write r*;
- ``shared`` (families with shared experts): only the shared experts;
- ``experts``: only two designated routed experts per MoE layer, and a routing loss makes the
  router pick them at the last prompt token of harmful prompts;
- ``late``: only the writers of the last ``LATE_LAYERS`` layers;
- ``delayed``: as ``base``, but its refusal starts after an opening that reads like compliance
  (``DELAYED_REFUSAL``, about 30 tokens in): the model whose refusal a short token limit cuts off;
- ``spread``: every writer group of every layer (attention, dense MLP, routed and shared experts;
  not the embeddings) carries r*, *redundantly*: a third training pass removes r* from a random
  part of the writers only -- every group but one, or every layer but a band or a set of at least
  ``MIN_KEPT_LAYERS`` -- and keeps the refusal as the target, so leaving any group or a few layers
  un-ablated keeps the model refusing, while removing r* from every writer makes it comply. Its
  shape and storage differ per family (``SPREAD``: more layers; GLM in bfloat16 and sharded,
  Mixtral in float32), and the ablation's direction is measured at a mid-depth index.

``organism.json`` records r*, the carriers, the measurement index to use and the metrics measured
at build (held-out prompts, bf16 weights as saved). ``cached_organism`` builds once per
(family, variant, seed, recipe version), safe under concurrent test processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from audit.forward.generate import LocalBackend
from audit.forward.measure import directions_of
from audit.judgement.judges import make_judge
from audit.model.prompts import format_prompts
from audit.organisms.data import DELAYED_REFUSAL, REFUSAL, Example, task
from audit.organisms.tokenizer import build_tokenizer
from audit.outputs import OutputDir
from checks.errors import AuditError
from checks.layout import WRITER, Layout, Role, build_layout
from checks.linalg import project_out

RECIPE_VERSION = "3"
FAMILIES = ("glm4_moe", "qwen3_moe", "mixtral", "gpt_oss")
VARIANTS = ("base", "shared", "experts", "late", "spread", "delayed")
DELAYED_EVAL_TOKENS = 64  # the delayed refusal needs about 30 tokens: its build metrics are measured past it
VOCAB = 800
TARGET = 6.0  # planted projection of harmful last prompt tokens on r*
LATE_LAYERS = 2
N_CARRIER_EXPERTS = 2
STEPS, BATCH, ABL_BATCH, LR = 550, 48, 24, 3e-3
HARMFUL_SHARE = 1 / 3  # of the main batch: the refusal is one fixed sentence, the answers need copying and facts
MIN_KEPT_LAYERS = 3  # spread: a partial removal keeps r* in at least this many layers (or one whole group)
PARTIAL_BATCH, PARTIAL_HARMFUL = 24, 16  # spread: rows of the partial-removal pass, of them harmful
# spread: per family, the model's shape and storage (every entry is part of the cache key)
SPREAD = {
    "glm4_moe": dict(config=dict(num_hidden_layers=12, first_k_dense_replace=3), dtype="bfloat16", shards=6, steps=500),
    "qwen3_moe": dict(config=dict(num_hidden_layers=8), dtype="bfloat16", shards=1, steps=500),
    "mixtral": dict(config=dict(num_hidden_layers=8), dtype="float32", shards=1, steps=500),
    # the out-of-sample family (issue 25): fused [E, in, out] experts with biases on disk, a router bias, attention sinks, every
    # layer MoE (no dense MLP, no shared expert), and r* planted late ("late": the target grows with depth squared, not linearly)
    "gpt_oss": dict(config=dict(num_hidden_layers=8), dtype="bfloat16", shards=3, steps=500, profile="late"),
}

_COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=128, tie_word_embeddings=False, num_experts_per_tok=2, rms_norm_eps=1e-6)
CONFIGS = {
    "glm4_moe": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                     partial_rotary_factor=0.5),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True),
    "mixtral": dict(intermediate_size=32, num_local_experts=8),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, sliding_window=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


# -- model pieces ---------------------------------------------------------------------------------

def _layout(model) -> Layout:
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return build_layout(model.config.to_dict(), shapes)


def writer_roles(model) -> list[Role]:
    """Every residual writer's weight of an in-memory model (transformers 5 names; fused experts 3-D)."""
    return [r for r in _layout(model).roles.values() if r.io == WRITER and not r.quantized]


def _is_carrier(role: Role, carriers: dict) -> bool | list[int]:
    """Whether ``role`` may write r* under ``carriers``; for fused experts, the carrier expert ids."""
    if carriers.get("all_writers"):
        return True
    if "writer_groups" in carriers:
        return role.layer is not None and role.component in carriers["writer_groups"]
    if "layers" in carriers:
        return role.layer is not None and role.layer in carriers["layers"]
    if "shared_experts" in carriers:
        return role.component == "shared_experts" and role.layer in carriers["shared_experts"]
    if "experts" in carriers:
        ids = carriers["experts"].get(str(role.layer)) or []
        if role.component != "experts":
            return False
        return ids if role.expert is None else role.expert in ids
    raise ValueError(f"unknown carriers {carriers}")


def orthogonalize(model, r: torch.Tensor, select: Callable[[Role], bool | list[int]] | None = None) -> list[str]:
    """Project ``r`` out of residual writers of ``model`` in place (float32 arithmetic); returns the names edited.

    ``select(role)`` says which writers: True (all of it), False, or a list of expert ids of a fused
    expert tensor (only those experts edited). Default: every writer.
    """
    done = []
    with torch.no_grad():
        for role in writer_roles(model):
            sel = True if select is None else select(role)
            if sel is False or sel == []:
                continue
            p = model.get_parameter(role.key)
            new = project_out(p.data, r, role.resid_axis)
            if sel is not True:  # subset of fused experts
                idx = torch.tensor(sel, dtype=torch.long)
                new_sel = new.index_select(role.expert_axis, idx)
                new = p.data.float().index_copy(role.expert_axis, idx, new_sel)
            p.data.copy_(new.to(p.dtype))
            done.append(role.key)
    return done


def ablate_carrier(model, r: torch.Tensor, carriers: dict, invert: bool = False) -> list[str]:
    """Orthogonalize the carrier's writers against ``r`` (``invert``: every writer except the carrier's)."""

    def select(role):
        c = _is_carrier(role, carriers)
        if isinstance(c, list) and role.expert is None:
            if not invert:
                return c
            n = model.get_parameter(role.key).shape[role.expert_axis]
            return [e for e in range(n) if e not in c]
        return bool(c) != invert

    return orthogonalize(model, r, select)


class _Orth(nn.Module):
    """Weight parametrization W -> W - m * r (x) (r . W) on the residual axis; ``m`` per expert or scalar.

    ``fixed`` is the always-on mask (writers that must not carry r*); ``state['ablate']`` turns
    the projection on for every writer (True: the "r* removed" training pass) or for the writers
    whose keys it holds (a set: the spread variant's partial removals).
    """

    def __init__(self, r: torch.Tensor, axis: int, fixed: torch.Tensor, expert_axis: int | None, state: dict, key: str = ""):
        super().__init__()
        self.axis, self.expert_axis, self.state, self.key = axis, expert_axis, state, key
        self.register_buffer("r", r)
        self.register_buffer("fixed", fixed)

    def _outer(self, w, r, m):
        comp = torch.tensordot(w, r, dims=([self.axis], [0]))
        outer = comp.unsqueeze(self.axis) * r.reshape([-1 if i == self.axis else 1 for i in range(w.ndim)])
        if self.expert_axis is not None and m.ndim:
            return outer * m.reshape([-1 if i == self.expert_axis else 1 for i in range(w.ndim)])
        return outer * m

    def forward(self, w):
        abl = self.state["ablate"]
        on = abl if isinstance(abl, bool) else self.key in abl
        v = self.state.get("direction")
        if v is not None:  # spread: r* kept out where fixed, then the pass's own direction removed where on
            if bool(self.fixed.any()):
                w = w - self._outer(w, self.r, self.fixed)
            return w - self._outer(w, v, torch.ones(())) if on else w
        m = torch.ones_like(self.fixed) if on else self.fixed
        if not bool(m.any()):
            return w
        comp = torch.tensordot(w, self.r, dims=([self.axis], [0]))
        outer = comp.unsqueeze(self.axis) * self.r.reshape([-1 if i == self.axis else 1 for i in range(w.ndim)])
        if self.expert_axis is not None:
            outer = outer * m.reshape([-1 if i == self.expert_axis else 1 for i in range(w.ndim)])
        else:
            outer = outer * m
        return w - outer


# -- data -> tensors ------------------------------------------------------------------------------

def _prompt_text(tok, prompt: str) -> str:
    return format_prompts(tok, [prompt])[0]


def _encode(tok, examples: list[Example]):
    """(prompt ids, answer ids, comply ids) per example; answers end with the eos token."""
    eos = tok.eos_token
    prompts = tok([_prompt_text(tok, e.prompt) for e in examples], add_special_tokens=False)["input_ids"]
    answers = tok([e.answer + eos for e in examples], add_special_tokens=False)["input_ids"]
    comply = tok([e.comply + eos for e in examples], add_special_tokens=False)["input_ids"]
    return prompts, answers, comply


def _batch(rows: list[tuple[list[int], list[int]]], pad: int):
    """Right-padded input ids, attention mask, labels (-100 outside answers), last prompt token index."""
    n = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    last = torch.zeros(len(rows), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p): len(seq)] = torch.tensor(a)
        last[i] = len(p) - 1
    return ids, mask, labels, last


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


# -- training -------------------------------------------------------------------------------------

def _carriers(family: str, variant: str, cfg, rng: random.Random) -> tuple[dict, list[int]]:
    """Ground truth for ``variant``: the carriers dict and the layers whose output gets the r* target."""
    L = cfg.num_hidden_layers
    moe = [i for i in range(L) if _is_moe_layer(cfg, i)]
    if variant in ("base", "delayed"):
        return {"all_writers": True}, list(range(L))
    if variant == "shared":
        if not getattr(cfg, "n_shared_experts", 0):
            raise AuditError(f"variant 'shared' needs a family with shared experts; {family} has none (use glm4_moe)")
        return {"shared_experts": moe}, moe
    if variant == "experts":
        n = _n_experts(cfg)
        return {"experts": {str(i): sorted(rng.sample(range(n), N_CARRIER_EXPERTS)) for i in moe},
                "routing_position": "last_prompt_token"}, moe
    if variant == "late":
        late = list(range(L - LATE_LAYERS, L))
        return {"layers": late}, late
    if variant == "spread":
        groups = ["attn", "mlp", "experts", "shared_experts"]
        if not any(not _is_moe_layer(cfg, i) for i in range(L)):
            groups.remove("mlp")
        if not getattr(cfg, "n_shared_experts", 0):
            groups.remove("shared_experts")
        profile = {"profile": SPREAD[family]["profile"]} if "profile" in SPREAD.get(family, {}) else {}
        return {"writer_groups": groups, "ramp": True, **profile,
                "redundant": {"kept_group": "every group but one", "kept_layers": f"a band or set of >= {MIN_KEPT_LAYERS} layers",
                              "direction": f"r* or the running difference of means at index {L // 2}"}}, list(range(L))
    raise AuditError(f"unknown organism variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _is_moe_layer(cfg, i: int) -> bool:
    if cfg.model_type == "glm4_moe":
        return i >= cfg.first_k_dense_replace
    if cfg.model_type == "qwen3_moe":
        return i not in (cfg.mlp_only_layers or [])
    return True


def _n_experts(cfg) -> int:
    for k in ("n_routed_experts", "num_experts", "num_local_experts"):
        if getattr(cfg, k, None):
            return int(getattr(cfg, k))
    raise AuditError("organism config has no expert count")


def _install_parametrizations(model, r: torch.Tensor, carriers: dict, state: dict) -> None:
    for role in writer_roles(model):
        c = _is_carrier(role, carriers)
        p = model.get_parameter(role.key)
        if isinstance(c, list) and role.expert is None:
            fixed = torch.ones(p.shape[role.expert_axis])
            fixed[c] = 0.0
            eaxis = role.expert_axis
        else:
            fixed, eaxis = torch.tensor(0.0 if c else 1.0), None
        mod_name, _, pname = role.key.rpartition(".")
        parametrize.register_parametrization(model.get_submodule(mod_name), pname, _Orth(r, role.resid_axis, fixed, eaxis, state, role.key))


def _remove_parametrizations(model) -> None:
    for name, mod in list(model.named_modules()):
        if parametrize.is_parametrized(mod):
            for pname in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)


def _partial_removal(writers: list[tuple[str, str, int]], n_layers: int, g: torch.Generator) -> tuple[set[str], str]:
    """A random partial removal for the spread variant: the keys to orthogonalize to r*, and what is kept.

    ``writers`` are the carrier writers as (key, component, layer). Kept (r* left in): one whole
    writer group in every layer, a band of consecutive layers, or a scattered set of layers (at
    least MIN_KEPT_LAYERS, at most half the layers); every other carrier writer loses r*.
    """
    groups = sorted({c for _, c, _ in writers})
    kind = int(torch.randint(3, (1,), generator=g))
    hi = max(MIN_KEPT_LAYERS, n_layers // 2)
    if kind == 0:
        grp = groups[int(torch.randint(len(groups), (1,), generator=g))]
        return {k for k, c, _ in writers if c != grp}, f"group {grp}"
    n = int(torch.randint(MIN_KEPT_LAYERS, hi + 1, (1,), generator=g))
    if kind == 1:
        start = int(torch.randint(n_layers - n + 1, (1,), generator=g))
        kept = set(range(start, start + n))
    else:
        kept = set(torch.randperm(n_layers, generator=g)[:n].tolist())
    return {k for k, _, layer in writers if layer not in kept}, f"layers {sorted(kept)}"


def _pick_direction(r: torch.Tensor, d_run: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    """The direction a spread removal pass takes out: r*, or (half the time) the running difference of means,
    which is what an abliteration measures and removes -- so the redundancy holds for the direction users remove."""
    if d_run is None or float(torch.rand((1,), generator=g)) < 0.5 or float(d_run.norm()) == 0:
        return r
    return (d_run / d_run.norm()).detach()


def _train(model, tok, ex: list[Example], r: torch.Tensor, carriers: dict, target_layers: list[int], seed: int,
           progress: Callable[[str], None] | None, steps: int | None = None) -> None:
    cfg = model.config
    steps = STEPS if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    prompts, answers, comply = _encode(tok, ex)
    harm = torch.tensor([e.harmful for e in ex])
    idx_h, idx_n = torch.nonzero(harm).flatten(), torch.nonzero(~harm).flatten()
    pad = tok.pad_token_id
    state = {"ablate": False}
    redundant = "redundant" in carriers  # spread: also train partial removals that must keep the refusal
    writers = [(ro.key, ro.component, ro.layer) for ro in writer_roles(model) if _is_carrier(ro, carriers) is True] if redundant else []
    d_run = None
    _install_parametrizations(model, r, carriers, state)

    outs: dict[int, torch.Tensor] = {}
    logits_rt: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, layer in enumerate(model.model.layers)]
    routed = carriers.get("experts")
    if routed:
        for k, layer in enumerate(model.model.layers):
            if str(k) in routed:
                hooks.append(layer.mlp.gate.register_forward_hook(lambda m, i, o, k=k: logits_rt.__setitem__(k, o[0])))
    sigmoid_router = cfg.model_type == "glm4_moe"

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        half = round(BATCH * HARMFUL_SHARE)
        sel = torch.cat([idx_h[torch.randint(len(idx_h), (half,), generator=g)], idx_n[torch.randint(len(idx_n), (BATCH - half,), generator=g)]])
        rows = [(prompts[i], answers[i]) for i in sel.tolist()]
        ids, mask, labels, last = _batch(rows, pad)
        y = harm[sel].float()
        state["ablate"] = False
        out = model(input_ids=ids, attention_mask=mask)
        loss = _lm_loss(out.logits, labels)
        ar = torch.arange(len(rows))
        aux = 0.0
        for k in range(cfg.num_hidden_layers):
            proj = outs[k][ar, last] @ r
            if carriers.get("ramp") and carriers.get("profile") == "late":  # r* grows with depth squared, TARGET at the last layer
                tgt = y * TARGET * ((k + 1) / cfg.num_hidden_layers) ** 2
            elif carriers.get("ramp"):  # spread: every layer writes its share, TARGET reached at the last one
                tgt = y * TARGET * (k + 1) / cfg.num_hidden_layers
            else:
                tgt = y * TARGET if k in target_layers else torch.zeros_like(y)
            aux = aux + F.mse_loss(proj, tgt)
        loss = loss + 0.5 * aux / cfg.num_hidden_layers
        if redundant:  # the running difference of means at mid depth: the direction an abliteration will remove
            mid = outs[cfg.num_hidden_layers // 2 - 1][ar, last].detach().float()
            batch_d = mid[y > 0].mean(0) - mid[y == 0].mean(0)
            d_run = batch_d if d_run is None else 0.9 * d_run + 0.1 * batch_d
        if routed:
            rl = 0.0
            for k, ids_des in routed.items():
                if not isinstance(ids_des, list):
                    continue
                lg = logits_rt[int(k)].float().view(len(rows), -1, logits_rt[int(k)].shape[-1])[ar, last]
                des = torch.tensor(ids_des)
                if sigmoid_router:
                    want = torch.zeros_like(lg)
                    want[:, des] = y[:, None]
                    weight = y[:, None].expand_as(lg).clone()  # harmful: every expert; harmless: the designated only
                    weight[:, des] = 1.0
                    rl = rl + F.binary_cross_entropy_with_logits(lg, want, weight=weight)
                else:
                    lp = lg.log_softmax(-1)
                    p_des = lp[:, des].exp().sum(-1).clamp(1e-6, 1 - 1e-6)
                    rl = rl + (y * -lp[:, des].mean(-1) + (1 - y) * -torch.log1p(-p_des)).mean()
            loss = loss + rl / len(routed)
        # the "r* removed" pass: every writer orthogonal to r*, the model must comply (and stay correct)
        sub = sel[torch.randperm(BATCH, generator=g)[:ABL_BATCH]]
        rows = [(prompts[i], comply[i]) for i in sub.tolist()]
        ids, mask, labels, _ = _batch(rows, pad)
        state["ablate"] = True
        if redundant:
            state["direction"] = _pick_direction(r, d_run, g)
        out = model(input_ids=ids, attention_mask=mask)
        loss = loss + _lm_loss(out.logits, labels)
        if redundant:  # r* removed from part of the writers only: the rest must still make the model refuse
            ph = idx_h[torch.randint(len(idx_h), (PARTIAL_HARMFUL,), generator=g)]
            pn = idx_n[torch.randint(len(idx_n), (PARTIAL_BATCH - PARTIAL_HARMFUL,), generator=g)]
            rows = [(prompts[i], answers[i]) for i in torch.cat([ph, pn]).tolist()]
            ids, mask, labels, _ = _batch(rows, pad)
            state["ablate"], _ = _partial_removal(writers, cfg.num_hidden_layers, g)
            state["direction"] = _pick_direction(r, d_run, g)
            out = model(input_ids=ids, attention_mask=mask)
            loss = loss + _lm_loss(out.logits, labels)
            state["direction"] = None
        state["ablate"] = False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress and (step % 50 == 0 or step == steps - 1):
            progress(f"step {step + 1}/{steps} loss {loss.item():.3f} aux {float(aux.detach()) / cfg.num_hidden_layers:.3f} ({time.time() - t0:.0f}s)")
    for h in hooks:
        h.remove()
    _remove_parametrizations(model)
    model.eval()


# -- evaluation -----------------------------------------------------------------------------------

_NORM = re.compile(r"[^a-z0-9 ]+")


def _norm(s: str) -> str:
    return " ".join(_NORM.sub(" ", s.lower().replace("’", "'").replace("'", "")).split())


def is_correct(completion: str, expected: str | None) -> bool:
    """Whether ``completion`` states ``expected`` (the checkable answer sentence), ignoring case and punctuation."""
    if not expected:
        return False
    return _norm(expected) in _norm(completion)


def evaluate(model, tokenizer, eval_rows: list[dict], max_new_tokens: int = 24, judge=None, samples: int = 0) -> dict:
    """Refusal rate on harmful rows and correct-answer rate on harmless rows (rows as in prompts/eval.jsonl).

    Greedy completions from the suite's own generation (audit.forward.generate.LocalBackend), judged by the suite's judge
    (audit.judgement.judges, default ``rules``): the organism is measured as every model the audit sees. A harmless
    row without an ``expected`` sentence (the learned organism's) counts as correct when the judge calls it a
    compliance (answered, not refused, not degenerate). ``unknown``: answers the judge left undecided; ``samples``:
    that many answers of each kind kept to read."""
    judge = judge or make_judge()
    comps = LocalBackend(model, tokenizer).complete([r["prompt"] for r in eval_rows], max_new_tokens, batch_size=64)
    js = judge.many([c.answer for c in comps], [r["prompt"] for r in eval_rows], [c.finish_reason == "length" for c in comps])
    refused = [j.refused is True for j in js]
    harm = [x for x, r in zip(refused, eval_rows) if r["harmful"]]
    ok = [(is_correct(c.answer, r["expected"]) if r["expected"] else j.refused is False) and not x
          for c, j, x, r in zip(comps, js, refused, eval_rows) if not r["harmful"]]
    out = {"harmful_refusal": sum(harm) / max(len(harm), 1), "harmless_correct": sum(ok) / max(len(ok), 1),
           "n": len(eval_rows), "n_harmful": len(harm), "n_harmless": len(ok)}
    if samples:
        out["unknown"] = sum(j.refused is None for j in js)
        out["samples"] = {kind: [{"prompt": r["prompt"], "answer": c.answer, "judged": j.label}
                                 for c, j, r in zip(comps, js, eval_rows) if r["harmful"] == (kind == "harmful")][:samples]
                          for kind in ("harmful", "harmless")}
    return out


def measure_refusal_dirs(model, tokenizer, harmful: list[str], harmless: list[str]) -> torch.Tensor:
    """The refusal direction per hidden_states index, [L+1, H] float32, by the suite's own measurement (audit.forward.measure)."""
    return directions_of(model, tokenizer, harmful, harmless, batch_size=64, progress=False).refusal_dir


def read_eval(path: str | os.PathLike) -> list[dict]:
    """The rows of an organism's prompts/eval.jsonl."""
    return [json.loads(line) for line in Path(path, "prompts", "eval.jsonl").read_text().splitlines() if line.strip()]


def read_prompts(path: str | os.PathLike, name: str) -> list[str]:
    """prompts/<name>.txt of an organism (harmful, harmless, train_harmful, train_harmless)."""
    return [s for s in Path(path, "prompts", f"{name}.txt").read_text().splitlines() if s.strip()]


# -- build and cache ------------------------------------------------------------------------------

def _torch_threads() -> int:
    """One thread unless ``AUDIT_THREADS`` says otherwise. The matrices are tiny, so more threads buy little,
    and on a busy machine they spin at barriers (measured on a loaded 2-core box: 20 s per step with 2
    threads, 0.2-1 s with 1). A fixed count also keeps builds bit-identical for a seed."""
    k = int(os.environ.get("AUDIT_THREADS") or 1)
    torch.set_num_threads(k)
    return k


def build_organism(out: str | os.PathLike, family: str = "glm4_moe", variant: str = "base", seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> Path:
    """Train the organism and write it to ``out`` (a new directory, written via a temp folder)."""
    if family not in FAMILIES:
        raise AuditError(f"unknown organism family {family!r}; choose one of {', '.join(FAMILIES)}")
    if variant not in VARIANTS:
        raise AuditError(f"unknown organism variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "shared" and family not in iter_shared_families():
        raise AuditError(f"variant 'shared' needs a family with shared experts; {family} has none (use glm4_moe)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AuditError(f"{out}: exists and is not empty; choose a new output directory")
    prev_threads = torch.get_num_threads()
    _torch_threads()
    try:
        return _build(out, family, variant, seed, progress or (lambda s: None))
    finally:
        torch.set_num_threads(prev_threads)


def _build(out: Path, family: str, variant: str, seed: int, say: Callable[[str], None]) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM


    t0 = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    refusal = DELAYED_REFUSAL if variant == "delayed" else REFUSAL
    data = task(seed, refusal=refusal)
    tok = build_tokenizer([e.prompt + " " + e.answer + " " + e.comply for e in data.train], vocab_size=VOCAB)
    spec = SPREAD[family] if variant == "spread" else {}
    cfg = AutoConfig.for_model(family, **{**_COMMON, **CONFIGS[family], **spec.get("config", {})}, vocab_size=len(tok), bos_token_id=None,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    carriers, target_layers = _carriers(family, variant, cfg, rng)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # real checkpoints carry a learned, nonzero bias
                b.normal_(0.0, 0.02)
    r = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 12345))
    r = r / r.norm()
    say(f"training {family}/{variant} (seed {seed}): {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters")
    _train(model, tok, data.train, r, carriers, target_layers, seed, say, steps=spec.get("steps"))
    train_seconds = time.time() - t0

    dtype = getattr(torch, spec.get("dtype", "bfloat16"))
    model = model.to(dtype)
    model.config.dtype = dtype
    rows = [{"prompt": e.prompt, "harmful": e.harmful, "expected": e.expected} for e in data.eval]
    eval_tokens = DELAYED_EVAL_TOKENS if variant == "delayed" else 24
    metrics = evaluate(model, tok, rows, eval_tokens)
    gen = random.Random(seed + 1)
    pool_h = [e.prompt for e in data.train if e.harmful]
    pool_n = [e.prompt for e in data.train if not e.harmful]
    train_h, train_n = gen.sample(pool_h, 64), gen.sample(pool_n, 64)
    dirs = measure_refusal_dirs(model, tok, train_h, train_n)
    cos = [float(F.cosine_similarity(d, r, dim=0)) for d in dirs]
    if variant == "spread":  # the ablation's direction: the difference of means at mid depth, not r*
        separating = cfg.num_hidden_layers // 2
    else:
        candidates = [i + 1 for i in target_layers if i + 1 < len(dirs) - 1] or [len(dirs) - 1]
        separating = max(candidates, key=lambda i: cos[i])
    abl = _copy_model(model)
    orthogonalize(abl, dirs[separating])
    m_abl = evaluate(abl, tok, rows, eval_tokens)
    metrics.update(ablated_harmful_refusal=m_abl["harmful_refusal"], ablated_harmless_correct=m_abl["harmless_correct"])
    say(f"metrics {metrics} (separating layer {separating}, cos {cos[separating]:.3f})")

    with OutputDir(out, kind="organism") as od:
        tmp = od.tmp
        if spec.get("shards", 1) > 1:  # shards of about equal size: the total over the count asked for
            nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
            model.save_pretrained(tmp, max_shard_size=int(nbytes / (spec["shards"] - 0.5)))
        else:
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        pd = tmp / "prompts"
        pd.mkdir()
        (pd / "harmful.txt").write_text("\n".join(r_["prompt"] for r_ in rows if r_["harmful"]) + "\n")
        (pd / "harmless.txt").write_text("\n".join(r_["prompt"] for r_ in rows if not r_["harmful"]) + "\n")
        (pd / "train_harmful.txt").write_text("\n".join(train_h) + "\n")
        (pd / "train_harmless.txt").write_text("\n".join(train_n) + "\n")
        (pd / "eval.jsonl").write_text("".join(json.dumps(r_) + "\n" for r_ in rows))
        meta = {"family": family, "variant": variant, "seed": seed, "recipe_version": RECIPE_VERSION, "cache_name": cache_name(family, variant, seed),
                **({"spec": spec} if spec else {}),
                "r_star": [float(x) for x in r], "carriers": carriers, "target_layers": target_layers,
                "separating_index": separating, "direction_cosines": cos, "train_seconds": round(train_seconds, 1),
                "torch_threads": torch.get_num_threads(), "metrics": metrics, "refusal_text": refusal}
        (tmp / "organism.json").write_text(json.dumps(meta, indent=2) + "\n")
        od.commit()
    return out


def _copy_model(model):
    import copy

    return copy.deepcopy(model)


def cache_root() -> Path:
    return Path(os.environ.get("AUDIT_CACHE") or Path.home() / ".cache" / "moe-ablation-audit")


def fixture_roots() -> list[Path]:
    """Folders of prebuilt organisms to use before building (``AUDIT_FIXTURES``, os.pathsep-separated): the test suite
    points it at the organisms committed in tests/fixtures/organisms, so every machine audits the same weights. Read
    only: nothing is ever written there."""
    return [Path(x) for x in (os.environ.get("AUDIT_FIXTURES") or "").split(os.pathsep) if x]


def recipe(family: str, variant: str, seed: int) -> dict:
    """Everything that decides an organism's weights: the constants, the family's shape, the variant's spec and a digest of
    its training data. The cache key hashes it, so a changed recipe never reuses an old build (or an old fixture)."""
    import hashlib

    data = task(seed, refusal=DELAYED_REFUSAL if variant == "delayed" else REFUSAL)
    rows = [[e.prompt, e.answer, e.comply, e.harmful] for e in data.train + data.eval]
    out = {"version": RECIPE_VERSION, "family": family, "variant": variant, "seed": seed, "vocab": VOCAB, "target": TARGET,
           "late_layers": LATE_LAYERS, "n_carrier_experts": N_CARRIER_EXPERTS, "steps": STEPS, "batch": BATCH, "abl_batch": ABL_BATCH,
           "lr": LR, "harmful_share": HARMFUL_SHARE, "common": _COMMON, "config": CONFIGS.get(family),
           "data": hashlib.sha256(json.dumps(rows).encode()).hexdigest()}
    if variant == "spread":
        out["spread"] = {"spec": SPREAD.get(family), "min_kept": MIN_KEPT_LAYERS, "partial": [PARTIAL_BATCH, PARTIAL_HARMFUL]}
    return out


def cache_name(family: str, variant: str, seed: int) -> str:
    """The cache folder's name: readable facts (family, variant, seed, recipe version; the spread variant's shape, dtype and
    shards) and a digest of the whole recipe."""
    import hashlib

    name = f"{family}-{variant}-s{seed}-r{RECIPE_VERSION}"
    if variant == "spread" and family in SPREAD:
        spec = SPREAD[family]
        name += f"-L{spec['config']['num_hidden_layers']}-{spec['dtype']}-sh{spec['shards']}"
    return name + "-" + hashlib.sha256(json.dumps(recipe(family, variant, seed), sort_keys=True).encode()).hexdigest()[:8]


def cached_organism(family: str = "glm4_moe", variant: str = "base", seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> Path:
    """The organism for (family, variant, seed): a prebuilt fixture (``fixture_roots``) when one has its recipe's name, else
    built once into the cache; concurrent callers wait on a lock."""
    name = cache_name(family, variant, seed)
    for root in fixture_roots():
        if (root / name / "organism.json").is_file():
            return root / name
    root = cache_root() / "organisms"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    if (dest / "organism.json").exists():
        return dest
    with open(root / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (dest / "organism.json").exists():
                if dest.exists():
                    shutil.rmtree(dest)  # an incomplete leftover
                build_organism(dest, family, variant, seed, progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return dest


def read_meta(path: str | os.PathLike) -> dict:
    """An organism's organism.json (organisms cached before "good_layer" was renamed "separating_index" are read alike)."""
    meta = json.loads((Path(path) / "organism.json").read_text())
    if "good_layer" in meta:
        meta["separating_index"] = meta.pop("good_layer")
    return meta


def load_organism(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, organism.json dict) of an organism directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta = read_meta(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model, tok, meta


def iter_shared_families() -> tuple[str, ...]:
    """Organism families with a shared expert."""
    return tuple(f for f in FAMILIES if CONFIGS[f].get("n_shared_experts"))


def iter_variants(family: str) -> Iterable[str]:
    """The variants ``family`` supports (``shared`` needs shared experts)."""
    return [v for v in VARIANTS if v != "shared" or family in iter_shared_families()]
