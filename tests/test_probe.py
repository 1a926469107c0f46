"""audit/forward/probe.py: recorded routing equals the router's own choice, padding excluded, contributions add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.forward.structure import unpack_router

from audit.forward.probe import ProbeResult, _positions, batches, encode, probe
from audit.organisms.tiny import MOE_FAMILIES
from checks.errors import AuditError

PROMPTS = ["hi", "the cat writes a short poem today.", "a farmer builds the bridge step by step with great care.",
           "our team plans the budget", "my neighbour repairs the old clock again?", "a chef cooks"]


@pytest.fixture(scope="module")
def load(tiny_model):
    cache = {}

    def get(family):
        if family not in cache:
            from transformers import AutoModelForCausalLM

            cache[family] = AutoModelForCausalLM.from_pretrained(str(tiny_model(family))).eval()
        return cache[family]

    return get


def _routers(model):
    """(layer, router module) for every MoE layer, found independently of the probe's own lookup."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for block_name in ("mlp", "block_sparse_moe", "feed_forward"):
            block = getattr(layer, block_name, None)
            if block is not None and hasattr(block, "experts"):
                out.append((i, getattr(block, "gate", None) or block.router))
    return out


def _reference_counts(model, tok, prompts, batch_size):
    """Per-prompt selection counts [n, L, E] and last-token choice from the routers' own outputs (hooks of the test's own)."""
    n, L = len(prompts), model.config.num_hidden_layers
    E = next(m.num_experts for _, m in _routers(model) if hasattr(m, "num_experts"))
    counts = np.zeros((n, L, E))
    last = np.zeros((n, L, E))
    logits_topk = {}
    for idx, x, m in batches(encode(tok, prompts), batch_size, tok.pad_token_id):
        seen = {}
        hs = [r.register_forward_hook(lambda mod, a, out, i=i, seen=seen: seen.__setitem__(i, out)) for i, r in _routers(model)]
        with torch.no_grad():
            res = model(input_ids=x, attention_mask=m, position_ids=_positions(m), output_router_logits=True)
        for h in hs:
            h.remove()
        B, T = x.shape
        for i, out in seen.items():
            k = model.config.num_experts_per_tok
            if isinstance(out, tuple) and len(out) == 3:
                ind = out[2].reshape(B, T, -1)
            else:  # Llama-4: (scores with -inf -> 0 for unselected, logits)
                ind = (out[0] > 0).reshape(B, T, -1).nonzero()[:, 2].reshape(B, T, k)
            for b, p in enumerate(idx):
                for t in range(T):
                    if m[b, t]:
                        counts[p, i, ind[b, t]] += 1
                        if t == T - 1:
                            last[p, i, ind[b, t]] = 1
        if getattr(res, "router_logits", None) is not None:
            for i, lg in zip([i for i, _ in _routers(model)], [g for g in res.router_logits if g is not None]):
                logits_topk.setdefault(i, []).append((idx, lg.reshape(B, T, -1), m))
    return counts, last, logits_topk


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_equals_router_output(family, load, tiny_tok):
    model = load(family)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    res = probe(model, tiny_tok, PROMPTS, r, batch_size=4)
    counts, last, logits = _reference_counts(model, tiny_tok, PROMPTS, 4)
    ml = res.moe_layers
    assert ml and res.n_experts == counts.shape[2]
    np.testing.assert_array_equal(res.sel_count[:, ml], counts[:, ml])
    np.testing.assert_array_equal(res.last_sel[:, ml], last[:, ml])
    # padding excluded: each real token picks exactly k experts, no more
    k = res.top_k
    np.testing.assert_array_equal(res.sel_count[:, ml].sum(-1), np.broadcast_to(k * res.tokens_per_prompt[:, None], (len(PROMPTS), len(ml))))
    assert res.tokens_per_prompt.tolist() == [len(x) for x in encode(tiny_tok, PROMPTS)]
    # routing weights: positive where selected, zero elsewhere
    assert ((res.sel_weight[:, ml] > 0) == (res.sel_count[:, ml] > 0)).all()
    # for plain top-k routers, the recorded choice is also the top-k of output_router_logits
    if family not in ("glm4_moe", "deepseek_v3"):
        for i, chunks in logits.items():
            for idx, lg, m in chunks:
                top = torch.topk(lg.float(), k, dim=-1).indices
                for b, p in enumerate(idx):
                    got = np.zeros(res.n_experts)
                    for t in range(lg.shape[1]):
                        if m[b, t]:
                            got[top[b, t]] += 1
                    np.testing.assert_array_equal(got, res.sel_count[p, i])


