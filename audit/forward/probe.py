"""One forward pass per batch of prompts, recording what the routing and contribution checks judge.

For every prompt (the statistical unit) and every decoder layer the probe keeps summaries only:
the experts each token was routed to, *as the router module returned them* (GLM/DeepSeek's
sigmoid + correction bias + group-limited top-k, softmax top-k, gpt-oss's biased logits,
Llama-4's scores: never recomputed here), their routing weights, the residual stream's projection
on r, and how much each component writes along r: attention, the dense MLP, the shared expert and
every routed expert. An expert's contribution along r is weight * u_e . (act(gate_e h) * up_e h)
with u_e = r^T W_down_e. For transformers 5's fused experts (grouped_mm, batched_mm and the standard
eager loop) the activations are taken *as the experts module computes them* (a temporary wrapper
around its gate, or an op-for-op copy of its eager loop; see ``ExpertTap``), so nothing is
recomputed and the model's outputs are unchanged; other experts modules (Llama-4, post-expert
norms, expert parallelism, unknown kernels) fall back to recomputing the activations from the
expert weights in memory on the tokens the router sent to each expert, from the block's input h.
Padding is masked out; memory does not grow with the number of prompts (per-batch tensors are
reduced to per-prompt sums before the next batch).

Conventions: ``directions`` is r [H] (one global direction) or [L+1, H] where row i belongs to
hidden_states[i], the input of decoder layer i (row L: the final norm's output). The residual
projection at index i uses row i; the writers of decoder layer i (attention, MLP, experts) are
projected on row i+1, the direction of the stream they write into.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from audit.forward.expert_tap import ExpertMath, ExpertTap
from audit.forward.structure import decoder_layers, ffn_block, final_norm, last_logits_kwargs, router_of, shared_of, top_k_of, unpack_router
from audit.model.loading import input_device, weights_on
from audit.model.prompts import encode_prompts
from checks.errors import AuditError

TAP_EXPERTS = True  # False: always recompute expert activations (the reference path; tests compare the two)

_ARRAYS = ("tokens_per_prompt", "resid_last", "resid_mean", "attn_mean", "attn_last", "mlp_mean", "mlp_last",
           "shared_mean", "shared_last", "expert_mean", "expert_last", "sel_count", "sel_weight", "last_sel", "last_weight")


@dataclass
class ProbeResult:
    """Per-prompt summaries (float32 numpy). n prompts, L decoder layers, E routed experts (0 if dense).

    resid_*  [n, L+1]  residual stream . r at hidden_states[i] (last prompt token / mean over tokens)
    attn_*, mlp_*, shared_*  [n, L]  the component's output . r (mean over tokens / last token);
             mlp is the whole feed-forward block (dense MLP, or MoE block = experts + shared)
    expert_* [n, L, E]  routed expert e's weighted output . r, summed over the prompt's tokens / n tokens (mean)
             or at the last token
    sel_count  [n, L, E]  tokens routed to e;  sel_weight [n, L, E]  routing weight of e averaged over
             all tokens (0 where not chosen);  last_sel / last_weight: the same at the last prompt token
    """

    family: str
    n_layers: int
    n_experts: int
    top_k: int
    moe_layers: list[int]
    tokens_per_prompt: np.ndarray
    resid_last: np.ndarray
    resid_mean: np.ndarray
    attn_mean: np.ndarray
    attn_last: np.ndarray
    mlp_mean: np.ndarray
    mlp_last: np.ndarray
    shared_mean: np.ndarray
    shared_last: np.ndarray
    expert_mean: np.ndarray
    expert_last: np.ndarray
    sel_count: np.ndarray
    sel_weight: np.ndarray
    last_sel: np.ndarray
    last_weight: np.ndarray
    has_shared: list[int] = field(default_factory=list)  # layers with a shared expert

    @property
    def n_prompts(self) -> int:
        return int(self.tokens_per_prompt.shape[0])

    @property
    def sel_freq(self) -> np.ndarray:
        """[n, L, E] fraction of the prompt's tokens routed to each expert."""
        return self.sel_count / np.maximum(self.tokens_per_prompt, 1)[:, None, None]

    def save(self, path: str | Path) -> None:
        meta = {"family": self.family, "n_layers": self.n_layers, "n_experts": self.n_experts, "top_k": self.top_k}
        np.savez_compressed(path, **{k: getattr(self, k) for k in _ARRAYS}, moe_layers=np.array(self.moe_layers, dtype=np.int64),
                            has_shared=np.array(self.has_shared, dtype=np.int64), meta=np.array(repr(meta)))

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        import ast

        with np.load(path, allow_pickle=False) as z:
            meta = ast.literal_eval(str(z["meta"]))
            return cls(**meta, moe_layers=z["moe_layers"].tolist(), has_shared=z["has_shared"].tolist(), **{k: z[k] for k in _ARRAYS})

    def subset(self, idx) -> ProbeResult:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in _ARRAYS:
            kw[k] = kw[k][idx]
        return ProbeResult(**kw)


