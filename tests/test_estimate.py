"""First-token refusal scores, their calibration, early-stopped estimates, and the organism check."""

from __future__ import annotations

import pytest
import torch

from audit.forward.estimate import (
    Calibration,
    calibrate,
    estimate_many,
    estimate_refusal,
    first_token_scores,
    refusal_token_ids,
)
from audit.forward.intervene import Intervention
from audit.model.directory import ModelDir
from audit.model.prompts import format_prompts
from audit.organisms.tiny import tiny_corpus
from checks.errors import AuditError

PROMPTS = tiny_corpus(48)


@pytest.fixture(scope="module")
def glm(tiny_model):
    md = ModelDir(tiny_model("glm4_moe", initializer_range=0.2))
    return md.load_model(dtype=torch.float32), md.tokenizer()


def test_refusal_token_ids_are_first_answer_tokens(glm):
    _, tok = glm
    ids = refusal_token_ids(tok, ("I'm sorry", "Sorry", "As an AI"), exclude=())
    assert ids == sorted(set(ids)) and ids
    cue = format_prompts(tok, ["x"])[0]
    base = tok(cue, add_special_tokens=False)["input_ids"]
    first = {}
    for p in ("I'm sorry", "Sorry", "As an AI", "Sure"):
        full = tok(cue + p, add_special_tokens=False)["input_ids"]
        first[p] = full[len(base)]  # the token the model must emit first to start that answer
        assert p.startswith(tok.decode([first[p]]).strip())
    assert {first["I'm sorry"], first["Sorry"], first["As an AI"]} == set(ids)
    # a first token that a compliant answer shares ("Sorry" / "Sure" -> "S" here) is dropped
    shared = refusal_token_ids(tok, ("I'm sorry", "Sorry"), exclude=("Sure",))
    assert first["Sure"] not in shared and first["I'm sorry"] in shared
    with pytest.raises(AuditError, match="first answer token of its own"):
        refusal_token_ids(tok, ("Sorry",), exclude=("Sure",)) if first["Sorry"] == first["Sure"] else refusal_token_ids(tok, ("Sorry",), exclude=("Sorry",))