def test_group_limited_choice_differs_from_softmax(load, tiny_tok):
    """GLM routing uses sigmoid + correction bias + group-limited top-k: with a large bias on one group the
    recorded experts follow the bias (the router's real choice), not a softmax of the logits."""
    model = load("glm4_moe")
    gate = model.model.layers[1].mlp.gate
    saved = gate.e_score_correction_bias.clone()
    try:
        with torch.no_grad():
            gate.e_score_correction_bias.zero_()
            gate.e_score_correction_bias[4:] = 10.0  # group 1 (experts 4..7) always wins
        res = probe(model, tiny_tok, PROMPTS, torch.ones(model.config.hidden_size), batch_size=3)
    finally:
        with torch.no_grad():
            gate.e_score_correction_bias.copy_(saved)
    assert res.sel_count[:, 1, :4].sum() == 0 and res.sel_count[:, 1, 4:].sum() == 2 * res.tokens_per_prompt.sum()


@pytest.mark.parametrize("family", MOE_FAMILIES + ["llama"])
def test_contributions_add_up(family, load, tiny_tok):
    """Per prompt and layer: residual(i+1) - residual(i) = attention + MLP block; MoE block = experts + shared."""
    model = load(family)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    res = probe(model, tiny_tok, PROMPTS, r, batch_size=4)
    L = res.n_layers
    for s in ("mean", "last"):
        resid = getattr(res, f"resid_{s}")
        step = resid[:, 1:L] - resid[:, : L - 1]
        parts = getattr(res, f"attn_{s}")[:, : L - 1] + getattr(res, f"mlp_{s}")[:, : L - 1]
        scale = np.abs(parts).max()
        assert scale > 0
        np.testing.assert_allclose(step, parts, atol=1e-4 * scale)
        if res.moe_layers:
            ml = res.moe_layers
            moe = getattr(res, f"expert_{s}")[:, ml].sum(-1) + getattr(res, f"shared_{s}")[:, ml]
            np.testing.assert_allclose(moe, getattr(res, f"mlp_{s}")[:, ml], atol=1e-4 * np.abs(moe).max())
            assert np.abs(getattr(res, f"expert_{s}")[:, ml]).max() > 0
    if family == "llama":
        assert res.n_experts == 0 and res.moe_layers == [] and res.sel_count.shape == (len(PROMPTS), L, 0)
    # the final index is the final norm's output, as in output_hidden_states
    ids = encode(tiny_tok, PROMPTS[:1])
    with torch.no_grad():
        hs = model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    ru = r / r.norm()
    want = np.array([float(h[0, -1] @ ru) for h in hs])
    np.testing.assert_allclose(res.resid_last[0], want, atol=1e-4 * np.abs(want).max())


def test_padding_does_not_change_results(load, tiny_tok):
    model = load("qwen2_moe")
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    alone = probe(model, tiny_tok, PROMPTS[:1], r, batch_size=1)
    padded = probe(model, tiny_tok, PROMPTS, r, batch_size=len(PROMPTS))
    one = padded.subset([0])
    np.testing.assert_array_equal(alone.sel_count, one.sel_count)
    for k in ("resid_mean", "resid_last", "expert_mean", "shared_mean", "attn_last"):
        np.testing.assert_allclose(getattr(alone, k), getattr(one, k), atol=1e-5 * (np.abs(getattr(alone, k)).max() + 1e-12))


def test_directions_per_layer_and_errors(load, tiny_tok, tmp_path):
    model = load("mixtral")
    H, L = model.config.hidden_size, model.config.num_hidden_layers
    r = torch.randn(H, generator=torch.Generator().manual_seed(4))
    a = probe(model, tiny_tok, PROMPTS[:3], 3 * r, batch_size=2)  # normalized internally
    b = probe(model, tiny_tok, PROMPTS[:3], r.expand(L + 1, H).clone(), batch_size=3)
    np.testing.assert_allclose(a.expert_mean, b.expert_mean, atol=1e-6)
    per = torch.randn(L + 1, H, generator=torch.Generator().manual_seed(5))
    c = probe(model, tiny_tok, PROMPTS[:3], per, batch_size=3)
    assert not np.allclose(c.resid_last, b.resid_last)
    with pytest.raises(AuditError, match="directions"):
        probe(model, tiny_tok, PROMPTS[:1], torch.randn(L, H))
    with pytest.raises(AuditError, match="zero"):
        probe(model, tiny_tok, PROMPTS[:1], torch.zeros(H))
    with pytest.raises(AuditError):
        probe(model, tiny_tok, [], r)
    path = tmp_path / "probe.npz"
    c.save(path)
    d = ProbeResult.load(path)
    assert d.moe_layers == c.moe_layers and d.family == c.family
    np.testing.assert_array_equal(d.expert_mean, c.expert_mean)


