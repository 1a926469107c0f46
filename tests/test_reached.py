"""audit/intent/reached.py: what reached the weights, at the finest grain, as a config that reproduces the ablated model.

The property that matters: the base under the reached config's interventions gives the ablated model's
logits (so a fix simulated on top of it is the fix applied to the real ablation), for our own ablations
(manifest) and for foreign ones (no intent: recovered directions and scales), per-expert and fused.
"""

from __future__ import annotations

import torch

from audit.ablation.ablate import ablate
from audit.intent.config import AblationConfig
from audit.forward.intervene import apply, from_config
from audit.intent.directions import Directions
from audit.model.directory import ModelDir
from audit.model.prompts import format_prompts
from audit.intent.reached import reached
from audit.weights.static_audit import static_audit
from checks.linalg import project_out
from tests.helpers_ablation import rewrite

PROMPTS = ["the cat writes a short poem today.", "a chef builds the bridge.", "our team paints the garden map."]
ATOL = 2e-4


def _dirs(h: int, n: int, seed: int = 5) -> Directions:
    g = torch.Generator().manual_seed(seed)
    return Directions(torch.randn(n, h, generator=g), torch.randn(n, h, generator=g), torch.randn(n, h, generator=g))


def _logits(model, tok):
    batch = tok(format_prompts(tok, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**batch).logits.float()


def _reproduces(base, abl, dirs, config=None):
    rec: dict = {}
    static_audit(abl, base=base, config=config, directions=dirs, record=rec)
    got = reached(rec, dirs)
    md_b, md_a = ModelDir(base), ModelDir(abl)
    tok = md_b.tokenizer()
    m_b, m_a = md_b.load_model(dtype=torch.float32), md_a.load_model(dtype=torch.float32)
    want, ref = _logits(m_a, tok), _logits(m_b, tok)
    assert (want - ref).abs().max() > 50 * ATOL  # the ablation does change the model
    with apply(m_b, from_config(got.config, got.directions)):
        sim = _logits(m_b, tok)
    assert (sim - want).abs().max().item() < ATOL, (sim - want).abs().max().item()
    return got


def test_our_own_ablation_is_reproduced_from_its_manifest(tiny_model, tmp_path):
    base = tiny_model("glm4_moe", initializer_range=0.2)
    dirs = _dirs(32, 5)
    cfg = AblationConfig.from_dict({"components": ["attn_out", "experts_down", "shared_down", "mlp_down"],
                                    "ablate": [{"layer": 0, "measurement": 1}, {"layer": "1-2", "measurement": 2, "scale": 0.6},
                                               {"layer": 3, "measurement": 3, "components": ["experts_down"], "experts": [2, 6]}]})
    ablate(base, cfg, tmp_path / "abl", directions=dirs, progress=False)
    got = _reproduces(base, tmp_path / "abl", dirs)
    by = {(e.layer, e.experts): e for e in got.config.entries}
    assert by[(3, (2, 6))].components == ("experts_down",) and by[(3, (2, 6))].measurement == 3
    assert {by[(l, None)].scale for l in (1, 2)} == {0.6} and not got.extra_rows and not got.unreproduced


def test_a_foreign_partial_ablation_keeps_its_experts_scales_and_direction(tiny_model, tmp_path):
    """Another tool's edit, no manifest, no config: the top expert of each MoE layer only, at scale 0.7, along a direction
    that is no measured index. Reached: those experts, that scale, the direction as an extra row."""
    base = tiny_model("qwen3_moe", initializer_range=0.2)
    dirs = _dirs(32, 4)
    g = torch.Generator().manual_seed(11)
    foreign = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    pick = {0: 3, 1: 5, 2: 0}

    def edit(key, role, t):
        if role.layer in pick and role.component == "experts" and role.projection == "down" and role.expert == pick[role.layer]:
            return project_out(t.float(), foreign, role.resid_axis, 0.7)
        if role.component == "attn" and role.projection == "o" and not role.is_bias:
            return project_out(t.float(), foreign, role.resid_axis, 1.0)
        return None

    abl = rewrite(base, tmp_path / "abl", edit)
    got = _reproduces(base, abl, dirs)
    extra = next(iter(got.extra_rows))
    ex = {e.layer: e for e in got.config.entries if e.experts is not None}
    assert {l: e.experts for l, e in ex.items()} == {l: (x,) for l, x in pick.items()}
    assert all(abs(e.scale - 0.7) < 0.03 and e.measurement == extra for e in ex.values())
    assert {e.layer for e in got.config.entries if "attn_out" in (e.components or ())} == {0, 1, 2}


def test_fused_experts_partial_edit(tiny_model, tmp_path):
    """gpt-oss stores experts fused [E, in, out]: a slice edited for two experts is two experts, not the layer."""
    base = tiny_model("gpt_oss", initializer_range=0.2)
    dirs = _dirs(32, 4)
    r = torch.nn.functional.normalize(dirs.refusal_dir[2], dim=0)

    def edit(key, role, t):
        if role.layer == 1 and role.component == "experts" and role.projection == "down" and not role.is_bias:
            w = t.float().clone()
            for e in (1, 4):
                w[e] = project_out(w[e], r, role.resid_axis - 1, 1.0)
            return w
        return None

    abl = rewrite(base, tmp_path / "abl", edit)
    got = _reproduces(base, abl, dirs)
    assert [(e.layer, e.experts, e.measurement) for e in got.config.entries] == [(1, (1, 4), 2)]