# ---------------------------------------------------------------- model structure


# ---------------------------------------------------------------- the probe


def _directions(directions: torch.Tensor, n_layers: int, hidden: int) -> torch.Tensor:
    d = torch.as_tensor(directions).detach().float().cpu()
    if d.ndim == 1:
        d = d.expand(n_layers + 1, -1)
    if d.shape != (n_layers + 1, hidden):
        raise AuditError(f"directions have shape {tuple(d.shape)}; expected [{hidden}] or [{n_layers + 1}, {hidden}] (one per hidden_states index)")
    n = d.norm(dim=-1, keepdim=True)
    if not torch.isfinite(n).all() or (n == 0).any():
        raise AuditError("directions contain a zero or non-finite row; re-run `audit measure`")
    return (d / n).contiguous()


def encode(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt with the chat template applied and the generation prompt added (audit.model.prompts)."""
    return encode_prompts(tokenizer, list(prompts))


def batches(ids: list[list[int]], batch_size: int, pad_id: int):
    """Yield (prompt indices, input_ids [B, T], attention_mask [B, T]) left-padded, similar lengths together."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        t = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), t), pad_id, dtype=torch.long)
        m = torch.zeros((len(idx), t), dtype=torch.long)
        for b, i in enumerate(idx):
            n = len(ids[i])
            x[b, t - n:] = torch.tensor(ids[i], dtype=torch.long)
            m[b, t - n:] = 1
        yield idx, x, m


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each prompt's first real token (left padding must not shift them)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def _pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise AuditError("the tokenizer has neither a pad nor an eos token; set pad_token in tokenizer_config.json")
    return int(pid)


class _Recorder:
    """Forward hooks on every decoder layer; reduces each batch to per-prompt sums on the fly."""

    def __init__(self, model, r: torch.Tensor):
        self.layers = decoder_layers(model)
        self.L = len(self.layers)
        self.r = r
        self._r_dev: dict = {}
        self.moe: dict[int, tuple] = {}  # layer -> (router, ExpertMath, top_k)
        self.taps: dict[int, ExpertTap] = {}  # layer -> tap on its experts module (mode None: recompute)
        self.shared_layers: list[int] = []
        self.resid_mult = [float(getattr(layer, "residual_multiplier", 1.0)) for layer in self.layers]
        self.handles = []
        try:
            self._install(model, r)
        except BaseException:
            self.remove()
            raise

    def _install(self, model, r: torch.Tensor) -> None:
        for i, layer in enumerate(self.layers):
            block = ffn_block(layer)
            experts = getattr(block, "experts", None)
            if isinstance(experts, torch.nn.Module):
                router = router_of(block)
                if router is None:
                    raise AuditError(f"layer {i}: MoE block {type(block).__name__} has no router module (gate / router)")
                em = ExpertMath(experts)
                em.prepare(r[i + 1])
                self.moe[i] = (router, em, top_k_of(router, experts))
                if TAP_EXPERTS:
                    self.taps[i] = tap = ExpertTap(experts, em)
                    tap.install()
            shared, shared_gate = shared_of(block)
            if shared is not None:
                self.shared_layers.append(i)
            self._hook_layer(i, layer, block, shared, shared_gate)
        self._hook(final_norm(model).register_forward_hook(lambda mod, a, out: self._resid(self.L, out)))
        self.E = max((em.num_experts for _, em, _ in self.moe.values()), default=0)
        self.top_k = max((k for _, _, k in self.moe.values()), default=0)

    # ------------------------------------------------------------ plumbing
    def _hook(self, h):
        self.handles.append(h)

    def remove(self):
        """Take every hook off and give each experts module its own forward back."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for tap in self.taps.values():
            tap.remove()

    def rv(self, i: int, device) -> torch.Tensor:
        key = (i, str(device))
        if key not in self._r_dev:
            self._r_dev[key] = self.r[i].to(device)
        return self._r_dev[key]

    def start(self, mask: torch.Tensor):
        """A new batch: mask [B, T] (1 = real token)."""
        self.mask = mask
        self.B, self.T = mask.shape
        self.mcache: dict = {}
        self.ntok = mask.sum(1).clamp_min(1).float()
        self.cols: list[tuple[str, int, torch.Tensor]] = []  # (component, layer, per-token value [B, T]) reduced at flush
        self.out: list[tuple[tuple[str, ...], list[int], torch.Tensor]] = []  # (arrays, layers, [B, len(layers), E, len(arrays)])
        self.pending: dict[int, dict] = {}
        self.moe_rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (layer, idx, w, contrib [N, k])

    def flush(self, arrays: dict[str, np.ndarray], idx: list[int]) -> None:
        """Reduce the batch's per-token values to per-prompt ones and move everything to the CPU arrays: a few
        whole-batch ops and one transfer per device, however many layers."""
        self._reduce_moe()
        by_dev: dict[str, tuple[list, list]] = {}
        for item in self.cols:
            by_dev.setdefault(str(item[2].device), ([], []))[0].append(item)
        for item in self.out:
            by_dev.setdefault(str(item[2].device), ([], []))[1].append(item)
        for cols, outs in by_dev.values():
            parts = []
            if cols:
                mask, ntok = self.token_mask(cols[0][2].device)
                P = torch.stack([v for _, _, v in cols])  # [M, B, T]
                parts += [((P * mask).sum(-1) / ntok).T, P[:, :, -1].T]  # masked mean, last token: [B, M] each
            parts += [v.reshape(self.B, -1) for _, _, v in outs]
            flat = torch.cat(parts, dim=1).cpu().numpy()
            M = len(cols)
            for j, (name, i, _) in enumerate(cols):
                arrays[name + "_mean"][idx, i] = flat[:, j]
                arrays[name + "_last"][idx, i] = flat[:, M + j]
            col = 2 * M
            rows = np.asarray(idx)[:, None]
            for names, layers, v in outs:
                block = flat[:, col:col + v[0].numel()].reshape(v.shape)
                for j, name in enumerate(names):
                    arrays[name][rows, layers] = block[..., j]
                col += v[0].numel()
        self.cols, self.out = [], []

    def token_mask(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [B, T] float, tokens per prompt [B]) on ``device``."""
        key = str(device)
        if key not in self.mcache:
            self.mcache[key] = (self.mask.to(device).float(), self.ntok.to(device))
        return self.mcache[key]

    def _put(self, name: str, i: int, per_tok: torch.Tensor):
        """per_tok [B, T]: its masked mean and last-token value go to name_mean / name_last[:, i] at flush."""
        self.cols.append((name, i, per_tok.reshape(self.B, self.T).float()))

    def _proj(self, x: torch.Tensor, ri: int) -> torch.Tensor:
        return x.reshape(self.B, self.T, -1).float() @ self.rv(ri, x.device)

    @staticmethod
    def _first(x):
        return x[0] if isinstance(x, tuple) else x

    # ------------------------------------------------------------ hooks
    def _resid(self, i: int, h):
        self._put("resid", i, self._proj(self._first(h), i))

    def _hook_layer(self, i, layer, block, shared, shared_gate):
        mult = self.resid_mult[i]

        def pre_layer(mod, args, kwargs):
            self._resid(i, args[0] if args else kwargs["hidden_states"])

        def attn_out(mod, args, out):
            self._put("attn", i, self._proj(self._first(out), i + 1) * mult)

        def block_in(mod, args, kwargs):
            self.pending[i] = {"h": args[0] if args else kwargs["hidden_states"]}

        def block_out(mod, args, out):
            self._put("mlp", i, self._proj(self._first(out), i + 1) * mult)
            p = self.pending.pop(i, {})
            if "shared" in p:
                s = p["shared"]
                if "shared_gate" in p:
                    s = s * torch.sigmoid(p["shared_gate"].reshape(self.B, self.T).float())
                self._put("shared", i, s * mult)
            if i in self.moe:
                self._experts(i, p, mult)

        self._hook(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
        if attn is not None:
            self._hook(attn.register_forward_hook(attn_out))
        self._hook(block.register_forward_pre_hook(block_in, with_kwargs=True))
        self._hook(block.register_forward_hook(block_out))
        if i in self.moe:
            router, _, k = self.moe[i]
            self._hook(router.register_forward_hook(lambda mod, a, out: self.pending[i].__setitem__("route", unpack_router(out, k))))
        if shared is not None:
            self._hook(shared.register_forward_hook(lambda mod, a, out: self.pending[i].__setitem__("shared", self._proj(self._first(out), i + 1))))
        if shared_gate is not None:
            self._hook(shared_gate.register_forward_hook(lambda mod, a, out: self.pending[i].__setitem__("shared_gate", out)))

    _MOE_ARRAYS = ("sel_count", "sel_weight", "expert_mean", "last_sel", "last_weight", "expert_last")

    def _experts(self, i: int, p: dict, mult: float):
        """Routing counts/weights and each selected expert's contribution along r, per prompt."""
        if "route" not in p:
            raise AuditError(f"layer {i}: the router was not called during the forward pass; this MoE implementation is not supported")
        h = p["h"].reshape(-1, p["h"].shape[-1])
        idx, w = p["route"]
        dev = h.device
        idx, w = idx.to(dev), w.to(dev)
        N, k = idx.shape
        tap = self.taps.get(i)
        taken = tap.take() if tap is not None and tap.mode is not None else None
        if taken is not None and taken[1].shape == (N * k,) and torch.equal(taken[1].to(dev), idx.reshape(-1)):
            contrib = taken[0].to(dev).view(N, k) * w  # taken from the experts' own forward: nothing recomputed
        else:
            tok = torch.arange(N, device=dev).repeat_interleave(k)
            keep = self.token_mask(dev)[0].reshape(-1).bool()[tok]
            contrib = torch.zeros(N * k, device=dev)
            contrib[keep] = self._recompute(i, h, tok[keep], idx.reshape(-1)[keep], w.reshape(-1)[keep])
            contrib = contrib.view(N, k)
        if mult != 1.0:
            contrib = contrib * mult
        self.moe_rows.append((i, idx, w, contrib))  # reduced for all layers at once at flush

    def _reduce_moe(self) -> None:
        """Per-prompt routing counts/weights and expert contributions of every MoE layer of the batch: one
        index_add over all layers' kept (token, expert) pairs (per device and k), not a dozen small ops per layer."""
        groups: dict[tuple, list] = {}
        for row in self.moe_rows:
            groups.setdefault((str(row[1].device), row[1].shape[1]), []).append(row)
        B, T, E = self.B, self.T, self.E
        for rows in groups.values():
            dev, k, M = rows[0][1].device, rows[0][1].shape[1], len(rows)
            idx = torch.stack([r[1] for r in rows])  # [M, N, k]
            w = torch.stack([r[2] for r in rows])
            vals = torch.stack((torch.ones_like(w), w, torch.stack([r[3] for r in rows])), dim=-1)  # [M, N, k, 3]
            valid = self.token_mask(dev)[0].reshape(-1).bool()
            cell = torch.arange(M, device=dev)[:, None] * (B * E) + torch.arange(B, device=dev).repeat_interleave(T)[None, :] * E
            slot = (cell[:, valid, None] + idx[:, valid]).reshape(-1)  # (layer, prompt, expert) cell of each kept pair
            acc = torch.zeros(M * B * E, 3, device=dev).index_add_(0, slot, vals[:, valid].reshape(-1, 3)).view(M, B, E, 3)
            acc = acc / torch.stack((torch.ones_like(self.ntok), self.ntok, self.ntok), -1).to(dev)[None, :, None, :]
            li = idx.view(M, B, T, k)[:, :, -1]  # the last position is a real token of every (left-padded) prompt
            last = torch.zeros(M, B, E, 3, device=dev).scatter_(2, li[..., None].expand(M, B, k, 3), vals.view(M, B, T, k, 3)[:, :, -1])
            self.out.append((self._MOE_ARRAYS, [r[0] for r in rows], torch.cat((acc, last), dim=-1).transpose(0, 1)))  # [B, M, E, 6]
        self.moe_rows = []

    def _recompute(self, i: int, h: torch.Tensor, tok: torch.Tensor, e_all: torch.Tensor, w_all: torch.Tensor) -> torch.Tensor:
        """Each kept (token, expert) pair's weighted output . r, recomputing the activations from block input h."""
        _, em, _ = self.moe[i]
        with weights_on(em.m):  # offloaded experts (accelerate): their weights are loaded again for the recomputation
            return self._recompute_loaded(i, em, h, tok, e_all, w_all)

    def _recompute_loaded(self, i: int, em: ExpertMath, h: torch.Tensor, tok: torch.Tensor, e_all: torch.Tensor, w_all: torch.Tensor) -> torch.Tensor:
        e_sorted, order = torch.sort(e_all)
        counts = torch.bincount(e_sorted, minlength=em.num_experts)
        x = h.index_select(0, tok[order])
        w_sorted = w_all[order]
        if em.llama4:  # Llama-4 scales the expert's input by the router score
            x = x * w_sorted.to(x.dtype)[:, None]
        r = self.rv(i + 1, h.device)
        a = em.act_grouped(x, e_sorted, counts)
        if a is not None and not em.post_norm:
            c_sorted = (a.float() * em.u[e_sorted]).sum(-1)
            if em.ub is not None:
                c_sorted = c_sorted + em.ub[e_sorted]
        else:
            c_sorted = torch.empty_like(w_sorted)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    c_sorted[start:start + n] = em.along(e, em.act(e, x[start:start + n]), r)
                    start += n
        if not em.llama4:
            c_sorted = c_sorted * w_sorted
        contrib = torch.empty_like(c_sorted)
        contrib[order] = c_sorted
        return contrib


@torch.inference_mode()
def probe(model, tokenizer, prompts: Sequence[str], directions: torch.Tensor, batch_size: int = 16,
          progress: Callable[[int, int], None] | None = None, return_logprobs: bool = False):
    """Run ``prompts`` (plain instructions) through ``model`` and summarize routing and writes along r per prompt.

    ``directions``: r [H] or per-layer [L+1, H] (normalized here). ``progress(done, total)`` is called per batch.
    Works on dense models too (routing arrays then have E = 0). ``return_logprobs``: also return the first answer
    token's log-probabilities [n, V] (float32), from the same forward pass: (ProbeResult, log-probs).
    Only the last position's logits are computed (the probe needs none; the first answer token needs that one).
    """
    if not prompts:
        raise AuditError("no prompts to probe; check the prompt files")
    layers = decoder_layers(model)
    hidden = model.get_input_embeddings().weight.shape[-1]
    r = _directions(directions, len(layers), hidden)
    ids = encode(tokenizer, prompts)
    pad = _pad_id(tokenizer)
    rec = _Recorder(model, r)
    n, L, E = len(prompts), rec.L, rec.E
    out = {"tokens_per_prompt": np.array([len(x) for x in ids], dtype=np.float32),
           **{k: np.zeros((n, L + 1), np.float32) for k in ("resid_last", "resid_mean")},
           **{f"{c}_{s}": np.zeros((n, L), np.float32) for c in ("attn", "mlp", "shared") for s in ("mean", "last")},
           **{k: np.zeros((n, L, E), np.float32) for k in ("expert_mean", "expert_last", "sel_count", "sel_weight", "last_sel", "last_weight")}}
    lp = None
    dev = input_device(model)
    keep = last_logits_kwargs(model)
    done = 0
    try:
        for idx, x, m in batches(ids, batch_size, pad):
            rec.start(m)
            res = model(input_ids=x.to(dev), attention_mask=m.to(dev), position_ids=_positions(m).to(dev), use_cache=False, **keep)
            rec.flush(out, idx)
            if return_logprobs:
                rows = torch.log_softmax(res.logits[:, -1, :].float(), dim=-1).cpu()  # left padding: -1 is the last prompt token
                if lp is None:
                    lp = torch.empty(n, rows.shape[-1], dtype=torch.float32)
                lp[torch.tensor(idx)] = rows
            del res
            done += len(idx)
            if progress is not None:
                progress(done, n)
    finally:
        rec.remove()
    family = getattr(model.config, "model_type", type(model).__name__)
    result = ProbeResult(family=family, n_layers=L, n_experts=E, top_k=rec.top_k, moe_layers=sorted(rec.moe),
                         has_shared=rec.shared_layers, **out)
    return (result, lp) if return_logprobs else result