def test_unpack_router_rejects_unknown_output():
    with pytest.raises(AuditError, match="router"):
        unpack_router(torch.zeros(3, 4), 2)
    idx, w = unpack_router((torch.zeros(3, 4), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.long)), 2)
    assert idx.dtype == torch.long and w.shape == (3, 2)


# ---------------------------------------------------------------- the experts tap (issue 7: no recomputation)

IMPLS = ("grouped_mm", "batched_mm", "eager")


_IMPL_CACHE: dict = {}


def _load_impl(tiny_model, family, impl):
    """``family``'s tiny model with its experts run by ``impl`` (cached for this module)."""
    from transformers import AutoModelForCausalLM

    if (family, impl) not in _IMPL_CACHE:
        kw = {} if family == "llama4_text" else {"experts_implementation": impl}  # Llama-4 has a single experts class
        _IMPL_CACHE[family, impl] = AutoModelForCausalLM.from_pretrained(str(tiny_model(family)), **kw).eval()
    return _IMPL_CACHE[family, impl]


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "down_proj") and isinstance(getattr(m, "down_proj"), torch.Tensor)
            and m.down_proj.ndim == 3]


def _taps(model, r):
    import audit.forward.probe as P

    rec = P._Recorder(model, P._directions(r, model.config.num_hidden_layers, model.config.hidden_size))
    try:
        return {i: t.mode for i, t in rec.taps.items()}
    finally:
        rec.remove()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tap_equals_recompute(family, impl, tiny_model, tiny_tok, monkeypatch):
    """Contributions taken from the experts' own forward equal the recomputed ones; routing is identical."""
    import audit.forward.probe as P

    if family == "llama4_text" and impl != "grouped_mm":
        pytest.skip("Llama-4 experts have one implementation")
    model = _load_impl(tiny_model, family, impl)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    modes = set(_taps(model, r).values())
    assert modes == ({None} if family == "llama4_text" else {"grouped_mm": {"sorted"}, "batched_mm": {"flat"},
                                                            "eager": {"eager" if family == "gpt_oss" else "loop"}}[impl])
    tapped = probe(model, tiny_tok, PROMPTS, r, batch_size=4)
    monkeypatch.setattr(P, "TAP_EXPERTS", False)
    ref = probe(model, tiny_tok, PROMPTS, r, batch_size=4)
    for k in P._ARRAYS:
        a, b = getattr(tapped, k), getattr(ref, k)
        if k.startswith(("sel_", "last_")) or k == "tokens_per_prompt":
            np.testing.assert_array_equal(a, b, err_msg=k)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * (np.abs(b).max() + 1e-30), err_msg=k)
    assert np.abs(tapped.expert_mean).max() > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f != "llama4_text"])
def test_tap_leaves_logits_unchanged_and_is_removed(family, impl, tiny_model, tiny_tok):
    """With the taps installed the model computes the same logits, to the bit; afterwards nothing is left behind."""
    import audit.forward.probe as P

    model = _load_impl(tiny_model, family, impl)
    ids = encode(tiny_tok, PROMPTS)
    idx, x, m = next(batches(ids, len(ids), tiny_tok.pad_token_id))
    kw = dict(input_ids=x, attention_mask=m, position_ids=_positions(m), use_cache=False)
    experts = _experts_modules(model)
    forwards = [e.forward for e in experts]
    with torch.inference_mode():
        want = model(**kw).logits
        r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(7))
        rec = P._Recorder(model, P._directions(r, model.config.num_hidden_layers, model.config.hidden_size))
        try:
            assert rec.taps and all(t.mode for t in rec.taps.values())
            assert any("forward" in e.__dict__ or "_apply_gate" in e.__dict__ for e in experts)  # the swap is in place
            rec.start(m)
            got = model(**kw).logits
        finally:
            rec.remove()
        after = model(**kw).logits
    assert torch.equal(got, want) and torch.equal(after, want)
    for e, f in zip(experts, forwards):
        assert "forward" not in e.__dict__ and "_apply_gate" not in e.__dict__ and not e._forward_pre_hooks
        assert e.forward == f


