"""checks/routing.py: refusal-associated experts with FDR control, compensation, ineffective router."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from checks.routing import (
    benjamini_hochberg,
    js_divergence,
    routing_check,
    selection_freq,
)

L, E, K, T = 3, 8, 2, 20


def _sample(n, probs, seed):
    """Synthetic probe summaries: each of n prompts has T tokens choosing K experts per layer from probs [L, E]."""
    rng = np.random.default_rng(seed)
    cnt = np.zeros((n, L, E), np.float32)
    for p in range(n):
        for layer in range(L):
            for _ in range(T):
                cnt[p, layer, rng.choice(E, size=K, replace=False, p=probs[layer])] += 1
    return {"sel_count": cnt, "tokens_per_prompt": np.full(n, T, np.float32), "moe_layers": list(range(L))}


def _probs(boost=None):
    p = np.full((L, E), 1.0)
    for (layer, e, f) in boost or []:
        p[layer, e] = f
    return p / p.sum(1, keepdims=True)


def test_bh_matches_scipy():
    p = np.random.default_rng(0).uniform(size=200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)
    assert benjamini_hochberg(np.array([np.nan, 0.01]))[0] == 1.0


def test_js_divergence():
    assert js_divergence([1, 0], [1, 0]) == 0.0
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert 0 < js_divergence([0.6, 0.4], [0.4, 0.6]) < 0.1


def test_planted_refusal_experts_found_and_nulls_controlled():
    harmful = _sample(40, _probs([(1, 3, 6.0), (2, 5, 6.0)]), 1)
    harmless = _sample(40, _probs(), 2)
    res = routing_check(harmful, harmless, modified_experts=[[1, 3]])
    f = next(f for f in res.findings if f.code == "refusal-experts")
    found = {tuple(x) for x in f.experts}
    assert {(1, 3), (2, 5)} <= found
    assert len(found - {(1, 3), (2, 5)}) <= 1  # FDR 5%: at most a stray false discovery
    rows = {(r["layer"], r["expert"]): r for r in f.evidence["experts"]}
    assert rows[(1, 3)]["ablated"] is True and rows[(2, 5)]["ablated"] is False
    assert rows[(1, 3)]["q"] < 0.05 and rows[(1, 3)]["risk_difference"] > 0.1
    assert f.severity == "warn" and [2, 5] in f.evidence["not_ablated"]
    table = res.data["tables"]["refusal-experts"]  # the report renders it: an object with columns and rows
    assert table["columns"][:2] == ["layer", "expert"] and len(table["rows"]) == len(res.data["refusal_experts"]) == len(found)
    from reports.html import _table_view

    assert len(_table_view(table)["rows"]) == len(found)
    m = res.data["matrices"]["routing-rd"]
    assert len(m["values"]) == L and len(m["values"][0]) == E and m["rows"][1] == "layer 1"
    assert res.data["curves"]["routing-js"]["series"]["harmful vs harmless (before)"][1] > 0


def test_no_association_under_null():
    res = routing_check(_sample(30, _probs(), 3), _sample(30, _probs(), 4))
    assert not any(f.code == "refusal-experts" for f in res.findings)
    assert res.status == "pass"


def test_tokens_are_not_the_unit():
    """One prompt with many tokens on an expert must not make it significant: 1 prompt of 40 differs."""
    harmful, harmless = _sample(40, _probs(), 5), _sample(40, _probs(), 6)
    harmful["sel_count"][0, 1, 3] = T  # every token of one prompt picks expert 3
    res = routing_check(harmful, harmless)
    assert not any(f.code == "refusal-experts" for f in res.findings)


def test_compensation_and_router_ineffective():
    hb = _sample(40, _probs([(1, 3, 5.0), (1, 6, 3.0)]), 7)
    hl = _sample(40, _probs(), 8)
    ha = _sample(40, _probs([(1, 3, 1.0), (1, 6, 9.0)]), 9)  # left expert 3, moved to expert 6
    res = routing_check(hb, hl, harmful_after=ha, router_modified=[1])
    codes = {f.code for f in res.findings}
    assert "routing-compensation" in codes and "router-ineffective" not in codes
    comp = next(f for f in res.findings if f.code == "routing-compensation")
    assert [1, 6] in comp.experts and any(d["expert"] == 3 for d in comp.evidence["decreased"])
    assert "routing-shift" in res.data["matrices"]
    same = routing_check(hb, hl, harmful_after=hb, router_modified=True)
    ri = next(f for f in same.findings if f.code == "router-ineffective")
    assert ri.layers == [0, 1, 2] and [1, 3] in ri.experts
    unmodified = routing_check(hb, hl, harmful_after=hb, router_modified=None)
    assert not any(f.code == "router-ineffective" for f in unmodified.findings)


def test_dense_and_probe_object():
    dense = {"sel_count": np.zeros((4, 3, 0)), "tokens_per_prompt": np.full(4, 5.0), "moe_layers": []}
    assert routing_check(dense, dense).status == "skip"

    class P:  # a ProbeResult-like object
        sel_count = np.ones((2, 1, 4))
        tokens_per_prompt = np.array([2.0, 4.0])
        moe_layers = [0]

    np.testing.assert_allclose(selection_freq(P())[:, 0, 0], [0.5, 0.25])


# ---------------------------------------------------------------- on the organism (planted refusal experts)

def test_organism_experts_variant_refusal_experts_found(glm_organism):
    from audit.forward.probe import probe

    model, tok, r, meta, prompts = glm_organism("experts")
    harmful, harmless = probe(model, tok, prompts("harmful", 48), r), probe(model, tok, prompts("harmless", 48), r)
    planted = {(int(layer), int(e)) for layer, es in meta["carriers"]["experts"].items() for e in es}
    res = routing_check(harmful, harmless, position="last")
    f = next(f for f in res.findings if f.code == "refusal-experts")
    found = {tuple(x) for x in f.experts}
    assert len(planted & found) >= len(planted) // 2, (planted, found)  # most planted experts, FDR-controlled
    assert len(found - planted) <= max(1, len(found) // 10)
    assert all(r["q"] < 0.05 for r in f.evidence["experts"])


def test_no_significant_change_is_not_proof_of_no_change():
    """router-ineffective needs an equivalence test: routing shown unchanged within +-EQUIV_MARGIN. With few prompts a real shift can
    go unnoticed by the significance test; that is "inconclusive", never evidence that the router edit did nothing (issue 25)."""
    hb = _sample(6, _probs([(1, 3, 5.0)]), 7)
    hl = _sample(6, _probs(), 8)
    ha = _sample(6, _probs([(1, 3, 2.5)]), 11)  # a real shift of expert 3, too small for 6 prompts to make significant
    res = routing_check(hb, hl, harmful_after=ha, router_modified=[1])
    codes = {f.code for f in res.findings}
    assert "router-ineffective" not in codes and "router-change-inconclusive" in codes
    same = routing_check(hb, hl, harmful_after=hb, router_modified=[1])  # nothing moved at all: equivalence shown even with 6 prompts
    assert "router-ineffective" in {f.code for f in same.findings}
