"""Diagnosis names a cause only on evidence, ranks by simulated fixes, and blames nothing on a sound ablation."""

from checks.diagnosis import Cause, Evidence, diagnose, rank_by_simulation

L = 4
PRESENT = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "experts_gate", "experts_up", "mlp_down", "embed")}


def _ev(modified, writes_after, residual_after=(0.0,) * (L + 1), **kw):
    wb = {g: [1.0] * L for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    return dict(modified=modified, present=PRESENT, writes_before=wb, writes_after=writes_after, residual_before=(1.0,) * (L + 1),
                residual_after=tuple(residual_after), moe_layers=(1, 2, 3), **{"projected": True, **kw})


def run(ev: dict) -> dict:
    return diagnose(Evidence(**ev))


def _zeros():
    return {g: [0.0] * L for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}


def test_sound_ablation_blames_nothing():
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    out = run(_ev(full, _zeros()))
    assert out["causes"] == []
    assert any("gate/up" in nb["component"] for nb in out["not_blamed"])  # untouched but irrelevant: said so


def test_shared_expert_left_out_is_named_with_fix():
    mod = {g: list(range(L)) for g in ("attn_out", "experts_down", "mlp_down")}
    wa = _zeros()
    wa["shared_down"] = [0.0, 0.8, 0.9, 0.7]
    out = run(_ev(mod, wa, residual_after=[0, 0.5, 0.6, 0.7, 0.8]))
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
    out = run(_ev(mod, wa))
    top = out["causes"][0]
    assert top.id == "layer-coverage" and 3 in top.fix["patch"]["add_layers"]


def test_untouched_component_that_writes_nothing_is_not_blamed():
    mod = {g: list(range(L)) for g in ("shared_down", "experts_down", "mlp_down")}
    out = run(_ev(mod, _zeros()))
    assert not any(c.id == "attention-not-ablated" for c in out["causes"])
    assert any(nb["component"].startswith("attention") for nb in out["not_blamed"])


def test_direction_mismatch_and_findings():
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    ev = _ev(full, _zeros(), cos_ablated_separating=0.3, separating_index=2, ablated_index=0,
             weight_findings=({"code": "unintended-modified", "message": "layers 10-19 changed by an entry for layer 1", "layers": [10, 11]},),
             intent_stated=True)
    ids = [c.id for c in run(ev)["causes"]]
    assert ids[0] == "direction-mismatch" and "unintended-modification" in ids


def test_direction_from_another_separating_index_is_not_blamed():
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    ev = _ev(full, _zeros(), cos_ablated_separating=0.4, separating_index=1, ablated_index=2, quality={0: 0.0, 1: 1.27, 2: 1.21, 3: 1.0, 4: 0.5})
    out = run(ev)
    assert not any(c.id == "direction-mismatch" for c in out["causes"])
    assert any("separates almost as well" in nb["reason"] for nb in out["not_blamed"])
    ev["quality"] = {0: 0.0, 1: 1.27, 2: 0.2, 3: 1.0, 4: 0.5}
    assert any(c.id == "direction-mismatch" for c in run(ev)["causes"])
    ev["quality"], ev["ablated_index"] = {0: 0.0, 1: 1.27, 2: 1.2, 3: 1.0, 4: 1.2}, 4  # the final normed output is never a separating index
    assert any(c.id == "direction-mismatch" for c in run(ev)["causes"])
    ev["damaged"] = "KL 2.7 nats"
    dmg = next(c for c in run(ev)["causes"] if c.id == "model-damaged")
    assert dmg.fix["patch"] == {"measurement": 1}


def test_bypass_test_decides_the_direction():
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    q = {0: 0.0, 1: 0.46, 2: 0.93, 3: 0.63, 4: 0.57}
    ev = _ev(full, _zeros(), cos_ablated_separating=0.95, separating_index=3, ablated_index=1, quality=q, bypass={1: 0.6, 2: 0.9, 3: 0.0})
    dm = next(c for c in run(ev)["causes"] if c.id == "direction-mismatch")
    assert dm.confidence == 0.85 and dm.fix["patch"] == {"measurement": 3} and any(e["source"] == "bypass" for e in dm.evidence)
    ev = _ev(full, _zeros(), cos_ablated_separating=0.3, separating_index=3, ablated_index=1, quality=q, bypass={1: 0.02, 3: 0.0})
    out = run(ev)  # low cosine, but the direction used removes refusal: not a cause
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


# -- issue 25: evidence cites a measurement, "unexplained" instead of a guess, applicability ------------------------------


def test_every_cause_cites_the_measurement_it_comes_from():
    """Whatever the evidence, each cause a rule names carries evidence, and each item names a measurement (cause.SOURCES)."""

    from checks.diagnosis.cause import SOURCES

    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    wa = _zeros()
    wa["attn_out"] = [0.5] * L
    variants = [
        _ev({g: [1, 2] for g in ("attn_out", "shared_down", "experts_down")}, wa),
        _ev({g: ls for g, ls in full.items() if g != "attn_out"}, wa, residual_after=(0.9,) * (L + 1)),
        _ev(full, _zeros(), cos_ablated_separating=0.2, separating_index=2, ablated_index=1, quality={0: 0, 1: 0.1, 2: 1.0, 3: 0.5, 4: 0.1}),
        _ev(full, _zeros(), reached_scales={1: [0.3]}, weight_findings=({"code": "weak-scale", "message": "reduced", "value": 0.3},)),
        _ev(full, _zeros(), reached_scales={2: [3.0]}, damaged="KL 3 nats", partial_experts={1: [0]}, refusal_experts=((1, 2), (1, 3))),
        _ev({}, _zeros(), weight_findings=({"code": "no-change", "message": "nothing changed"},), projected=False),
        _ev(full, _zeros(), suppressed={"experts": [[1, 2]], "strength": 0.5}, suppress_strengths=(0.5, 1.0), refusal_experts=((1, 2),)),
    ]
    named = 0
    for ev in variants:
        for c in run(ev)["causes"]:
            named += 1
            assert c.evidence, c.id
            assert all(e["source"] in SOURCES and e["text"] for e in c.evidence), (c.id, c.evidence)
            assert c.title, c.id
    assert named >= 8


def test_no_cause_is_invented_when_no_rule_finds_one():
    """A failed gate with nothing any rule can name is "unexplained", with what failed, what was tried and what to try next."""
    from checks.diagnosis import conclude

    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    out = run(_ev(full, _zeros(), refusal_after=0.9))
    assert out["causes"] == []
    gate = {"passed": False, "thresholds": [{"name": "max_refusal_after", "passed": False, "message": "refusal 90%, limit <= 0.1"}]}
    bypass = {"3": {"rate": 0.85, "kl": 0.1, "method": "generation"}, "2": {"rate": 0.9, "kl": 0.1}}
    c = conclude(False, out["causes"], gate, bypass, simulated=True)
    assert c["status"] == "unexplained" and c["cause"] is None and c["measured"] == ["refusal 90%, limit <= 0.1"]
    assert len(c["tried"]) == 2 and "no measured direction removes refusal" in c["next"][0]
    from audit.pipeline.summary import headline

    h = headline("fail", {"before": {"rate": 1.0, "n": 10}, "after": {"rate": 0.9, "n": 10}}, c)
    assert "No cause proven" in h and "likely" not in h.lower()
    demoted = Cause("attention-not-ablated", 0.2, "a", evidence=[{"source": "weights", "text": "x"}], demoted=True, title="t")
    assert conclude(False, [demoted], gate, bypass, simulated=True)["status"] == "unexplained"
    ok = Cause("attention-not-ablated", 0.9, "a", evidence=[{"source": "weights", "text": "x"}], title="Attention", simulated={"reaches_target": True})
    c = conclude(False, [ok], gate)
    assert c == {"status": "explained", "cause": "attention-not-ablated", "proven": True, "statement": "Attention (its fix, simulated, removes refusal)"}
    assert conclude(True, [], gate)["status"] == "not-needed"


def test_damage_named_on_evidence_does_not_stand_for_the_refusal_that_stayed():
    """Refusal stayed and the ablation damaged the model (the learned organism's cases): damage is named as the fact it
    is, and the refusal part is marked unexplained with what was tried, not said to be lowered by damage's fix."""
    from checks.diagnosis import conclude

    gate = {"passed": False, "thresholds": [{"name": "max_refusal_after", "passed": False, "message": "refusal 88%, limit <= 0.1"},
                                            {"name": "max_kl", "passed": True}]}
    damage = Cause("model-damaged", 0.9, "KL 2 nats", evidence=[{"source": "damage", "text": "KL 2 nats"}], title="The ablation damaged the model",
                   explains_refusal=False, simulated={"refusal_rate": 0.81, "reaches_target": False})
    demoted = Cause("layer-coverage", 0.2, "a", evidence=[{"source": "weights", "text": "x"}], demoted=True, title="t",
                    search=[{"label": "every layer", "refusal_rate": 0.85, "kl": 0.3}])
    bypass = {"24": {"rate": 0.67, "kl": 0.3, "method": "generation"}}
    c = conclude(False, [damage, demoted], gate, bypass, simulated=True)
    assert c["status"] == "explained" and c["cause"] == "model-damaged" and not c["proven"]
    assert c["refusal_unexplained"] and "lowers refusal" not in c["statement"] and "not explained" in c["statement"]
    assert [r["what"].split(":")[0] for r in c["tried"]][-1] == "layer-coverage" and "no measured direction" in c["next"][0]
    # the same damage with refusal removed: nothing is left unexplained
    gone = {"passed": False, "thresholds": [{"name": "max_kl", "passed": False, "message": "KL 2"}]}
    assert "refusal_unexplained" not in conclude(False, [damage], gone, bypass, simulated=True)
    # a cause that explains refusal still standing: the refusal part is that cause's, not unexplained
    live = Cause("attention-not-ablated", 0.5, "a", evidence=[{"source": "weights", "text": "x"}], title="Attention")
    assert "refusal_unexplained" not in conclude(False, [damage, live], gate, bypass, simulated=True)


def test_once_refusal_is_gone_only_soundness_causes_remain():
    """An overshoot that removed refusal without damage is not a cause: its r, flipped, is a warning of the projection check."""
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    out = run(_ev(full, _zeros(), reached_scales={l: [3.0] for l in range(L)}, refusal_after=0.0))
    assert out["causes"] == [] and any("overshoot" in nb["reason"] for nb in out["not_blamed"])
    out = run(_ev(full, _zeros(), reached_scales={l: [3.0] for l in range(L)}, refusal_after=0.0, damaged="KL 2.1 nats"))
    assert [c.id for c in out["causes"]] == ["model-damaged"] and out["causes"][0].fix["patch"] == {"scale": 1.0}


def test_an_unmeasured_scale_decides_nothing():
    """reached.py reports an edit whose scale it could not measure; the diagnosis then names neither weak-scale nor overshoot."""
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    out = run(_ev(full, _zeros(), unmeasured_scales=3, weight_findings=({"code": "weak-scale", "message": "reduced", "value": 0.3},)))
    assert not {"weak-scale", "scale-overshoot"} & {c.id for c in out["causes"]}


def test_suppression_only_ablation_is_not_blamed_on_left_out_groups():
    """An ablation that only suppressed experts at the router projected nothing: no group was "left out" of a projection that did
    not happen, so only the suppression's own cause (weak-scale) is named (issue 21's open note)."""
    ev = _ev({"router": [1, 2]}, {g: [1.0] * L for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}, projected=False,
             suppressed={"experts": [[1, 2]], "strength": 0.5}, suppress_strengths=(0.5, 1.0), refusal_experts=((1, 2),))
    assert [c.id for c in run(ev)["causes"]] == ["weak-scale"]


def test_evidence_is_built_from_check_results_alone():
    from checks.diagnosis import build_evidence

    checks = {
        "weights": {"findings": [{"code": "weak-scale", "message": "m"}], "data": {"modified": {"attn_out": [0, 1], "router": []}, "present": {"attn_out": [0, 1]},
                    "intended": {"attn_out": [0, 1]}, "intent": {"source": "inferred"}}},
        "contribution": {"findings": [], "data": {"group_writes": {"before": {"attn_out": [1.0, 1.0]}, "after": {"attn_out": [0.0, 0.5]},
                                                                   "residual_before": [0, 1, 2], "residual_after": [0, 0, 1]}}},
        "routing": {"findings": [{"code": "refusal-experts", "experts": [[1, 3]]}, {"code": "routing-compensation"}]},
        "refusal": {"findings": [], "data": {"after": {"rate": None, "n": 10}, "before": {"rate": 1.0, "n": 10}},
                    "nonfinite": {"data.after.rate": "nan"}},
        "damage": {"findings": [{"code": "degenerate", "severity": "fail", "message": "all degenerate"}], "data": {"degenerate": {"rate": 1.0}}},
    }
    reached = {"entries": [{"layer": 0, "measurement": 2, "scale": 0.5, "components": ["experts_down"], "experts": [1]}],
               "projected": True, "suppressed": None, "unmeasured_scale": ["k"]}
    ev = build_evidence(checks, reached, {"family": "glm4_moe", "num_layers": 2, "moe_layers": [1], "n_routed_experts": 4},
                        {"separating_index": 1, "ablated_index": 2, "cos_ablated_separating": 0.5, "quality": [{"index": 1, "quality": 0.3}]},
                        limits={"max_refusal_after": 0.2, "max_kl": None})
    assert ev.modified == {"attn_out": [0, 1]} and not ev.intent_stated and ev.intended == {}
    assert ev.writes_after == {"attn_out": [0.0, 0.5]} and ev.residual_after == (0, 0, 1)
    assert ev.refusal_experts == ((1, 3),) and ev.compensation and not ev.router_modified
    assert ev.partial_experts == {0: [1]} and ev.reached_scales == {0: [0.5]} and ev.unmeasured_scales == 1
    assert ev.refusal_after != ev.refusal_after and not ev.refusal_gone  # NaN stays NaN: never "gone"
    assert ev.damaged == "all degenerate" and ev.damage_first and ev.refusal_target == 0.2 and ev.max_kl == float("inf")
    assert ev.suppress_strengths and ev.quality == {1: 0.3}


def test_routing_compensation_blames_experts_only_when_they_can_still_write_r():
    """Harmful prompts moved to other refusal-associated experts after the ablation: a cause only if those experts can still write r.
    With every routed expert of every layer ablated and writing no r, the move is a symptom (found on the out-of-sample gpt_oss
    family, where the direction was the cause; issue 25)."""
    full = {g: list(range(L)) for g in ("attn_out", "shared_down", "experts_down", "mlp_down")}
    ev = _ev(full, _zeros(), refusal_experts=((1, 2), (2, 3)), compensation=True)
    assert not any(c.id == "redundant-refusal-experts" for c in run(ev)["causes"])
    part = {**full, "experts_down": [0, 3]}  # the refusal experts' layers 1, 2 left out
    assert any(c.id == "redundant-refusal-experts" for c in run(_ev(part, _zeros(), refusal_experts=((1, 2), (2, 3)), compensation=True))["causes"])
    wa = _zeros()
    wa["experts_down"] = [0.0, 0.5, 0.0, 0.0]  # ablated, but still writing r at layer 1
    assert any(c.id == "redundant-refusal-experts" for c in run(_ev(full, wa, refusal_experts=((1, 2), (2, 3)), compensation=True))["causes"])
