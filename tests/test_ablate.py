"""Our ablation: r removed from every touched tensor on the right axis, nothing else changed, bad input refused."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from audit.ablation.ablate import ablate

from audit.ablation.edit import edit_tensor
from audit.cli import main
from audit.intent.config import AblationConfig, load_config, plan, sparsify
from audit.intent.directions import Directions
from audit.intent.manifest import MANIFEST_NAME, load_manifest
from audit.model.directory import ModelDir, copy_side_files
from audit.model.shards import write_shard
from checks.errors import AuditError
from checks.linalg import along


def _directions(md: ModelDir, seed: int = 0, hidden: int | None = None) -> Directions:
    g = torch.Generator().manual_seed(seed)
    n, h = md.layout.num_layers + 1, hidden or md.layout.hidden_size
    hm, am = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    return Directions(hm - am, hm, am)


def _unit(d: Directions, i: int) -> torch.Tensor:
    r = d.refusal_dir[i]
    return r / r.norm()


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _tree_hash(p: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir()) if f.is_file()}


def _cfg(**kw) -> AblationConfig:
    return AblationConfig.from_dict(kw)


@pytest.fixture(scope="module")
def glm_sharded(tiny_model):
    return tiny_model("glm4_moe", sharded=True)


# -- the core guarantees -----------------------------------------------------------------------


def test_writers_lose_r_untouched_bit_identical_base_untouched(glm_sharded, tmp_path):
    base = ModelDir(glm_sharded)
    d = _directions(base)
    before_hash = _tree_hash(glm_sharded)
    cfg = _cfg(ablate=[{"layer": 0, "measurement": 2, "components": ["embed"]}, {"layer": "1-3", "measurement": 2}],
               components=["attn_out", "mlp_down", "experts_down", "shared_down", "router"])
    m = ablate(glm_sharded, cfg, tmp_path / "out", d, progress=False)
    out = ModelDir(tmp_path / "out")
    r = _unit(d, 2)

    # what should have been touched, worked out from the names alone
    want = {k for k in base.tensors if re.fullmatch(
        r"model\.layers\.[123]\.(self_attn\.o_proj\.weight|mlp\.experts\.\d+\.down_proj\.weight|mlp\.shared_experts\.down_proj\.weight|mlp\.gate\.weight)", k)}
    want.add("model.embed_tokens.weight")
    assert {x["key"] for x in m["modified"]} == want

    for key in base.tensors:
        w0, w1 = base.tensor(key), out.tensor(key)
        assert w1.dtype == w0.dtype and w1.shape == w0.shape
        if key not in want:
            assert _bits(w0) == _bits(w1), f"{key} changed but was not planned"
            continue
        role = base.layout.roles[key]
        a0, a1 = along(w0, r, role.resid_axis).norm(), along(w1, r, role.resid_axis).norm()
        assert a0 > 0 and a1 <= 1e-5 * a0, key
    assert _tree_hash(glm_sharded) == before_hash  # BASE never written
    rewritten = set(m["shards"]["rewritten"])
    for shard in m["shards"]["copied"]:
        assert (glm_sharded / shard).read_bytes() == (tmp_path / "out" / shard).read_bytes()
    assert rewritten and all((tmp_path / "out" / s).stat().st_size == (glm_sharded / s).stat().st_size for s in rewritten)


def rounding_floor(dtype: torch.dtype) -> float:
    """Relative rounding error of one cast to ``dtype`` (half an ulp at 1.0): the floor below which a residue is rounding."""
    return float(torch.finfo(dtype).eps) / (1 if dtype in (torch.float32, torch.float64) else 2)


def test_bfloat16_within_rounding_floor_and_matches_in_memory(tiny_model, tmp_path):
    src = tiny_model("glm4_moe", dtype=torch.bfloat16)
    base = ModelDir(src)
    d = _directions(base, seed=1)
    cfg = _cfg(ablate=[{"layer": "0-3", "measurement": 3}])
    m = ablate(src, cfg, tmp_path / "out", d, progress=False)
    out = ModelDir(tmp_path / "out")
    r, floor = _unit(d, 3), rounding_floor(torch.bfloat16)
    edits = {e.key: e for e in plan(cfg, base.layout, d)}
    assert len(m["modified"]) == len(edits) > 0
    for key, e in edits.items():
        w1 = out.tensor(key)
        assert w1.dtype == torch.bfloat16
        residue = along(w1, r, e.role.resid_axis).norm()
        assert residue <= floor * w1.float().norm(), key
        assert _bits(edit_tensor(base.tensor(key), e)) == _bits(w1)  # the in-memory path writes the same bits


def _fuse_experts(src: Path, dst: Path) -> Path:
    """Copy a per-expert checkpoint with experts stacked: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
    md = ModelDir(src)
    groups: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    tensors = []
    for name, t in md.iter_tensors():
        mm = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if mm:
            groups.setdefault(int(mm[1]), {}).setdefault(int(mm[2]), {})[mm[3]] = t
        else:
            tensors.append((name, t))
    for layer, experts in sorted(groups.items()):
        es = [experts[i] for i in range(len(experts))]
        tensors.append((f"model.layers.{layer}.mlp.experts.gate_up_proj", torch.stack([torch.cat([e["gate"], e["up"]]) for e in es])))
        tensors.append((f"model.layers.{layer}.mlp.experts.down_proj", torch.stack([e["down"] for e in es])))
    dst.mkdir()
    copy_side_files(src, dst)
    write_shard(dst / "model.safetensors", tensors, {"format": "pt"})
    return dst


