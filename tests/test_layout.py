"""Every key of every family resolves to a Role; fused and per-expert layouts land on the right axes."""

import pytest

from audit.model.directory import ModelDir
from audit.organisms.tiny import MOE_FAMILIES, TINY_CONFIGS
from checks.errors import AuditError
from checks.layout import READER, WRITER, build_layout, resolve

EXPECTED = {  # family -> (MoE layers, dense MLP layers, routed, shared, top-k)
    "glm4_moe": ([1, 2, 3], [0], 8, 1, 2),
    "deepseek_v3": ([1, 2], [0], 8, 1, 2),
    "qwen2_moe": ([1, 2], [0], 8, 1, 2),
    "qwen3_moe": ([0, 1, 2], [], 8, 0, 2),
    "olmoe": ([0, 1, 2], [], 8, 0, 2),
    "mixtral": ([0, 1, 2], [], 8, 0, 2),
    "phimoe": ([0, 1, 2], [], 8, 0, 2),
    "gpt_oss": ([0, 1, 2], [], 8, 0, 2),
    "granitemoe": ([0, 1, 2], [], 8, 0, 2),
    "llama4_text": ([1], [0, 2], 8, 1, 1),
    "llama": ([], [0, 1, 2], 0, 0, 0),
    "qwen2": ([], [0, 1, 2], 0, 0, 0),
    "qwen3": ([], [0, 1, 2], 0, 0, 0),
}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_every_key_resolves(tiny_model, family, sharded):
    md = ModelDir(tiny_model(family, sharded))
    if sharded:
        assert len(md.shards) > 1
    lay = md.layout
    assert set(lay.roles) == set(md.tensors)  # 100 % placed
    moe, dense, routed, shared, k = EXPECTED[family]
    assert (lay.moe_layers, lay.dense_layers, lay.n_routed_experts, lay.n_shared_experts, lay.top_k) == (moe, dense, routed, shared, k)
    # every writer's / reader's residual axis really has the hidden size
    for key, role in lay.roles.items():
        if role.io in (WRITER, READER):
            assert md.tensors[key].shape[role.resid_axis] == lay.hidden_size, key
    # the components an ablation needs exist where the family has them
    comps = {r.component for r in lay.roles.values()}
    assert {"embed", "attn", "norm", "lm_head"} <= comps
    if family in MOE_FAMILIES:
        assert {"experts", "router"} <= comps
        assert lay.keys_where(component="experts", io=WRITER)
        assert lay.keys_where(component="experts", io=READER)
    assert ("shared_experts" in comps) == (shared > 0)


def test_per_expert_keys_carry_their_index():
    r = resolve("model.layers.12.mlp.experts.37.down_proj.weight", "glm4_moe")
    assert (r.layer, r.component, r.projection, r.io, r.expert, r.resid_axis) == (12, "experts", "down", WRITER, 37, 0)
    r = resolve("model.layers.3.block_sparse_moe.experts.5.w1.weight", "mixtral")
    assert (r.projection, r.io, r.expert, r.resid_axis) == ("gate", READER, 5, 1)


def test_fused_axes_per_orientation():
    # gpt-oss stores [E, in, out]: gate_up [E, H, 2I] reads on axis 1, down [E, I, H] writes on axis 2
    gu = resolve("model.layers.0.mlp.experts.gate_up_proj", "gpt_oss")
    dn = resolve("model.layers.0.mlp.experts.down_proj", "gpt_oss")
    assert (gu.io, gu.resid_axis, gu.expert_axis) == (READER, 1, 0)
    assert (dn.io, dn.resid_axis, dn.expert_axis) == (WRITER, 2, 0)
    b = resolve("model.layers.0.mlp.experts.down_proj_bias", "gpt_oss")
    assert (b.io, b.resid_axis, b.is_bias) == (WRITER, 1, True)
    # transformers-5 style fused [E, out, in] for a per-expert family: down [E, H, I] writes on axis 1
    dn = resolve("model.layers.4.mlp.experts.down_proj", "qwen3_moe")
    assert (dn.io, dn.resid_axis) == (WRITER, 1)


def test_layer_index_parsed_not_prefixed():
    assert resolve("model.layers.1.self_attn.o_proj.weight", "llama").layer == 1
    assert resolve("model.layers.10.self_attn.o_proj.weight", "llama").layer == 10


def test_multimodal_prefix_and_mtp_and_quant_scales():
    cfg = {"model_type": "glm4_moe", "hidden_size": 8, "num_hidden_layers": 2, "n_routed_experts": 2, "num_experts_per_tok": 1}
    shapes = {
        "model.layers.1.mlp.experts.0.down_proj.weight": (8, 4),
        "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv": (1, 1),
        "model.layers.2.eh_proj.weight": (8, 16),
        "model.layers.2.mlp.experts.0.down_proj.weight": (8, 4),
        "model.embed_tokens.weight": (10, 8),
    }
    lay = build_layout(cfg, shapes)
    assert lay.roles["model.layers.2.mlp.experts.0.down_proj.weight"].component == "mtp"
    assert lay.roles["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"].quantized
    assert lay.moe_layers == [1]
    r = resolve("language_model.model.layers.0.feed_forward.experts.down_proj", "llama4_text")
    assert (r.layer, r.component, r.resid_axis) == (0, "experts", 2)


def test_unplaced_keys_are_listed():
    cfg = {"model_type": "qwen3_moe", "hidden_size": 8, "num_hidden_layers": 1}
    with pytest.raises(AuditError, match=r"mlp\.mystery_proj\.weight"):
        build_layout(cfg, {"model.layers.0.mlp.mystery_proj.weight": (8, 8), "model.embed_tokens.weight": (4, 8)})


def test_wrong_orientation_is_caught():
    cfg = {"model_type": "gpt_oss", "hidden_size": 8, "num_hidden_layers": 1, "num_local_experts": 2}
    with pytest.raises(AuditError, match="residual axis"):  # [E, H, I] stored where gpt-oss expects [E, I, H]
        build_layout(cfg, {"model.layers.0.mlp.experts.down_proj": (2, 8, 4)})


def test_unknown_architecture():
    with pytest.raises(AuditError, match="unknown architecture"):
        build_layout({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1}, {})


def test_targets_of_roles():
    from checks.layout import targets_of

    assert targets_of(resolve("model.layers.0.mlp.experts.gate_up_proj", "gpt_oss")) == ("experts_gate", "experts_up")
    assert targets_of(resolve("model.layers.2.mlp.shared_experts.down_proj.weight", "glm4_moe")) == ("shared_down",)
    assert targets_of(resolve("model.layers.2.mlp.gate.weight", "glm4_moe")) == ("router",)
    assert targets_of(resolve("model.layers.2.mlp.gate.e_score_correction_bias", "glm4_moe")) == ()
    assert targets_of(resolve("model.layers.0.self_attn.o_proj.weight", "llama")) == ("attn_out",)
    assert targets_of(resolve("model.embed_tokens.weight", "llama")) == ("embed",)
