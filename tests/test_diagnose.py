"""Diagnosis names a cause only on evidence, ranks by simulated fixes, and blames nothing on a sound ablation."""

from checks.diagnose import Cause, diagnose, rank_by_simulation

L = 4
PRESENT = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "experts_gate", "experts_up", "mlp_down", "embed")}


def _ev(modified, writes_after, residual_after=(0.0,) * (L + 1), **kw):
    wb = {g: [1.0] * L for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    return {"modified": modified, "present": PRESENT, "writes_before": wb, "writes_after": writes_after,
            "residual_before": [1.0] * (L + 1), "residual_after": list(residual_after), "moe_layers": [1, 2, 3], **kw}


def _zeros():
    return {g: [0.0] * L for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}


def test_sound_ablation_blames_nothing():
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    out = diagnose(_ev(full, _zeros()))
    assert out["causes"] == []
    assert any("gate/up" in nb["component"] for nb in out["not_blamed"])  # untouched but irrelevant: said so


def test_shared_expert_left_out_is_named_with_fix():
    mod = {g: list(range(L)) for g in ("attn_out", "experts_down", "mlp_down")}
    wa = _zeros()
    wa["shared_down"] = [0.0, 0.8, 0.9, 0.7]
    out = diagnose(_ev(mod, wa, residual_after=[0, 0.5, 0.6, 0.7, 0.8]))
    top = out["causes"][0]
    assert top.id == "shared-experts-not-ablated" and top.confidence > 0.67
    assert top.fix["patch"]["add_components"] == ["shared_down"]
    ids = [c.id for c in out["causes"]]
    assert "expert-inputs-not-ablated" in ids  # r still reaches the experts: a candidate, ranked lower
    assert ids.index("expert-inputs-not-ablated") > 0


def test_narrow_band_is_layer_coverage():
    band = [1, 2]
    mod = {g: band for g in ("attn_out", "shared_down", "experts_down")}
    wa = _zeros()
    for g in ("attn_out", "shared_down", "experts_down"):
        wa[g][3] = 0.9
    out = diagnose(_ev(mod, wa))
    top = out["causes"][0]
    assert top.id == "layer-coverage" and 3 in top.fix["patch"]["add_layers"]


def test_untouched_component_that_writes_nothing_is_not_blamed():
    mod = {g: list(range(L)) for g in ("shared_down", "experts_down", "mlp_down")}
    out = diagnose(_ev(mod, _zeros()))
    assert not any(c.id == "attention-not-ablated" for c in out["causes"])
    assert any(nb["component"].startswith("attention") for nb in out["not_blamed"])


def test_direction_mismatch_and_findings():
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    ev = _ev(full, _zeros(), direction_cos_separating=0.3, separating_index=2, ablated_index=0,
             findings=[{"code": "unintended-modified", "message": "layers 10-19 changed by an entry for layer 1", "layers": [10, 11]}])
    ids = [c.id for c in diagnose(ev)["causes"]]
    assert ids[0] == "direction-mismatch" and "unintended-modification" in ids


def test_direction_from_another_separating_index_is_not_blamed():
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    ev = _ev(full, _zeros(), direction_cos_separating=0.4, separating_index=1, ablated_index=2, quality={0: 0.0, 1: 1.27, 2: 1.21, 3: 1.0, 4: 0.5})
    out = diagnose(ev)
    assert not any(c.id == "direction-mismatch" for c in out["causes"])
    assert any("separates almost as well" in nb["reason"] for nb in out["not_blamed"])
    ev["quality"] = {0: 0.0, 1: 1.27, 2: 0.2, 3: 1.0, 4: 0.5}
    assert any(c.id == "direction-mismatch" for c in diagnose(ev)["causes"])
    ev["quality"], ev["ablated_index"] = {0: 0.0, 1: 1.27, 2: 1.2, 3: 1.0, 4: 1.2}, 4  # the final normed output is never a separating index
    assert any(c.id == "direction-mismatch" for c in diagnose(ev)["causes"])
    ev["damaged"] = "KL 2.7 nats"
    dmg = next(c for c in diagnose(ev)["causes"] if c.id == "model-damaged")
    assert dmg.fix["patch"] == {"measurement": 1}


def test_bypass_test_decides_the_direction():
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    q = {0: 0.0, 1: 0.46, 2: 0.93, 3: 0.63, 4: 0.57}
    ev = _ev(full, _zeros(), direction_cos_separating=0.95, separating_index=3, ablated_index=1, quality=q, bypass={1: 0.6, 2: 0.9, 3: 0.0})
    dm = next(c for c in diagnose(ev)["causes"] if c.id == "direction-mismatch")
    assert dm.confidence == 0.85 and dm.fix["patch"] == {"measurement": 3} and any("bypass" in e for e in dm.evidence)
    ev = _ev(full, _zeros(), direction_cos_separating=0.3, separating_index=3, ablated_index=1, quality=q, bypass={1: 0.02, 3: 0.0})
    out = diagnose(ev)  # low cosine, but the direction used removes refusal: not a cause
    assert not any(c.id == "direction-mismatch" for c in out["causes"]) and any("removes refusal" in nb["reason"] for nb in out["not_blamed"])


def test_rank_prefers_confident_evidence_among_fixes_that_work():
    a = Cause("direction-mismatch", 0.6, "a")
    b = Cause("routed-experts-not-ablated", 0.95, "b")
    a.simulated = {"refusal_rate": 0.0, "baseline": 1.0, "kl": 0.0}
    b.simulated = {"refusal_rate": 0.02, "baseline": 1.0, "kl": 0.01}
    assert [c.id for c in rank_by_simulation([a, b])] == ["routed-experts-not-ablated", "direction-mismatch"]


def test_rank_by_simulation_demotes_fixes_that_change_nothing():
    a = Cause("expert-inputs-not-ablated", 0.6, "a")
    b = Cause("layer-coverage", 0.5, "b")
    a.simulated = {"refusal_rate": 0.95, "baseline": 0.97}
    b.simulated = {"refusal_rate": 0.02, "baseline": 0.97}
    ranked = rank_by_simulation([a, b])
    assert [c.id for c in ranked] == ["layer-coverage", "expert-inputs-not-ablated"]
    assert ranked[1].demoted and "does not remove refusal" in ranked[1].demoted_reason
    assert ranked[0].confidence >= 0.9