@pytest.mark.parametrize("components", [["experts_down", "experts_gate", "attn_out"], ["experts_gate", "experts_up", "shared_down"]])
def test_per_expert_and_fused_give_the_same_weights(tiny_model, tmp_path, components):
    per = tiny_model("glm4_moe")
    fused = _fuse_experts(per, tmp_path / "fused")
    assert ModelDir(fused).layout.roles["model.layers.1.mlp.experts.gate_up_proj"].projection == "gate_up"
    d = _directions(ModelDir(per), seed=2)
    cfg = _cfg(ablate=[{"layer": "1-3", "measurement": 1}], components=components)
    ablate(per, cfg, tmp_path / "a", d, progress=False)
    ablate(fused, cfg, tmp_path / "b", d, progress=False)
    a, b, base = ModelDir(tmp_path / "a"), ModelDir(tmp_path / "b"), ModelDir(per)
    n_exp, inter = 8, 16
    for layer in (1, 2, 3):
        gu = b.tensor(f"model.layers.{layer}.mlp.experts.gate_up_proj")
        dn = b.tensor(f"model.layers.{layer}.mlp.experts.down_proj")
        for e in range(n_exp):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            torch.testing.assert_close(gu[e, :inter], a.tensor(p + "gate_proj.weight"), rtol=0, atol=1e-6)
            torch.testing.assert_close(gu[e, inter:], a.tensor(p + "up_proj.weight"), rtol=0, atol=1e-6)
            torch.testing.assert_close(dn[e], a.tensor(p + "down_proj.weight"), rtol=0, atol=1e-6)
            if "experts_up" not in components:  # the untouched half is bit-identical
                assert _bits(gu[e, inter:]) == _bits(base.tensor(p + "up_proj.weight"))
            if "experts_down" not in components:
                assert _bits(dn[e]) == _bits(base.tensor(p + "down_proj.weight"))
            else:
                assert not torch.equal(dn[e], base.tensor(p + "down_proj.weight"))


