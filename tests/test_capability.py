"""The capability check: log-likelihood multiple choice (lm-evaluation-harness's scoring), the paired test and interval,
its gate condition, the item files, and the forward pass against a plain one-sequence-at-a-time computation."""

from __future__ import annotations

import json
import math
import random

import pytest

from checks.capability import CONDITIONS, capability_check, choice_correct, paired_drop
from checks.errors import AuditError
from checks.gate import GateConfig, evaluate_gate
from checks.stats import paired_difference_interval


def test_choice_correct_sum_and_length_normalised():
    # item 0: the long right answer wins on the sum, loses per character; item 1: a NaN never wins
    r = choice_correct([[-4.0, -3.0], [float("nan"), -2.0]], [[40, 5], [3, 3]], [0, 0])
    assert r["acc"] == [False, False] and r["acc_norm"] == [True, False] and r["nonfinite"] == 1
    assert choice_correct([[-1.0, -1.0]], [[1, 1]], [0])["acc"] == [True]  # ties: the first, as numpy's argmax
    with pytest.raises(ValueError):
        choice_correct([[-1.0]], [[1]], [3])


def test_newcombe_interval_matches_its_definition_and_covers():
    # the worked table of contingencytables::Newcombe_square_and_add_CI_paired_2x2's method (a, b, c, d) = (12, 9, 2, 1)
    d, lo, hi = paired_difference_interval(12, 9, 2, 1)
    assert d == pytest.approx(7 / 24) and lo == pytest.approx(0.0311, abs=1e-4) and hi == pytest.approx(0.5078, abs=1e-4)
    assert paired_difference_interval(50, 0, 0, 0) == (0.0, pytest.approx(-0.0713, abs=1e-3), pytest.approx(0.0713, abs=1e-3))
    assert all(math.isnan(x) for x in paired_difference_interval(0, 0, 0, 0))
    # coverage of the true drop on simulated paired items (n=60, acc 0.7 before, 0.6 after, correlated): near 95 %
    rng, hit, trials = random.Random(0), 0, 400
    for _ in range(trials):
        cells = [0, 0, 0, 0]
        for _ in range(60):
            u = rng.random()
            cells[0 if u < 0.55 else 1 if u < 0.70 else 2 if u < 0.75 else 3] += 1
        _, lo, hi = paired_difference_interval(*cells)
        hit += lo <= 0.10 <= hi
    assert 0.92 <= hit / trials <= 0.99


def _task(before, after, chance=0.25, **kw):
    return {"before": {"acc": before, "acc_norm": before, "nonfinite": kw.pop("nan_b", 0)},
            "after": {"acc": after, "acc_norm": after, "nonfinite": kw.pop("nan_a", 0)}, "chance": chance, "source": "test",
            "questions": [f"q{i}" for i in range(len(before))], **kw}


def _gate_row(res, **limits):
    gate = evaluate_gate({"checks": {"capability": res.to_dict()}}, GateConfig(**limits))
    rows = [t for t in gate["thresholds"] if t["check"] == "capability"]  # the other checks did not run here
    return next(t for t in rows if t["name"] == "max_capability_drop"), {"passed": all(t["passed"] is not False for t in rows)}


def test_a_damaged_model_fails_with_the_drop_and_its_interval_and_a_sound_one_passes():
    before = [True] * 90 + [False] * 10
    damaged = capability_check({"facts": _task(before, [True] * 40 + [False] * 60)})
    f = next(x for x in damaged.findings if x.code == "capability-drop")
    assert damaged.status == "fail" and f.severity == "fail" and f.value == pytest.approx(0.5)
    assert "95% CI" in f.message and f.evidence["lo"] > 0.3 and f.evidence["hi"] < 0.65 and f.evidence["lost_examples"][:2] == ["q40", "q41"]
    row, gate = _gate_row(damaged)
    assert row["state"] == "fail" and row["value"] == pytest.approx(0.5) and not gate["passed"]
    sound = capability_check({"facts": _task(before, before[:-2] + [True, True])})
    row, gate = _gate_row(sound)
    assert sound.status == "pass" and row["state"] == "pass" and row["value"] == pytest.approx(-0.02)
    table = sound.data["tables"]["accuracy"]
    assert table["columns"][5] == "drop" and len(table["rows"]) == 2  # acc and acc_norm, per task


def test_a_small_noisy_drop_warns_and_chance_level_items_do_not_apply():
    noisy = capability_check({"t": _task([True] * 14 + [False] * 6, [True] * 11 + [False] * 9)})  # -15 points on 20 items, p = 0.25
    assert noisy.status == "warn"
    row, _ = _gate_row(noisy)
    assert row["state"] == "fail"  # the gate reads the point drop: a limit is a limit
    guess = capability_check({"t": _task([i % 4 == 0 for i in range(100)], [False] * 100)})
    row, gate = _gate_row(guess)
    assert row["state"] == "not-applicable" and "above chance" in row["reason"] and gate["passed"]
    none = capability_check({}, why_not="no capability items (--capability none)")
    row, _ = _gate_row(none)
    assert none.status == "skip" and row["state"] == "not-applicable" and "--capability none" in row["reason"]


