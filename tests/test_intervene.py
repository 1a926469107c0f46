"""Interventions equal weight edits: for each component type, hooks on the original model give the logits of the edited copy."""

from __future__ import annotations

import copy

import pytest
import torch

from audit.ablation.ablate import ablate
from audit.forward.intervene import Intervention, apply, from_config, model_layout, reroute
from audit.model.directory import ModelDir
from audit.model.prompts import format_prompts
from checks.errors import AuditError
from checks.layout import targets_of
from checks.linalg import project_out

PROMPTS = ["the cat writes a short poem today.", "a chef cooks", "my neighbour repairs the bridge with great care. step by step."]
ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """family -> (model, tokenizer, batch) loaded once per module, in float32."""
    cache = {}

    def get(family):
        if family not in cache:
            md = ModelDir(tiny_model(family, initializer_range=0.2))
            tok = md.tokenizer()
            batch = _batch(tok)
            assert (batch["attention_mask"] == 0).any(), "the batch must contain left padding"
            cache[family] = (md.load_model(dtype=torch.float32), tok, batch)
        return cache[family]

    return get


def _direction(hidden: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(hidden, generator=g)
    return r / r.norm()


def _edited_copy(model, iv: Intervention):
    """The weight-edit counterpart, written independently of the hooks: project_out on each tensor's residual axis."""
    edited = copy.deepcopy(model)
    layout = model_layout(model)
    params = dict(edited.named_parameters())
    for key, role in layout.roles.items():
        hit = set(iv.targets).intersection(targets_of(role))
        if not hit or key not in params:
            continue
        layer = None if role.component == "embed" else role.layer
        if layer is not None and layer not in iv.layers:
            continue
        r, W = iv.direction_at(layer), params[key].data
        sub = (iv.experts or {}).get(layer) if role.component == "experts" else None
        new = project_out(W, r, role.resid_axis, iv.scale)
        if role.projection == "gate_up" and len(hit) == 1:  # one half of a fused gate_up
            axis = [a for a in range(W.ndim) if a not in (role.resid_axis, role.expert_axis)][-1]
            n = W.shape[axis]
            half = torch.arange(n)
            gate_idx = half[0::2] if layout.family == "gpt_oss" else half[: n // 2]
            up_idx = half[1::2] if layout.family == "gpt_oss" else half[n // 2:]
            pick = gate_idx if "experts_gate" in hit else up_idx
            keep = W.clone()
            keep.index_copy_(axis, pick, new.index_select(axis, pick).to(W.dtype))
            new = keep
        if sub is not None:
            out = W.clone()
            out[sorted(sub)] = new[sorted(sub)].to(W.dtype)
            new = out
        W.copy_(new.to(W.dtype))
    return edited


def _logits(model, batch):
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]


def _routed_experts(model, batch, layer: int, n: int) -> list[int]:
    """The n experts of ``layer`` the batch uses most (so that a subset edit changes something)."""
    layout = model_layout(model)
    key = [k for k in layout.keys_where(component="router", projection="router", layer=layer) if k.endswith("weight")][0]
    router = model.get_submodule(key.rsplit(".", 1)[0])
    seen = []
    h = router.register_forward_hook(lambda m, a, o: seen.append(o[2] if len(o) == 3 else o[0].topk(1, dim=-1)[1]))
    with torch.no_grad():
        model(**batch)
    h.remove()
    counts = torch.bincount(seen[0].flatten(), minlength=layout.n_routed_experts)
    return counts.argsort(descending=True)[:n].tolist()


def _check_equal(model, batch, iv: Intervention):
    ref = _logits(model, batch)
    want = _logits(_edited_copy(model, iv), batch)
    with apply(model, [iv]):
        got = _logits(model, batch)
    effect = (want - ref).abs().max().item()
    assert effect > 50 * ATOL, f"{iv.name}: the edit barely changes the logits ({effect:.2e}); the test would prove nothing"
    err = (got - want).abs().max().item()
    assert err < ATOL, f"{iv.name}: intervention differs from the weight edit by {err:.2e} (edit effect {effect:.2e})"
    assert torch.equal(_logits(model, batch), ref), "hooks must be gone after the block"


CASES = {
    "glm4_moe": [
        ("attn_out", {"targets": ("attn_out",), "layers": [0, 2]}),
        ("attn_in", {"targets": ("attn_in",), "layers": [1]}),
        ("embed", {"targets": ("embed",), "layers": []}),
        ("dense mlp", {"targets": ("mlp_down", "mlp_gate", "mlp_up"), "layers": [0]}),
        ("shared out", {"targets": ("shared_down",), "layers": [1, 2, 3]}),
        ("shared in", {"targets": ("shared_gate", "shared_up"), "layers": [2]}),
        ("experts all down", {"targets": ("experts_down",), "layers": [1, 2, 3]}),
        ("experts subset down", {"targets": ("experts_down",), "layers": [2], "subset": 3}),
        ("experts gate+up", {"targets": ("experts_gate", "experts_up"), "layers": [1, 3]}),
        ("experts gate only", {"targets": ("experts_gate",), "layers": [2]}),
        ("experts up only subset", {"targets": ("experts_up",), "layers": [2], "subset": 2}),
        ("experts subset all", {"targets": ("experts_down", "experts_gate", "experts_up"), "layers": [3], "subset": 2}),
        ("router", {"targets": ("router",), "layers": [1, 2, 3]}),
    ],
    "qwen3_moe": [
        ("attn_out", {"targets": ("attn_out",), "layers": [1]}),
        ("experts subset down", {"targets": ("experts_down",), "layers": [1], "subset": 2}),
        ("experts gate+up", {"targets": ("experts_gate", "experts_up"), "layers": [0, 1, 2]}),
        ("router", {"targets": ("router",), "layers": [0, 1, 2]}),
    ],
    "gpt_oss": [
        ("attn_out (bias)", {"targets": ("attn_out",), "layers": [0, 1]}),
        ("attn_in (bias)", {"targets": ("attn_in",), "layers": [2]}),
        ("experts all down (bias)", {"targets": ("experts_down",), "layers": [0, 1, 2]}),
        ("experts subset down (bias)", {"targets": ("experts_down",), "layers": [1], "subset": 3}),
        ("experts gate+up", {"targets": ("experts_gate", "experts_up"), "layers": [1]}),
        ("experts gate only interleaved", {"targets": ("experts_gate",), "layers": [1]}),
        ("experts up only subset", {"targets": ("experts_up",), "layers": [0], "subset": 2}),
        ("router (bias)", {"targets": ("router",), "layers": [0, 1, 2]}),
    ],
    "mixtral": [
        ("experts subset down", {"targets": ("experts_down",), "layers": [0], "subset": 2}),
        ("experts gate+up subset", {"targets": ("experts_gate", "experts_up"), "layers": [2], "subset": 3}),
        ("router", {"targets": ("router",), "layers": [1]}),
        ("embed", {"targets": ("embed",), "layers": []}),
    ],
    "llama": [
        ("attn_out", {"targets": ("attn_out",), "layers": [0, 1, 2]}),
        ("mlp_down", {"targets": ("mlp_down",), "layers": [1, 2]}),
        ("mlp_gate", {"targets": ("mlp_gate",), "layers": [0]}),
        ("mlp_up", {"targets": ("mlp_up",), "layers": [2]}),
        ("embed+attn_in", {"targets": ("embed", "attn_in"), "layers": [0]}),
    ],
    "llama4_text": [
        ("experts subset down (blocks)", {"targets": ("experts_down",), "layers": [1], "subset": 1}),
        ("experts gate+up (blocks)", {"targets": ("experts_gate", "experts_up"), "layers": [1]}),
        ("shared out", {"targets": ("shared_down",), "layers": [1]}),
    ],
}


@pytest.mark.parametrize("family,name,spec", [(f, n, s) for f, cases in CASES.items() for n, s in cases], ids=lambda x: x if isinstance(x, str) else "")
def test_intervention_equals_weight_edit(loaded, family, name, spec):
    model, _, batch = loaded(family)
    spec = dict(spec)
    n_sub = spec.pop("subset", None)
    hidden = model.config.get_text_config().hidden_size
    experts = {spec["layers"][0]: _routed_experts(model, batch, spec["layers"][0], n_sub)} if n_sub else None
    iv = Intervention(direction=_direction(hidden), scale=1.0, experts=experts, name=f"{family} {name}", **spec)
    _check_equal(model, batch, iv)


def test_per_layer_directions_and_scale(loaded):
    """A {layer: r} direction map and a partial scale match the edit using each layer's own direction."""
    model, _, batch = loaded("glm4_moe")
    dirs = {layer: _direction(32, seed=10 + layer) for layer in range(4)}
    iv = Intervention(("attn_out", "shared_down", "experts_down", "mlp_down", "embed"), [0, 1, 2, 3], dirs, scale=0.7, name="per-layer")
    _check_equal(model, batch, iv)


def test_interventions_compose_like_successive_edits(loaded):
    model, _, batch = loaded("qwen3_moe")
    a = Intervention(("attn_out",), [0, 1], _direction(32, 3), name="a")
    b = Intervention(("experts_down",), [1, 2], _direction(32, 4), name="b")
    want = _logits(_edited_copy(_edited_copy(model, a), b), batch)
    with apply(model, [a, b]):
        got = _logits(model, batch)
    assert (got - want).abs().max().item() < ATOL


def _router_of(model, layer):
    layout = model_layout(model)
    key = [k for k in layout.keys_where(component="router", projection="router", layer=layer) if k.endswith("weight")][0]
    return model.get_submodule(key.rsplit(".", 1)[0])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_reroute_without_mask_reproduces_the_router(loaded, family):
    """The logits-based re-routing used for steering is the router's own rule: nothing masked, same outputs."""
    model, _, batch = loaded(family)
    router = _router_of(model, 1)
    outs = []
    h = router.register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        model(**batch)
    h.remove()
    _, w, idx = outs[0]
    _, w2, idx2 = reroute(router, outs[0], [])
    order, order2 = idx.sort(-1), idx2.sort(-1)
    assert torch.equal(order.values, order2.values)
    assert torch.allclose(w.gather(-1, order.indices), w2.gather(-1, order2.indices), atol=1e-6)


@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_moe", "gpt_oss"])
def test_avoid_experts_steers_routing(loaded, family):
    model, _, batch = loaded(family)
    layout = model_layout(model)
    layer = layout.moe_layers[-1]
    top = _routed_experts(model, batch, layer, 2)
    router = _router_of(model, layer)
    before = [b.clone() for b in router.buffers()]
    seen = []
    ref = _logits(model, batch)
    with apply(model, Intervention(avoid_experts={layer: top}, name="steer")):
        h = router.register_forward_hook(lambda m, a, o: seen.append(o[2]))  # after the steering hook: sees its result
        got = _logits(model, batch)
        h.remove()
    steered = seen[-1]
    assert not torch.isin(steered, torch.tensor(top)).any(), "avoided experts are still chosen"
    assert (got - ref).abs().max() > 1e-3, "steering changed nothing"
    assert all(torch.equal(a, b) for a, b in zip(before, router.buffers())), "router buffers not restored"
    assert torch.equal(_logits(model, batch), ref)
    if family in ("glm4_moe", "gpt_oss"):  # the weight counterpart: a -1e9 correction bias / router bias on those experts
        edited = copy.deepcopy(model)
        r = _router_of(edited, layer)
        with torch.no_grad():
            (r.e_score_correction_bias if family == "glm4_moe" else r.bias)[top] = -1e9
        assert (got - _logits(edited, batch)).abs().max().item() < ATOL


def test_bad_interventions_raise(loaded):
    model, _, batch = loaded("llama")
    with pytest.raises(AuditError, match="unknown target"):
        Intervention(("experts",), [0], _direction(32))
    with pytest.raises(AuditError, match="need a direction"):
        Intervention(("attn_out",), [0])
    with pytest.raises(AuditError, match="match no tensor"):
        with apply(model, Intervention(("experts_down",), [0], _direction(32))):
            pass
    with pytest.raises(AuditError, match="out of range"):
        with apply(model, Intervention(("attn_out",), [7], _direction(32))):
            pass
    with pytest.raises(AuditError, match="no direction for layer 1"):
        with apply(model, Intervention(("attn_out",), [0, 1], {0: _direction(32)})):
            pass
    with pytest.raises(AuditError, match="no router"):
        with apply(model, Intervention(avoid_experts={0: [1]})):
            pass
    moe, _, _ = loaded("qwen3_moe")
    with pytest.raises(AuditError, match="not among its layers"):
        with apply(moe, Intervention(("experts_down",), [0], _direction(32), experts={1: [0]})):
            pass
    with pytest.raises(AuditError, match="must be a non-empty subset"):
        with apply(moe, Intervention(("experts_down",), [1], _direction(32), experts={1: [8]})):
            pass
    with pytest.raises(AuditError, match="fewer than top_k"):
        with apply(moe, Intervention(avoid_experts={1: list(range(7))})):
            pass
    ref = _logits(model, batch)
    assert torch.equal(_logits(model, batch), ref), "a failed apply must leave no hook behind"


def _batch(tok):
    """PROMPTS in the chat format (the suite's one formatter), left-padded."""
    return tok(format_prompts(tok, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False)


def _assert_hooks_equal_the_ablation(base, cfg, dirs, tmp_path):
    """``cfg`` ablated on disk by audit ablate and ``cfg`` as hooks on the base give the same logits (and they differ from the base's)."""
    ablate(base, cfg, tmp_path / "abl", directions=dirs, progress=False)
    md_base, md_abl = ModelDir(base), ModelDir(tmp_path / "abl")
    batch = _batch(md_base.tokenizer())
    m_base, m_abl = md_base.load_model(dtype=torch.float32), md_abl.load_model(dtype=torch.float32)
    want, ref = _logits(m_abl, batch), _logits(m_base, batch)
    assert (want - ref).abs().max() > 50 * ATOL
    with apply(m_base, from_config(cfg, dirs)):
        got = _logits(m_base, batch)
    assert (got - want).abs().max().item() < ATOL


def test_from_config_equals_the_suites_own_ablation(tiny_model, tmp_path):
    """A whole config as interventions on the base == the base ablated on disk by audit/ablation/ablate.py with that config."""
    from audit.intent.config import AblationConfig
    from audit.intent.directions import Directions

    base = tiny_model("glm4_moe", initializer_range=0.2)
    g = torch.Generator().manual_seed(5)
    dirs = Directions(torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g))
    cfg = AblationConfig.from_dict({
        "components": ["embed", "attn_out", "mlp_down", "experts_down", "experts_gate", "shared_down", "router"],
        "scale": 0.9,
        "ablate": [{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2, "scale": 0.5},
                   {"layer": 3, "measurement": 3, "components": ["experts_up", "attn_in"]}],
    })
    _assert_hooks_equal_the_ablation(base, cfg, dirs, tmp_path)


def test_from_config_with_expert_subsets_equals_the_ablation(tiny_model, tmp_path):
    """Entries that name experts (the reached edits of a partial ablation) give the same model as hooks and on disk."""
    from audit.intent.config import AblationConfig
    from audit.intent.directions import Directions

    base = tiny_model("qwen3_moe", initializer_range=0.2)
    g = torch.Generator().manual_seed(6)
    dirs = Directions(torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g))
    cfg = AblationConfig.from_dict({"components": ["experts_down"], "ablate": [
        {"layer": 1, "measurement": 1, "experts": [0, 3, 6]}, {"layer": 1, "measurement": 2, "experts": [1], "scale": 0.5},
        {"layer": 2, "measurement": 2, "components": ["attn_out", "experts_down"], "experts": [7]}]})
    _assert_hooks_equal_the_ablation(base, cfg, dirs, tmp_path)