def test_layer_1_never_touches_layers_10_and_11(tiny_model, tmp_path):
    src = tiny_model("glm4_moe", num_hidden_layers=12)
    base = ModelDir(src)
    d = _directions(base, seed=3)
    cfg = _cfg(ablate=[{"layer": 1, "measurement": 5, "scale": 1.0, "sparsity": 0.0}],
               components=["attn_out", "attn_in", "experts_down", "experts_gate", "experts_up", "shared_down", "router"])
    m = ablate(src, cfg, tmp_path / "out", d, progress=False)
    assert m["modified"] and all(x["layer"] == 1 and ".layers.1." in x["key"] for x in m["modified"])
    out = ModelDir(tmp_path / "out")
    changed = {k for k in base.tensors if _bits(base.tensor(k)) != _bits(out.tensor(k))}
    assert changed == {x["key"] for x in m["modified"]}
    assert not any(re.search(r"\.layers\.1\d\.", k) for k in changed)
    assert any(".layers.1.mlp.experts.7.up_proj" in k for k in changed)


def test_gpt_oss_in_out_axis_and_interleaved_gate(tiny_model, tmp_path):
    src = tiny_model("gpt_oss")
    base = ModelDir(src)
    d = _directions(base, seed=4)
    cfg = _cfg(ablate=[{"layer": "0-2", "measurement": 1}], components=["experts_down", "experts_gate", "attn_out", "router"])
    ablate(src, cfg, tmp_path / "out", d, progress=False)
    out = ModelDir(tmp_path / "out")
    r = _unit(d, 1)
    for layer in range(3):
        p = f"model.layers.{layer}.mlp."
        w0, w1 = base.tensor(p + "experts.down_proj"), out.tensor(p + "experts.down_proj")  # [E, I, H]: output on the last axis
        assert w0.shape[-1] == 32 and (w0 @ r).norm() > 0
        assert (w1 @ r).norm() <= 1e-5 * (w0 @ r).norm()
        torch.testing.assert_close(w1, w0 - (w0 @ r).unsqueeze(-1) * r, rtol=0, atol=1e-6)
        b0, b1 = base.tensor(p + "experts.down_proj_bias"), out.tensor(p + "experts.down_proj_bias")  # [E, H]
        assert (b1 @ r).abs().max() <= 1e-5 * (b0 @ r).abs().max()
        g0, g1 = base.tensor(p + "experts.gate_up_proj"), out.tensor(p + "experts.gate_up_proj")  # [E, H, 2I], gate = 0::2
        gate_along0 = torch.einsum("h,ehi->ei", r, g0[..., 0::2])
        assert torch.einsum("h,ehi->ei", r, g1[..., 0::2]).norm() <= 1e-5 * gate_along0.norm()
        assert _bits(g1[..., 1::2]) == _bits(g0[..., 1::2])
        rw0, rw1 = base.tensor(p + "router.weight"), out.tensor(p + "router.weight")  # reader: input axis
        assert (rw1 @ r).norm() <= 1e-5 * (rw0 @ r).norm()
        assert _bits(base.tensor(p + "router.bias")) == _bits(out.tensor(p + "router.bias"))


def test_llama4_gate_is_the_first_half(tiny_model, tmp_path):
    src = tiny_model("llama4_text")
    base = ModelDir(src)
    d = _directions(base, seed=5)
    layer = base.layout.moe_layers[0]
    cfg = _cfg(ablate=[{"layer": layer, "measurement": 1}], components=["experts_gate"])
    ablate(src, cfg, tmp_path / "out", d, progress=False)
    key = f"model.layers.{layer}.feed_forward.experts.gate_up_proj"
    g0, g1 = base.tensor(key), ModelDir(tmp_path / "out").tensor(key)  # [E, H, 2I]
    half, r = g0.shape[-1] // 2, _unit(d, 1)
    assert torch.einsum("h,ehi->ei", r, g1[..., :half]).norm() <= 1e-5 * torch.einsum("h,ehi->ei", r, g0[..., :half]).norm()
    assert _bits(g1[..., half:]) == _bits(g0[..., half:])


# -- methods and direction options ---------------------------------------------------------------


