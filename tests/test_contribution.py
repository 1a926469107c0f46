"""checks/contribution.py: main writers of r, what still writes r after ablation, where r survives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from checks.contribution import contribution_check, writes
from checks.findings import CheckResult

L, E, N = 4, 6, 10


def _fake(scale_shared=0.0, scale_attn=0.0, scale_mlp=0.0, experts=None, resid=None, seed=0):
    """Synthetic harmful-prompt probe summaries with chosen writers of r (layer 0 dense, 1..3 MoE)."""
    rng = np.random.default_rng(seed)
    noise = lambda *s: 1e-4 * rng.standard_normal(s)
    d = {"moe_layers": [1, 2, 3]}
    for s in ("mean", "last"):
        d[f"attn_{s}"] = noise(N, L) + scale_attn
        d[f"shared_{s}"] = noise(N, L) + np.array([0, 1, 1, 1]) * scale_shared
        ex = noise(N, L, E)
        ex[:, 0] = 0
        for (layer, e, v) in experts or []:
            ex[:, layer, e] += v
        d[f"expert_{s}"] = ex
        d[f"mlp_{s}"] = d[f"shared_{s}"] + ex.sum(-1)
        d[f"mlp_{s}"][:, 0] = noise(N) + scale_mlp
        d[f"resid_{s}"] = np.tile(np.array(resid if resid is not None else [0.0, 1.0, 2.0, 3.0, 4.0]), (N, 1)) + noise(N, L + 1)
    return d


def test_shared_expert_is_main_writer():
    before = _fake(scale_shared=1.0, experts=[(2, 1, 0.2)], scale_attn=0.05)
    harmless = _fake(scale_shared=0.1, scale_attn=0.05, seed=1)
    res = contribution_check(before, harmless_before=harmless)
    f = next(f for f in res.findings if f.code == "main-writers")
    assert f.evidence["top"][0]["component"] == "shared_experts"
    assert max(f.evidence["by_kind"], key=f.evidence["by_kind"].get) == "shared_experts"
    assert "expert-writes-before" in res.data["matrices"]
    json.dumps(res.to_dict())  # serializable
    table = res.data["tables"]["writers-before"]  # a table as results.schema.json and the report take it (it was a list)
    assert table["columns"] == ["component", "layer", "expert", "amount"] and table["rows"][0][0] == "shared_experts"


def test_still_writes_and_r_survives():
    before = _fake(scale_shared=1.0, experts=[(2, 4, 0.8)], scale_attn=0.3)
    after = _fake(experts=[(2, 4, 0.8)], resid=[0.0, 0.01, 1.8, 2.9, 0.9], seed=2)  # shared ablated, expert 4 of layer 2 not
    res = contribution_check(before, after)
    sw = [f for f in res.findings if f.code == "still-writes-r"]
    assert [f.evidence["component"] for f in sw] == ["experts"]
    assert sw[0].experts == [[2, 4]] and sw[0].threshold == pytest.approx(0.05 * res.data["reference_scale"], rel=1e-3)
    rs = next(f for f in res.findings if f.code == "r-survives")
    # mechanistic residue is a warning: the behavioural checks say whether it matters (a failed check fails the gate)
    assert rs.layers == [2, 3] and res.status == "warn" and {f.severity for f in sw + [rs]} == {"warn"}
    assert set(res.data["curves"]["resid-r"]["series"]) == {"harmful before", "harmful after"}


def test_clean_after_passes():
    before = _fake(scale_shared=1.0, scale_attn=0.3)
    after = _fake(resid=[0.0, 1e-4, 1e-4, 1e-4, 0.5], seed=3)  # index L (post-norm) is not judged
    res = contribution_check(before, after)
    assert not [f for f in res.findings if f.code in ("still-writes-r", "r-survives")]
    assert res.status == "pass"


def test_writes_drops_mlp_total_on_moe_layers():
    w = writes(_fake(scale_shared=1.0, scale_mlp=0.7))
    assert w["mlp"][1:].tolist() == [0.0, 0.0, 0.0] and w["mlp"][0] == pytest.approx(0.7, abs=1e-3)


def _complete_ablation(model, r, only=None):
    """Project r out of every writer of the residual stream (embed, o_proj, down projections, biases), in memory."""
    from checks.layout import build_layout
    from checks.linalg import project_out

    sd = model.state_dict()
    lay = build_layout(model.config.to_dict(), {k: tuple(v.shape) for k, v in sd.items()})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, role in lay.roles.items():
            if role.io == "writer" and key in params and (only is None or role.component in only):
                params[key].copy_(project_out(params[key].data, r, role.resid_axis).to(params[key].dtype))


@pytest.mark.parametrize("family", ["glm4_moe", "qwen2_moe", "gpt_oss"])
def test_complete_ablation_leaves_no_writer(family, tiny_model, tiny_tok):
    from transformers import AutoModelForCausalLM

    from audit.forward.probe import probe

    path = str(tiny_model(family))
    prompts = ["the cat writes a short poem today.", "a farmer builds the bridge", "our team plans the budget step by step."] * 2
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = probe(model, tiny_tok, prompts, r, batch_size=3)
    _complete_ablation(model, r, only={"experts"})
    partial = probe(model, tiny_tok, prompts, r, batch_size=3)
    _complete_ablation(model, r)
    after = probe(model, tiny_tok, prompts, r, batch_size=3)
    scale = np.abs(before.resid_last).max()
    for k in ("attn_last", "mlp_last", "shared_last", "expert_last", "expert_mean", "resid_mean"):
        assert np.abs(getattr(after, k)[..., : before.n_layers]).max() < 1e-5 * scale, k
    res = contribution_check(before, after, rel_tol=1e-4)
    assert isinstance(res, CheckResult) and not [f for f in res.findings if f.code in ("still-writes-r", "r-survives")]
    # experts-only ablation: attention (and the shared expert where there is one) still write r
    res_p = contribution_check(before, partial, rel_tol=1e-4)
    comps = {f.evidence["component"] for f in res_p.findings if f.code == "still-writes-r"}
    assert "attention" in comps and "experts" not in comps
    if before.has_shared:
        assert "shared_experts" in comps
    assert np.abs(partial.expert_last).max() < 1e-5 * scale


# ---------------------------------------------------------------- on the organism

def test_organism_shared_variant_shared_expert_writes_r(glm_organism):
    from audit.forward.probe import probe

    model, tok, r, _, prompts = glm_organism("shared")
    before, harmless = probe(model, tok, prompts("harmful", 32), r), probe(model, tok, prompts("harmless", 32), r)
    res = contribution_check(before, harmless_before=harmless)
    f = next(f for f in res.findings if f.code == "main-writers")
    assert max(f.evidence["by_kind"], key=f.evidence["by_kind"].get) == "shared_experts", f.evidence["by_kind"]
    assert f.evidence["top"][0]["component"] == "shared_experts"


def test_organism_complete_ablation_no_writer_left(glm_organism):
    from audit.forward.probe import probe

    model, tok, r, _, prompts = glm_organism("base")
    harmful = prompts("harmful", 32)
    before = probe(model, tok, harmful, r)
    _complete_ablation(model, r)
    after = probe(model, tok, harmful, r)
    res = contribution_check(before, after, rel_tol=1e-3)  # stated tolerance: 0.1% of the largest residual projection
    assert not [f for f in res.findings if f.code in ("still-writes-r", "r-survives")], [f.message for f in res.findings]
    assert np.abs(before.resid_last[:, 1:-1]).max() > 100 * np.abs(after.resid_last[:, 1:-1]).max()
