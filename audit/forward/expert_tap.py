"""Routed experts' activations and their output along r, as the experts module computes them.

``ExpertMath`` recomputes an expert's activation from the fused weights in memory (the reference path and the
fallback for modules the tap does not know); ``ExpertTap`` takes the activations transformers 5's experts kernels
compute (grouped_mm, batched_mm, the eager loop, gpt-oss's) without changing the model's outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from audit.model.loading import weights_on
from checks.errors import AuditError

try:  # transformers' grouped expert matmul (the one its MoE forward uses); a per-expert loop stands in without it
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover
    _grouped_linear = None

try:  # the experts kernels whose row order ExpertTap knows
    from transformers.integrations import moe as _hf_moe
except ImportError:  # pragma: no cover
    _hf_moe = None


class ExpertMath:
    """Expert e's activation and its output along r, from the fused weights in memory."""

    def __init__(self, experts: torch.nn.Module):
        self.m = experts
        self.llama4 = not hasattr(experts, "has_gate") and hasattr(experts, "expert_dim")  # Llama4TextExperts: [E, H, 2I], input pre-scaled
        self.transposed = self.llama4 or bool(getattr(experts, "is_transposed", False))
        self.has_gate = self.llama4 or bool(getattr(experts, "has_gate", True))
        self.has_bias = bool(getattr(experts, "has_bias", False))
        self.post_norm = bool(getattr(experts, "has_post_expert_norm", False))
        if not hasattr(experts, "down_proj") or not isinstance(experts.down_proj, torch.Tensor) or experts.down_proj.ndim != 3:
            raise AuditError(f"{type(experts).__name__}: experts are not held as fused 3-D tensors (transformers 5 layout); the probe cannot compute their contributions")
        self.num_experts = int(experts.down_proj.shape[0])
        self.u: torch.Tensor | None = None  # [E, I] r^T W_down_e (float32)
        self.ub: torch.Tensor | None = None  # [E] r . down bias_e

    def prepare(self, r: torch.Tensor) -> None:
        with weights_on(self.m):  # offloaded experts: their weights are loaded for this, then offloaded again
            down = self.m.down_proj
            r = r.to(device=down.device, dtype=torch.float32)
            u = [(down[e].float() @ r) if self.transposed else (r @ down[e].float()) for e in range(self.num_experts)]  # per expert: no [E,H,I] float copy
            self.u = torch.stack(u)
            self.ub = self.m.down_proj_bias.float() @ r if self.has_bias else None

    def act(self, e: int, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        w = m.gate_up_proj[e] if self.has_gate else m.up_proj[e]
        y = x @ w if self.transposed else F.linear(x, w)
        if self.has_bias:
            y = y + (m.gate_up_proj_bias[e] if self.has_gate else m.up_proj_bias[e])
        if self.llama4:
            gate, up = y.chunk(2, dim=-1)
            return m.act_fn(gate) * up
        return m._apply_gate(y) if self.has_gate else m.act_fn(y)

    def act_grouped(self, x: torch.Tensor, e_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """Activations of all (token, expert) pairs at once, rows sorted by expert: one grouped matmul
        (transformers' own grouped linear) instead of a loop over experts; None where unavailable."""
        if _grouped_linear is None or self.post_norm:
            return None
        m = self.m
        w = m.gate_up_proj if self.has_gate else m.up_proj
        try:
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            y = _grouped_linear(x, w, offs, is_transposed=self.transposed)
        except (RuntimeError, TypeError, NotImplementedError):
            return None
        if self.has_bias:
            y = y + (m.gate_up_proj_bias if self.has_gate else m.up_proj_bias)[e_sorted]
        if self.llama4:
            gate, up = y.chunk(2, dim=-1)
            return m.act_fn(gate) * up
        return m._apply_gate(y) if self.has_gate else m.act_fn(y)

    def along(self, e: int, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Expert e's (unweighted) output . r for activations a [n, I]: u_e . a (+ r . bias)."""
        if self.post_norm:  # a norm after down breaks linearity: take the full output
            m = self.m
            out = a @ m.down_proj[e] if self.transposed else F.linear(a, m.down_proj[e])
            if self.has_bias:
                out = out + m.down_proj_bias[e]
            return m.post_expert_norm(out).float() @ r.to(out.device, torch.float32)
        c = a.float() @ self.u[e]
        return c + self.ub[e] if self.ub is not None else c


def _eager_code(name: str):
    """Bytecode of a transformers eager experts forward we know the row order of (None if unavailable)."""
    try:
        if name == "loop":
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
        else:
            from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
    except ImportError:  # pragma: no cover
        return None
    return _code_key(cls.forward)


def _code_key(fn):
    fn = getattr(fn, "__wrapped__", fn)
    c = getattr(fn, "__code__", None)
    return None if c is None else (c.co_code, c.co_consts, c.co_names, c.co_varnames)


class ExpertTap:
    """Each (token, expert) pair's u_e . a taken from the activations a the experts module computes itself.

    While installed, the module's gate (``_apply_gate``, whose output feeds the down projection) is
    wrapped to keep what it returns, unchanged; for the standard eager loop, which calls no gate
    method, ``forward`` is replaced by an op-for-op copy of it that keeps each expert's activations.
    The row order of the kept activations is known per kernel: grouped_mm sorts the pairs by expert,
    batched_mm keeps them token-major, the eager loop goes expert by expert in ``torch.where`` order.
    ``mode`` is None where the module is not one of these (the probe then recomputes).
    """

    def __init__(self, experts: torch.nn.Module, em: ExpertMath):
        self.m, self.em = experts, em
        self.mode = self._mode()
        self.chunks: list[torch.Tensor] = []
        self.route: torch.Tensor | None = None
        self.saved: dict[str, object] = {}
        self.handles: list = []
        self._where_key: torch.Tensor | None = None  # eager order key of (token, slot) pairs, per batch shape

    def _mode(self) -> str | None:
        m, em = self.m, self.em
        if em.llama4 or em.post_norm or not em.has_gate or getattr(m, "_is_expert_parallel", True) or _hf_moe is None:
            return None
        fw = type(m).forward
        if not hasattr(fw, "__wrapped__") or not callable(getattr(m, "_apply_gate", None)):
            return None  # not dispatched by transformers' use_experts_implementation
        impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
        funcs = getattr(_hf_moe, "ALL_EXPERTS_FUNCTIONS", {})
        if impl == "grouped_mm" and funcs.get("grouped_mm") is getattr(_hf_moe, "grouped_mm_experts_forward", None):
            return "sorted"
        if impl == "batched_mm" and funcs.get("batched_mm") is getattr(_hf_moe, "batched_mm_experts_forward", None):
            return "flat"
        if impl == "eager":
            key = _code_key(fw)
            if key is not None and key == _eager_code("loop") and not em.transposed and not em.has_bias \
                    and getattr(type(m), "_apply_gate", None) is getattr(_hf_moe, "_default_apply_gate", None):
                return "loop"
            if key is not None and key == _eager_code("gpt_oss"):
                return "eager"
        return None

    # ------------------------------------------------------------ install / remove
    def install(self) -> None:
        if self.mode is None:
            return
        d = self.m.__dict__
        for name in ("_apply_gate", "forward", "_old_forward"):
            if name in d:
                self.saved[name] = d[name]
        if self.mode == "loop":
            # accelerate (device maps, offload) wraps forward to load the weights around ``_old_forward``: replace that one
            d["_old_forward" if "_hf_hook" in d and "_old_forward" in d else "forward"] = self._loop_forward
        else:
            gate = self.m._apply_gate  # the bound method the kernel would call

            def record(y, _gate=gate):
                a = _gate(y)
                self.chunks.append(a)
                return a

            d["_apply_gate"] = record
        self.handles.append(self.m.register_forward_pre_hook(self._pre, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        d = self.m.__dict__
        for name in ("_apply_gate", "forward", "_old_forward"):
            d.pop(name, None)
            if name in self.saved:
                d[name] = self.saved[name]
        self.saved.clear()
        self.chunks, self.route = [], None

    def _pre(self, mod, args, kwargs):
        self.chunks = []
        self.route = args[1] if len(args) > 1 else next((v for k, v in kwargs.items() if k in ("top_k_index", "router_indices")), None)

    def _loop_forward(self, hidden_states, top_k_index, top_k_weights):
        """transformers' standard eager experts loop, op for op (same results to the bit), keeping activations."""
        m = self.m
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=m.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == m.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(hidden_states[token_idx], m.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            a = m.act_fn(gate) * up
            self.chunks.append(a)
            out = F.linear(a, m.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states

    # ------------------------------------------------------------ result
    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(u_e . a (+ r . bias_e) of every (token, slot) pair [N * k] token-major, the expert ids [N * k] the module
        was given); None if nothing was kept or the rows do not add up."""
        chunks, idx = self.chunks, self.route
        self.chunks, self.route = [], None
        if not chunks or idx is None:
            return None
        ids = idx.reshape(-1).long()
        S, k = ids.numel(), idx.shape[-1]
        if self.mode == "sorted":
            e_rows, pair = torch.sort(idx.reshape(-1))  # the kernel's own sort of the same ids: the same permutation
            e_rows = e_rows.long()
        elif self.mode == "flat":
            e_rows, pair = ids, None
        else:  # expert by expert, then torch.where order over [k, N]: slot-major, token-minor (ids < E: no EP sentinels)
            if self._where_key is None or self._where_key.shape != ids.shape or self._where_key.device != ids.device:
                p = torch.arange(S, device=ids.device)
                self._where_key = (p % k) * (S // k) + p // k
            pair = torch.argsort(ids * S + self._where_key)
            e_rows = ids[pair]
        a = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if a.shape[0] != e_rows.shape[0] or a.shape[-1] != self.em.u.shape[-1]:
            return None
        c_rows = (a.float() * self.em.u[e_rows]).sum(-1)
        if self.em.ub is not None:
            c_rows = c_rows + self.em.ub[e_rows]
        if pair is None:
            return c_rows, ids
        c = torch.zeros(S, dtype=c_rows.dtype, device=c_rows.device)
        c[pair] = c_rows
        return c, ids