def test_norm_preserving_keeps_norms_along_the_residual_axis(tiny_model):
    base = ModelDir(tiny_model("glm4_moe"))
    d = _directions(base, seed=6)
    cfg = _cfg(ablate=[{"layer": 1, "measurement": 2}], components=["attn_out", "experts_gate"], method="norm_preserving")
    edits = plan(cfg, base.layout, d)
    assert {e.role.io for e in edits} == {"writer", "reader"}
    for e in edits:
        w0 = base.tensor(e.key)
        w1 = edit_tensor(w0, e)
        ax = e.role.resid_axis
        torch.testing.assert_close(w1.norm(dim=ax), w0.norm(dim=ax), rtol=1e-5, atol=1e-7)
        assert along(w1, e.direction, ax).norm() <= 1e-5 * along(w0, e.direction, ax).norm()


def test_biprojection_and_sparsity_shape_the_direction(tiny_model):
    base = ModelDir(tiny_model("glm4_moe"))
    d = _directions(base, seed=7)
    e = plan(_cfg(ablate=[{"layer": 2, "measurement": 3, "sparsity": 0.0}], biprojection=True), base.layout, d)[0]
    assert abs(float(e.direction @ d.harmless_mean[2])) <= 1e-5 * d.harmless_mean[2].norm()  # the ablated layer's harmless mean
    assert float(e.direction.norm()) == pytest.approx(1.0)
    r = d.refusal_dir[3]
    s = sparsify(r, 0.25)  # llm-abliteration: keep int(32 * 0.25) = 8 largest magnitudes
    kept = set(torch.nonzero(s).flatten().tolist())
    assert kept == set(torch.topk(r.abs(), 8).indices.tolist())
    e2 = plan(_cfg(ablate=[{"layer": 2, "measurement": 3, "sparsity": 0.25}]), base.layout, d)[0]
    assert int((e2.direction != 0).sum()) == 8
    assert torch.equal(sparsify(r, 0.0), r) and torch.equal(sparsify(r, 1.0), r)


def test_global_scale_multiplies_and_router_mode_none(tiny_model, tmp_path):
    src = tiny_model("glm4_moe")
    base = ModelDir(src)
    d = _directions(base, seed=8)
    cfg = _cfg(ablate=[{"layer": 1, "measurement": 2, "scale": 1.0}], scale=0.5, components=["attn_out", "router"], router_mode="none")
    m = ablate(src, cfg, tmp_path / "out", d, progress=False)
    assert [x["component"] for x in m["modified"]] == ["attn"]
    x = m["modified"][0]
    assert x["scale"] == 0.5 and x["along_after"] == pytest.approx(0.5 * x["along_before"], rel=1e-4)


# -- the manifest and the llm-abliteration format ----------------------------------------------------


def test_manifest_and_llm_abliteration_yaml_via_cli(tiny_model, tmp_path, capsys):
    src = tiny_model("glm4_moe")
    d = _directions(ModelDir(src), seed=9)
    d.save(tmp_path / "dirs.safetensors")
    (tmp_path / "abl.yml").write_text(
        f"model: {src}\nmeasurements: dirs.safetensors\noutput: {tmp_path / 'out'}\nscale: 1.0\n"
        "ablate:\n  - layer: 2\n    measurement: 3\n    scale: 1.0\n    sparsity: 0.00\n  - layer: 3\n    measurement: 3\n    scale: 1.0\n    sparsity: 0.00\n"
    )
    assert main(["ablate", "--config", str(tmp_path / "abl.yml"), "--quiet"]) == 0
    assert "tensors edited" in capsys.readouterr().out
    m = load_manifest(tmp_path / "out")
    assert m["tool"] == "moe-ablation-audit" and m["base"]["family"] == "glm4_moe" and m["base"]["bytes"] > 0
    assert m["directions_file"] == "directions.safetensors"
    assert torch.equal(Directions.load(tmp_path / "out" / m["directions_file"]).refusal_dir, d.refusal_dir)
    assert AblationConfig.from_dict(m["config"]).to_dict() == m["config"]
    assert [e["layer"] for e in m["config"]["ablate"]] == [2, 3]
    need = {"key", "layer", "component", "projection", "expert", "targets", "direction_index", "scale", "method", "along_before", "along_after"}
    assert m["modified"] and all(need <= set(x) for x in m["modified"])
    assert {"plan_s", "write_s", "total_s"} <= set(m["timings"])
    assert load_manifest(src) is None
    assert ModelDir(tmp_path / "out").layout.family == "glm4_moe"  # OUT is a loadable model directory


