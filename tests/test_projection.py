"""Shares of r left per tensor and expert: ~0 where ablated, ~1 where not, rounding told apart from weak scale."""

from __future__ import annotations

import pytest
import torch

from audit.intent.directions import Directions
from audit.model.directory import ModelDir
from audit.weights.static_audit import static_audit
from checks.linalg import project_out
from audit.weights.pair_stats import pair_stats
from checks.projection import DirStats
from checks.projection import classify
from tests.helpers_ablation import edit_fn, rewrite

WRITERS = {"attn_out", "mlp_down", "experts_down", "shared_down"}


def _dirs(n, h, seed=0, path=None):
    g = torch.Generator().manual_seed(seed)
    refuse = torch.randn(n, h, generator=g)
    harmless = torch.randn(n, h, generator=g) * 3
    d = Directions(refuse, harmless + refuse, harmless)
    if path is not None:
        d.save(path)
    return d


def _cfg(path, layers, measurement, meas_file, scale=1.0, components=WRITERS):
    path.write_text(f"measurements: {meas_file}\ncomponents: [{', '.join(sorted(components))}]\nablate:\n"
                    + "".join(f"  - {{layer: {l}, measurement: {measurement}, scale: {scale}}}\n" for l in layers))
    return path


@pytest.fixture(scope="module")
def glm(tiny_model):
    return tiny_model("glm4_moe", num_hidden_layers=5)


def test_writer_shares_zero_where_ablated_one_where_not(glm, tmp_path):
    lay = ModelDir(glm).layout
    d = _dirs(lay.num_layers + 1, lay.hidden_size, path=tmp_path / "dirs.safetensors")
    r = d.refusal_dir[3] / d.refusal_dir[3].norm()
    cfg = _cfg(tmp_path / "c.yaml", [1, 2, 3, 4], 3, tmp_path / "dirs.safetensors")
    # the tool forgot shared experts in layers 3-4 and everything in layer 4's attention
    fn = edit_fn(r, WRITERS, {1, 2, 3, 4})
    out = rewrite(glm, tmp_path / "abl", lambda k, role, t: None if (role.layer in (3, 4) and role.component == "shared_experts") else fn(k, role, t))
    res = static_audit(out, base=glm, config=cfg)
    p = res["projection"]
    m = p.data["matrices"]["ablated:share_left_by_group"]
    col = {c: i for i, c in enumerate(m["cols"])}
    for l in (1, 2):
        for g in ("attn_out", "experts_down", "shared_down"):
            assert m["values"][l][col[g]] < 1e-4, (l, g)
    for l in (3, 4):
        assert m["values"][l][col["shared_down"]] == pytest.approx(1.0)
        assert m["values"][l][col["experts_down"]] < 1e-4
    assert m["values"][1][col["router"]] == pytest.approx(1.0)  # not in the config: untouched, still projected
    assert "experts_gate" not in col  # untouched readers other than the router are not projected (speed)
    ex = p.data["matrices"]["ablated:experts_down:share_left"]
    assert len(ex["cols"]) == lay.n_routed_experts and all(v < 1e-4 for row in ex["values"] for v in row)
    wl = [f for f in p.findings if f.code == "writer-left"]
    assert len(wl) == 1 and wl[0].evidence["targets"] == ["shared_down"] and wl[0].layers == [3, 4]
    # the router's per-expert logit sensitivity to r, before and after, layer x expert
    rs = p.data["matrices"]["ablated:router:sensitivity_before"]
    assert len(rs["cols"]) == lay.n_routed_experts and any(abs(v) > 0 for v in rs["values"][0])
    # the local (measured per-layer) direction is reported too, with the cosines
    assert "local:share_left_by_group" in p.data["matrices"]
    assert p.data["tables"]["direction_cosines"]["rows"]
    assert p.data["writes_before"]["shared_down"][3] > 0


def test_bf16_rounding_weak_scale_and_reflection_classified(tiny_model, tmp_path):
    base = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    lay = ModelDir(base).layout
    d = _dirs(lay.num_layers + 1, lay.hidden_size, path=tmp_path / "dirs.safetensors")
    r = d.refusal_dir[2] / d.refusal_dir[2].norm()
    # a base whose layer-1 o_proj barely writes r: what bf16 rounding leaves after removal is then most of it
    weak_base = rewrite(base, tmp_path / "weakbase", lambda k, role, t: (project_out(t.float(), r, 0) + 2e-4 * torch.outer(r, torch.ones(t.shape[1])))
                        if k.endswith("layers.1.self_attn.o_proj.weight") else None)
    cfg = _cfg(tmp_path / "c.yaml", [0, 1, 2], 2, tmp_path / "dirs.safetensors", components={"attn_out", "experts_down"})
    fn = edit_fn(r, {"attn_out", "experts_down"}, {0, 1})
    half = edit_fn(r, {"attn_out", "experts_down"}, {2}, scale=0.5)
    out = rewrite(weak_base, tmp_path / "abl", lambda k, role, t: fn(k, role, t) if role.layer in (0, 1) else half(k, role, t))
    res = static_audit(out, base=weak_base, config=cfg)
    p = res["projection"]
    codes = {f.code: f for f in p.findings}
    assert "precision-loss" in codes and codes["precision-loss"].layers == [1]
    assert any(k.endswith("layers.1.self_attn.o_proj.weight") for k in codes["precision-loss"].evidence["keys"])
    assert "weak-scale" in codes and codes["weak-scale"].value == pytest.approx(0.5, abs=0.02) and codes["weak-scale"].layers == [2]
    c = p.data["classes"]["ablated"]
    assert c["rounding"] == 1 and c["removed"] >= 9  # bf16 ablation of ordinary tensors: removed, not "rounding"


def test_classify_units():
    assert classify(DirStats(1.0, 0.0, 0.0, 0.0), True) == "removed"
    assert classify(DirStats(1.0, 1.0, 1.0, 0.0), False) == "not-ablated"
    assert classify(DirStats(1.0, 0.5, 0.5, 0.01), True) == "weak-scale"
    assert classify(DirStats(1.0, 0.3, 0.0, 0.2), True) == "rounding"
    assert classify(DirStats(1.0, 1.0, -1.0, 0.0), True) == "reflected"
    assert classify(DirStats(0.0, 0.0, 0.0, 0.0), True) == "no-signal"


def test_pair_stats_reader_and_fused_expert_shares():
    torch.manual_seed(1)
    r = torch.randn(16)
    r /= r.norm()
    up = torch.randn(4, 24, 16)  # [E, out, in]: reads on axis 2
    up1 = up.clone()
    up1[2] = project_out(up[2], r, 1)
    st = pair_stats(up, up1, 2, {"a": r}, expert_axis=0, n_experts=4)
    pe = st.dirs["a"].per_expert
    left = [a / b for a, b in zip(pe["after"], pe["before"])]
    assert left[2] < 1e-5 and all(abs(x - 1) < 1e-6 for i, x in enumerate(left) if i != 2)
    assert st.expert_rel_change[2] > 0 and st.expert_rel_change[0] == 0