def test_non_finite_scores_fail_the_gate():
    res = capability_check({"t": _task([True] * 50, [False] * 50, nan_a=3)})
    d = res.to_dict()
    assert d["nonfinite"]["data.tasks.t.acc_norm.drop"] == "nan"
    row, _ = _gate_row(res)
    assert row["state"] == "non-finite" and any(f.code == "nan-inf" for f in res.findings)


def test_paired_drop_counts():
    s = paired_drop([True, True, False, False], [True, False, True, False])
    assert (s["lost"], s["gained"], s["drop"], s["p"]) == (1, 1, 0.0, 1.0)
    assert CONDITIONS[0].default == 0.10


def test_item_files_are_validated_with_the_line(tmp_path):
    from audit.forward.capability import DEFAULT_ITEMS, CapabilitySpec, load_items

    f = tmp_path / "items.jsonl"
    f.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": "B"}\n{"question": "Sky?", "choices": ["blue", "green"], "answer": "blue", "task": "t2"}\n')
    tasks = load_items(f)
    assert [it.answer for it in tasks["items"]] == [1] and tasks["t2"][0].answer == 0
    for bad, msg in (('{"question": "q", "choices": ["a"], "answer": 0}', "two or more"), ('{"question": "q", "choices": ["a", "b"], "answer": 5}', "names no choice"),
                     ("not json", "not valid JSON")):
        f.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n' + bad + "\n")
        with pytest.raises(AuditError, match=rf"items.jsonl:2: .*{msg}"):
            load_items(f)
    with pytest.raises(AuditError, match="no such file"):
        CapabilitySpec.from_flag(str(tmp_path / "nope.jsonl"))
    assert CapabilitySpec.from_flag("none") is None
    spec = CapabilitySpec.from_flag(None)
    assert spec.default and sum(map(len, spec.tasks.values())) == 150  # the embedded MMLU sample (docs/capability-data-card.md)
    rows = [json.loads(x) for x in DEFAULT_ITEMS.read_text().splitlines()]
    assert all(r["source"].startswith("MMLU test") and len(r["choices"]) == 4 for r in rows)


def test_loglikelihoods_batched_equal_one_sequence_at_a_time(tiny_model):
    """Left-padded batches computing only the continuation's logits give the plain full forward's sums, and the
    harness's pair encoding (the context's trailing space moves into the continuation)."""
    import torch

    from audit.forward.capability import _encode_pair, loglikelihoods
    from audit.model.directory import ModelDir

    md = ModelDir(tiny_model("qwen3_moe"))
    tok = md.tokenizer()
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(md.path, dtype=torch.float32).eval()
    reqs = [("Question: what is red?\nAnswer:", " a color"), ("Hi there ", "friend of mine"), ("x", " y z w v")] * 3
    got = loglikelihoods(model, tok, reqs, batch_size=4)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        c, x = _encode_pair(tok, ctx, cont)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([c + x])).logits[0].float(), -1)
        want = sum(float(lp[len(c) - 1 + j, t]) for j, t in enumerate(x))
        assert ll == pytest.approx(want, abs=1e-3)
    c, x = _encode_pair(tok, "Hi there ", "friend")
    assert tok.decode(x).startswith(" ")  # the space went with the continuation
    assert loglikelihoods(model, tok, reqs[:1], max_len=3) == [None]  # longer than the context: not scored


def test_lm_eval_is_used_through_its_own_api_or_refused_clearly(tiny_model, tmp_path):
    """lm-eval:TASK goes through lm-evaluation-harness (its task, its per-item metrics); a local task YAML over a local
    JSON file runs offline; a hub task that cannot load is an AuditError naming why."""
    import torch

    from audit.forward.capability import CapabilitySpec
    from audit.model.directory import ModelDir

    md = ModelDir(tiny_model("qwen3_moe"))
    tok = md.tokenizer()
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(md.path, dtype=torch.float32).eval()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(AuditError, match="not installed"):
            CapabilitySpec.from_flag("lm-eval:arc_easy").score(model, tok)
        return
    data = tmp_path / "items.json"
    data.write_text("\n".join(json.dumps({"q": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2}) for i in range(6)) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{q}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    res = CapabilitySpec.from_flag(f"lm-eval:{tmp_path / 'tiny_mc.yaml'}").score(model, tok)
    assert list(res) == ["tiny_mc"] and len(res["tiny_mc"]["correct"]["acc"]) == 6 and res["tiny_mc"]["chance"] == 0.5
    # a task whose data lives on the hub (ARC's own dataset name), offline: refused with the reason and what to do
    (tmp_path / "hub_mc.yaml").write_text((tmp_path / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: hub_mc")
                                          .replace("dataset_path: json", "dataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy")
                                          .replace("dataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n", ""))
    with pytest.raises(AuditError, match="could not load or run the task .*hub.*--capability FILE"):
        CapabilitySpec.from_flag(f"lm-eval:{tmp_path / 'hub_mc.yaml'}").score(model, tok)
    with pytest.raises(AuditError, match="no such task YAML"):
        CapabilitySpec.from_flag(f"lm-eval:{tmp_path / 'nope.yaml'}").score(model, tok)