def test_config_range_and_defaults():
    c = AblationConfig.from_dict({"ablate": [{"layer": "10-12", "measurement": 11}, {"layer": 14}]})
    assert [(e.layer, e.measurement, e.scale, e.sparsity) for e in c.entries] == [(10, 11, 1.0, 0.0), (11, 11, 1.0, 0.0), (12, 11, 1.0, 0.0), (14, 14, 1.0, 0.0)]
    assert c.components == ("attn_out", "mlp_down", "experts_down", "shared_down") and c.method == "standard"


# -- bad input: clear message, exit 2, nothing written ----------------------------------------------


BAD = [
    ("unknown key", "ablate:\n  - {layer: 1, measurement: 2}\nnormpreserve: true\n", "unknown key"),
    ("unknown entry key", "ablate:\n  - {layer: 1, measurment: 2}\n", "unknown key"),
    ("layer out of range", "ablate:\n  - {layer: 4, measurement: 2}\n", "out of range"),
    ("measurement missing", "ablate:\n  - {layer: 1, measurement: 7}\n", "not in the directions file"),
    ("duplicate layer", "ablate:\n  - {layer: 1}\n  - {layer: '0-2'}\n", "already ablated"),
    ("bad sparsity", "ablate:\n  - {layer: 1, sparsity: 1.5}\n", "sparsity"),
    ("bad component", "ablate:\n  - {layer: 1}\ncomponents: [experts_dwn]\n", 'components[0]: unknown "experts_dwn"; components[0] takes a target group'),
    ("embed without layer 0", "ablate:\n  - {layer: 1}\ncomponents: [embed, attn_out]\n", "layer 0"),
    ("not yaml", "ablate: [layer: 1\n", "not valid YAML"),
    ("no ablate list", "model: x\n", "ablate"),
]