def test_tap_restored_on_exception(tiny_model, tiny_tok):
    """An exception in the middle of the probe (here: inside the forward pass, then in the progress callback)
    still gives every experts module its own forward back and removes every hook."""
    for impl in ("grouped_mm", "eager"):
        model = _load_impl(tiny_model, "qwen3_moe", impl)
        experts = _experts_modules(model)
        r = torch.ones(model.config.hidden_size)
        boom = model.model.layers[-1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            probe(model, tiny_tok, PROMPTS, r, batch_size=2)
        boom.remove()
        with pytest.raises(KeyboardInterrupt):
            probe(model, tiny_tok, PROMPTS, r, batch_size=2, progress=lambda d, n: (_ for _ in ()).throw(KeyboardInterrupt()))
        for e in experts:
            assert "forward" not in e.__dict__ and "_apply_gate" not in e.__dict__ and not e._forward_pre_hooks
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        res = probe(model, tiny_tok, PROMPTS[:2], r, batch_size=2)  # and it works again afterwards
        assert np.abs(res.expert_mean).max() > 0


@pytest.mark.parametrize("impl,tap", [("grouped_mm", True), ("batched_mm", True), ("eager", True), ("grouped_mm", False)])
@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe", "gpt_oss"])
def test_probe_on_a_disk_offloaded_model(family, impl, tap, tiny_model, tiny_tok, tmp_path, monkeypatch):
    """accelerate's device map with most layers on disk (weights on the meta device until their forward): the probe reads
    the offloaded experts' weights through accelerate (r's projections, the recomputation) and taps their own forward;
    every number and the first-token log-probabilities equal the in-memory model's."""
    import audit.forward.probe as P
    from audit.model.directory import ModelDir

    if family == "gpt_oss" and impl == "eager":
        pytest.skip("the gpt-oss eager kernel is covered by test_tap_equals_recompute; its offloaded path is the same tap")
    monkeypatch.setattr(P, "TAP_EXPERTS", tap)
    md = ModelDir(tiny_model(family))
    kw = {"experts_implementation": impl}
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(md.path), **kw).eval()
    off = AutoModelForCausalLM.from_pretrained(str(md.path), device_map="auto", max_memory={"cpu": md.nbytes // 4},
                                               offload_folder=str(tmp_path / "offload"), **kw).eval()
    assert "disk" in set(off.hf_device_map.values()), off.hf_device_map
    experts = [m for m in off.modules() if isinstance(getattr(m, "down_proj", None), torch.Tensor) and m.down_proj.ndim == 3]
    assert any(e.down_proj.device.type == "meta" for e in experts)  # really offloaded
    r = torch.randn(off.config.num_hidden_layers + 1, off.config.hidden_size, generator=torch.Generator().manual_seed(8))
    want, lp_want = probe(ref_model, tiny_tok, PROMPTS, r, batch_size=4, return_logprobs=True)
    got, lp_got = probe(off, tiny_tok, PROMPTS, r, batch_size=4, return_logprobs=True)
    for k in P._ARRAYS:
        np.testing.assert_allclose(getattr(got, k), getattr(want, k), rtol=1e-5, atol=1e-6, err_msg=k)
    torch.testing.assert_close(lp_got, lp_want)
    assert np.abs(got.expert_mean).max() > 0
    assert all(e.down_proj.device.type == "meta" for e in experts if "_hf_hook" in e.__dict__ and e._hf_hook.offload)  # offloaded again
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in off.modules())


def test_probe_logprobs_equal_a_plain_forward(load, tiny_tok):
    """The log-probabilities the probe returns are the first answer token's, from its own forward pass (one pass serves both)."""
    from audit.forward.generate import last_token_logprobs

    model = load("glm4_moe")
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(9))
    res, lp = probe(model, tiny_tok, PROMPTS, r, batch_size=4, return_logprobs=True)
    assert isinstance(res, ProbeResult) and lp.shape == (len(PROMPTS), model.config.vocab_size) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, last_token_logprobs(model, tiny_tok, PROMPTS, batch_size=4), rtol=1e-4, atol=1e-4)