def test_first_token_scores_match_a_plain_forward_and_ignore_padding(glm):
    model, tok = glm
    ids = refusal_token_ids(tok)
    prompts = PROMPTS[:6]
    batched = first_token_scores(model, tok, prompts, ids, batch_size=6)
    single = torch.cat([first_token_scores(model, tok, [p], ids, batch_size=1) for p in prompts])
    assert torch.allclose(batched, single, atol=1e-4), "left padding changes the scores"
    enc = tok(format_prompts(tok, prompts[:1]), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        p = torch.softmax(model(**enc).logits[0, -1].double(), -1)[ids].sum()
    assert abs(float(torch.log(p / (1 - p))) - float(batched[0])) < 1e-4
    assert batched.std() > 0, "scores should differ between prompts"


def test_scores_under_an_intervention_change_and_hooks_are_removed(glm):
    model, tok = glm
    ids = refusal_token_ids(tok)
    r = torch.randn(32, generator=torch.Generator().manual_seed(0))
    iv = Intervention(("attn_out", "shared_down", "experts_down", "mlp_down", "embed"), [0, 1, 2, 3], r)
    before = first_token_scores(model, tok, PROMPTS[:4], ids)
    under = first_token_scores(model, tok, PROMPTS[:4], ids, interventions=[iv])
    after = first_token_scores(model, tok, PROMPTS[:4], ids)
    assert (under - before).abs().max() > 1e-3
    assert torch.equal(before, after)


def test_calibration_fit():
    scores = [-3.0, -2.0, -1.5, 0.5, 1.0, 2.5, 9.0]
    labels = [False, False, False, True, True, True, None]  # the unknown label is dropped
    cal = Calibration.fit(scores, labels)
    assert -1.5 < cal.threshold < 0.5 and cal.accuracy == 1.0 and cal.n == 6 and cal.n_refused == 3
    assert cal.refused(torch.tensor([-2.0, 1.0])).tolist() == [False, True]
    noisy = Calibration.fit([0, 1, 2, 3, 4, 5], [False, True, False, True, True, True])
    assert 0 < noisy.accuracy < 1
    with pytest.raises(AuditError, match="both refused and answered"):
        Calibration.fit([0.0, 1.0], [True, True])
    with pytest.raises(AuditError, match="labels"):
        Calibration.fit([0.0, 1.0], [True])


def test_calibrate_from_judged_generations(glm):
    model, tok = glm
    ids = refusal_token_ids(tok)
    prompts = PROMPTS[:8]
    scores = first_token_scores(model, tok, prompts, ids)
    median = float(scores.median())
    high = {p for p, s in zip(prompts, scores) if float(s) > median}

    def judge(text, prompt):  # a stand-in judge whose labels the scores can explain
        assert isinstance(text, str)
        return prompt in high

    cal = calibrate(model, tok, prompts, ids, judge=judge, max_new_tokens=3)
    assert cal.fitted and cal.accuracy == 1.0
    assert cal.refused(scores).tolist() == [p in high for p in prompts]


def test_estimate_stops_early_when_decided(glm):
    model, tok = glm
    ids = refusal_token_ids(tok)
    up = estimate_refusal(model, tok, PROMPTS, [], Calibration(threshold=-1e9), ids, batch_size=4)
    assert up["decided"] == "above" and up["decided_early"] and up["n_used"] == 4 and up["rate"] == 1.0
    down = estimate_refusal(model, tok, PROMPTS, [], Calibration(threshold=1e9), ids, batch_size=4, low=0.3)
    assert down["decided"] == "below" and down["n_used"] == 12 and down["hi"] < 0.3 and down["seconds"] > 0  # 0/8: hi 0.32
    mid = float(first_token_scores(model, tok, PROMPTS[:8], ids).median())
    full = estimate_refusal(model, tok, PROMPTS[:8], [], Calibration(threshold=mid), ids, batch_size=4)
    assert full["n_used"] == 8 and not full["decided_early"] and full["decided"] is None
    assert full["lo"] < full["rate"] < full["hi"]


def test_estimate_many_ranks_and_confirms(glm):
    model, tok = glm
    ids = refusal_token_ids(tok)
    r = torch.randn(32, generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[:8]
    mid = float(first_token_scores(model, tok, prompts, ids).median())
    cands = {
        "none": [],
        "all writers": [Intervention(("attn_out", "shared_down", "experts_down", "mlp_down", "embed"), [0, 1, 2, 3], r, name="w")],
        "steer": [Intervention(avoid_experts={2: [0, 1]}, name="s")],
    }
    calls = []

    def judge(text, prompt):
        calls.append(prompt)
        return len(text) % 2 == 0

    res = estimate_many(model, tok, prompts, cands, Calibration(threshold=mid), ids, batch_size=4, confirm_top=1,
                        judge=judge, max_new_tokens=3)
    rows = res["candidates"]
    assert [r_["rate"] for r_ in rows] == sorted(r_["rate"] for r_ in rows)
    assert {r_["name"] for r_ in rows} == set(cands)
    assert "generation" in rows[0] and all("generation" not in r_ for r_ in rows[1:])
    assert len(calls) == len(prompts) and rows[0]["generation"]["n"] == len(prompts)
    assert res["seconds"] >= sum(r_["seconds"] for r_ in rows)


def test_organism_first_token_score_separates_and_ablation_lowers_refusal(glm_organism):
    model, tok, r, _, prompts = glm_organism("base")
    harmful, harmless = prompts("harmful", 32), prompts("harmless", 32)
    ids = refusal_token_ids(tok)
    sh = first_token_scores(model, tok, harmful, ids)
    sn = first_token_scores(model, tok, harmless, ids)
    auc = float((sh.unsqueeze(1) > sn.unsqueeze(0)).double().mean())
    assert auc > 0.9, f"first-token score does not separate harmful from harmless (AUC {auc:.2f})"
    cal = Calibration.fit(torch.cat([sh, sn]), [True] * len(sh) + [False] * len(sn))
    base = estimate_refusal(model, tok, harmful, [], cal, ids, low=0.0, high=1.0)
    writers = Intervention(("embed", "attn_out", "mlp_down", "experts_down", "shared_down"), list(range(model.config.num_hidden_layers)), r, name="all writers")
    ablated = estimate_refusal(model, tok, harmful, [writers], cal, ids, low=0.0, high=1.0)
    assert base["rate"] > 0.7 and ablated["rate"] < base["rate"] - 0.4, (base, ablated)