@pytest.mark.parametrize("name,yaml_text,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exit_2_nothing_written(tiny_model, tmp_path, capsys, name, yaml_text, msg):
    src = tiny_model("glm4_moe")
    _directions(ModelDir(src)).save(tmp_path / "d.safetensors")
    (tmp_path / "c.yaml").write_text(yaml_text)
    rc = main(["ablate", str(src), "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "--directions", str(tmp_path / "d.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "d.safetensors"]


def test_wrong_direction_size_and_missing_directions(tiny_model, tmp_path):
    src = tiny_model("glm4_moe")
    cfg = _cfg(ablate=[{"layer": 1}])
    with pytest.raises(AuditError, match="hidden_size is 32"):
        ablate(src, cfg, tmp_path / "out", _directions(ModelDir(src), hidden=16), progress=False)
    with pytest.raises(AuditError, match="measurements"):
        ablate(src, cfg, tmp_path / "out", None, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_out_needs_force_and_out_inside_base_refused(tiny_model, tmp_path):
    src = tiny_model("glm4_moe")
    d = _directions(ModelDir(src))
    cfg = _cfg(ablate=[{"layer": 1}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(AuditError, match="--force"):
        ablate(src, cfg, out, d, progress=False)
    assert (out / "keep.txt").exists()
    # --force replaces only an output of this tool: a folder of the user's is never deleted (issue 15)
    with pytest.raises(AuditError, match="not written by this tool"):
        ablate(src, cfg, out, d, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    ours = tmp_path / "ours"
    ablate(src, cfg, ours, d, progress=False)
    (ours / "stale.txt").write_text("left by a user")
    ablate(src, cfg, ours, d, force=True, progress=False)
    assert not (ours / "stale.txt").exists() and (ours / MANIFEST_NAME).is_file()
    before = _tree_hash(src)
    with pytest.raises(AuditError, match="lies inside the input"):
        ablate(src, cfg, src / "sub", d, progress=False)
    assert _tree_hash(src) == before and not (src / "sub").exists()


def test_load_manifest_rejects_garbage(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(AuditError, match="manifest"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"tool": "other"}))
    with pytest.raises(AuditError, match="not an ablation manifest"):
        load_manifest(tmp_path)


def test_load_config_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ablate:\n  - layer: 3\n    measurement: 4\n    components: [experts_down, experts_gate]\nmethod: norm_preserving\n")
    c = load_config(p)
    assert c.entries[0].components == ("experts_down", "experts_gate") and c.method == "norm_preserving" and c.source == str(p)
    with pytest.raises(AuditError, match="no such config"):
        load_config(tmp_path / "missing.yaml")


def test_quantized_expert_weights_refused_not_skipped():
    from checks.layout import build_layout

    shapes = {"model.embed_tokens.weight": (64, 32), "model.layers.0.self_attn.o_proj.weight": (32, 32),
              "model.layers.0.mlp.experts.down_proj_blocks": (8, 32, 2, 16), "model.layers.0.mlp.experts.down_proj_scales": (8, 32, 2),
              "model.layers.0.mlp.router.weight": (8, 32)}
    layout = build_layout({"model_type": "gpt_oss", "hidden_size": 32, "num_hidden_layers": 1}, shapes)
    with pytest.raises(AuditError, match="dequantize"):
        plan(_cfg(ablate=[{"layer": 0}]), layout)
    assert [e.key for e in plan(_cfg(ablate=[{"layer": 0}], components=["attn_out"]), layout)] == ["model.layers.0.self_attn.o_proj.weight"]


def test_entries_can_name_experts_per_expert_and_fused_alike(tiny_model, tmp_path):
    """`experts: [1, 5]` edits only those routed experts (per-expert keys and fused [E, ...] tensors alike), and two
    entries of one layer may split its components; overlapping entries are still refused."""
    per = tiny_model("glm4_moe")
    fused = _fuse_experts(per, tmp_path / "fused")
    d = _directions(ModelDir(per), seed=4)
    cfg = _cfg(ablate=[{"layer": 2, "measurement": 1, "components": ["experts_down", "experts_gate"], "experts": [1, 5]},
                       {"layer": 2, "measurement": 3, "components": ["attn_out"]}])
    ablate(per, cfg, tmp_path / "a", d, progress=False)
    ablate(fused, cfg, tmp_path / "b", d, progress=False)
    a, b, base = ModelDir(tmp_path / "a"), ModelDir(tmp_path / "b"), ModelDir(per)
    r1 = _unit(d, 1)
    dn = b.tensor("model.layers.2.mlp.experts.down_proj")
    for e in range(8):
        key = f"model.layers.2.mlp.experts.{e}.down_proj.weight"
        torch.testing.assert_close(dn[e], a.tensor(key), rtol=0, atol=1e-6)
        if e in (1, 5):
            assert float(along(a.tensor(key), r1, 0).norm()) < 1e-5 * float(along(base.tensor(key), r1, 0).norm()) + 1e-6
        else:
            assert _bits(a.tensor(key)) == _bits(base.tensor(key))
    assert not torch.equal(a.tensor("model.layers.2.self_attn.o_proj.weight"), base.tensor("model.layers.2.self_attn.o_proj.weight"))
    with pytest.raises(AuditError, match="same components"):
        _cfg(ablate=[{"layer": 2, "experts": [1, 2]}, {"layer": 2, "experts": [2, 3]}])
    _cfg(ablate=[{"layer": 2, "experts": [1, 2], "components": ["experts_down"]}, {"layer": 2, "experts": [3], "components": ["experts_down"]}])
    with pytest.raises(AuditError, match="out of range"):
        ablate(fused, _cfg(ablate=[{"layer": 2, "experts": [9], "components": ["experts_down"]}]), tmp_path / "c", d, progress=False)
