"""The diagnosis against counterfactual ground truth: on every case of the matrix (audit/organisms/cases.py) the top cause
of `audit run` is one whose single fix, really applied, removes refusal, and no cause that such a fix ruled out
is listed as live.

The truth (tests/data/diagnosis_truth.json) was measured by benchmarks/diagnosis_matrix.py, which applies
every candidate fix with `audit ablate` and evaluates it on the organism's held-out prompts; nothing here
assumes a cause from how a case was made. The organisms are the ``spread`` variants (r* planted
redundantly in every writer group of every layer); the first tests check they have the properties
the matrix relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from audit.organisms import build as O
from audit.organisms import cases as C

DATA = Path(__file__).parent / "data"
TRUTH = json.loads((DATA / "diagnosis_truth.json").read_text())  # the in-sample organisms (glm, mix): what the rules were written on
# the out-of-sample family (gpt_oss), measured and audited only after the diagnosis constants were frozen; reported apart
TRUTH_OSS = json.loads((DATA / "diagnosis_truth_oss.json").read_text()) if (DATA / "diagnosis_truth_oss.json").exists() else {"cases": {}, "organisms": {}}
ALL_CASES = {**TRUTH["cases"], **TRUTH_OSS["cases"]}
N_EVAL = 40  # held-out prompts per class for the organism property checks
# Where the audit is measured wrong against the truth and why (reported in the closing note, never tuned away). strict: a case
# that starts passing fails here, so this list stays true.
KNOWN_WRONG = {
    "oss-scale-2.5": "the default gate cannot see this damage: refusal 4% and first-token KL 0.48 (under max_kl 1.0) on the audit's "
                     "24 prompts, capability items intact, but harmless answers lose 14 points of correctness on the organism's checkable "
                     "answers (the truth's criterion); no default measure scores free answers' correctness",
}


def _cases(names):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[n])) if n in KNOWN_WRONG else n for n in sorted(names)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the organisms ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def organism():
    """organism(key) -> (info, fp32 model, tokenizer, eval rows, Directions), loaded once per module."""
    from audit.intent.directions import Directions

    cache = {}

    def get(key):
        if key not in cache:
            info = C.organism_info(key)
            model, tok, _ = O.load_organism(info["base"])
            rows = O.read_eval(info["base"])
            rows = [r for r in rows if r["harmful"]][:N_EVAL] + [r for r in rows if not r["harmful"]][:N_EVAL]
            cache[key] = (info, model, tok, rows, Directions.load(info["directions"]))
        return cache[key]

    return get


_BASE_EVAL: dict = {}


def base_eval(model, tok, rows) -> dict:
    """The base organism's rates on the property prompts (once per model)."""
    if id(model) not in _BASE_EVAL:
        _BASE_EVAL[id(model)] = O.evaluate(model, tok, rows)
    return _BASE_EVAL[id(model)]


def _ablated(model, r, select):
    import copy

    m = copy.deepcopy(model)
    O.orthogonalize(m, r, select)
    return m


@pytest.mark.parametrize("key", sorted(C.ORGANISMS))
def test_spread_organism_has_the_properties_the_matrix_needs(organism, key):
    """Refuses and answers; the measured mid-depth direction removed from every writer of every layer removes
    refusal and keeps the answers; leaving any one writer group untouched keeps the refusal."""
    info, model, tok, rows, dirs = organism(key)
    assert info["family"] == C.ORGANISMS[key][0] and info["num_layers"] >= 8
    before = base_eval(model, tok, rows)
    assert before["harmful_refusal"] >= 0.95 and before["harmless_correct"] >= 0.95, before
    d = dirs.refusal_dir[info["mid_index"]]
    assert 0.2 < abs(info["cos_to_r_star"][info["mid_index"]]) < 0.99  # the ablations' direction is not r* itself
    full = O.evaluate(_ablated(model, d, lambda ro: ro.layer is not None), tok, rows)
    assert full["harmful_refusal"] <= 0.10 and full["harmless_correct"] >= before["harmless_correct"] - 0.10, full
    harmful = [r for r in rows if r["harmful"]]
    meta = O.read_meta(info["base"])
    for group in meta["carriers"]["writer_groups"]:
        kept = O.evaluate(_ablated(model, d, lambda ro, g=group: ro.layer is not None and ro.component != group), tok, harmful)
        assert kept["harmful_refusal"] >= 0.9, (group, kept)


def test_glm_spread_is_bf16_and_sharded():
    from audit.model.directory import ModelDir

    md = ModelDir(C.organism_info("glm")["base"])
    assert set(md.dtypes()) <= {"BF16", "F32"} and "BF16" in md.dtypes()
    assert len(md.shards) >= 4 and md.layout.num_layers >= 8 and md.layout.n_shared_experts == 1
    mix = ModelDir(C.organism_info("mix")["base"])
    assert set(mix.dtypes()) == {"F32"} and mix.layout.family == "mixtral"


def test_truth_was_measured_on_these_organisms():
    """The recorded truth belongs to the organisms in the cache (same recipe); else re-run the benchmark."""
    for truth in (TRUTH, TRUTH_OSS):
        for key, org in truth["organisms"].items():
            info = C.organism_info(key)
            assert Path(info["base"]).name == org["cache_name"], "organism recipe changed: re-run benchmarks/diagnosis_matrix.py"
    assert set(TRUTH["cases"]) == {n for n, sp in C.SPECS.items() if sp.organism in C.IN_SAMPLE}, "cases changed: re-run the benchmark"
    assert set(TRUTH_OSS["cases"]) == {n for n, sp in C.SPECS.items() if sp.organism in C.OUT_OF_SAMPLE}, "re-run it with --organisms oss"
    for name, t in ALL_CASES.items():
        assert t["expected_verdict"] == "pass" or t["truth"], f"{name}: no single fix passes; a useless case"


# -- the audit on every case -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited():
    """audited(name, foreign=False) -> (results, seconds): `audit run` on the case with the matrix's small budgets, once per module;
    ``foreign``: as another tool's ablation, with only --base (no manifest, no YAML, no measurement file)."""
    cache = {}

    def run(name, foreign=False):
        if (name, foreign) not in cache:
            cache[name, foreign] = C.audit_case(name, foreign=foreign)
        return cache[name, foreign]

    return run


def _summary(res) -> str:
    return "; ".join(f"{c['id']}{' (demoted)' if c.get('demoted') else ''}" for c in res["causes"]) or "no causes"


@pytest.mark.parametrize("name", _cases(ALL_CASES))
def test_top_cause_is_one_whose_fix_works(audited, name):
    truth = ALL_CASES[name]
    res, _ = audited(name)
    assert res["verdict"] == truth["expected_verdict"], f"{name}: verdict {res['verdict']}, measured {truth['measured']}"
    if truth["expected_verdict"] == "pass":
        return
    assert res["causes"], f"{name}: a failed verdict with no cause"
    top = res["causes"][0]["id"]
    assert top in truth["truth"], f"{name}: top cause {top}, but only the fix of {truth['truth']} passes; causes: {_summary(res)}"
    assert not res["causes"][0].get("demoted"), f"{name}: the right cause {top} is demoted ({res['causes'][0].get('demoted_reason')})"


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_no_ruled_out_cause_is_live(audited, name):
    truth = ALL_CASES[name]
    res, _ = audited(name)
    live = [c["id"] for c in res["causes"] if not c.get("demoted")]
    wrong = {c: truth["ruled_out"][c] for c in live if c in truth["ruled_out"]}
    assert not wrong, f"{name}: live causes the counterfactual rules out: {wrong}"


# the one intent-free counterpart a stated intent's cause may have: a tool whose patterns matched nothing in a group is
# "keys-not-matched" against its YAML, and "that group was never ablated" without it (the same fix: ablate the group)
INTENT_FREE = {"keys-not-matched": ("routed-experts-not-ablated", "attention-not-ablated", "shared-experts-not-ablated", "layer-coverage")}


@pytest.mark.parametrize("name", _cases(ALL_CASES))
def test_every_case_audits_alike_without_its_intent(audited, name):
    """Audited as another tool's ablation (only --base), a case gets the verdict it gets with its manifest or YAML, and the same
    top cause, or the intent-free cause whose fix is the same and is in the truth (issue 25)."""
    truth = ALL_CASES[name]
    stated, _ = audited(name)
    foreign, _ = audited(name, foreign=True)
    assert foreign["run"]["intent_source"] == "inferred"
    assert foreign["verdict"] == stated["verdict"] == truth["expected_verdict"], (name, foreign["headline"], foreign["gate"])
    if truth["expected_verdict"] == "pass":
        row = next(t for t in foreign["gate"]["thresholds"] if t["name"] == "forbid_unintended")
        assert row["state"] == "not-applicable", row
        return
    top_s, top_f = stated["causes"][0]["id"], foreign["causes"][0]["id"]
    assert top_f == top_s or (top_f in INTENT_FREE.get(top_s, ()) and top_f in truth["truth"]), (name, top_s, top_f)


def _measured_sources(res) -> set[str]:
    """The measurements a results document holds: its checks, and the simulation's pieces when it ran."""
    have = set(res["checks"]) | {"reached", "directions"}
    if (res.get("simulation") or {}).get("bypass"):
        have.add("bypass")
    return have


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_no_cause_without_evidence_from_a_measurement(audited, name):
    """Every cause id in results.json, both ways, carries evidence, and every item cites a measurement the run made; a failed
    verdict either names a cause or says "no cause proven" with what was tried (issue 25)."""
    for foreign in (False, True):
        res, _ = audited(name, foreign=foreign)
        have = _measured_sources(res)
        for c in res["causes"]:
            assert c["evidence"], (name, foreign, c["id"])
            assert all(e["source"] in have and e["text"] for e in c["evidence"]), (name, foreign, c["id"], c["evidence"])
        d = res["diagnosis"]
        if res["verdict"] == "fail":
            assert d["status"] in ("explained", "unexplained"), (name, d)
            assert d["status"] == "explained" or ("tried" in d and d["next"] and "likely" not in res["headline"].lower()), (name, d)
            assert (d["status"] == "explained") == bool(res["causes"] and not res["causes"][0].get("demoted")), (name, d)
        else:
            assert d["status"] == "not-needed"


@pytest.mark.parametrize("name", _cases(n for n, t in ALL_CASES.items() if t["expected_verdict"] == "fail"))
def test_top_cause_fix_really_works(audited, organism, tmp_path, name):
    """The top cause's own fix (its config as the report gives it), applied with `audit ablate`, passes on held-out prompts."""
    import yaml
    from transformers import AutoModelForCausalLM

    from audit.ablation.ablate import ablate
    from audit.intent.config import AblationConfig

    res, _ = audited(name)
    assert res["causes"], f"{name}: a failed verdict with no cause"
    top = res["causes"][0]
    text = top["fix"].get("config_yaml")
    assert text, f"{name}: the top cause {top['id']} gives no config to apply ({top['fix'].get('summary')})"
    case = C.build_case(name)
    info, model, tok, rows, dirs = organism(C.SPECS[name].organism)
    ablate(case.base_dir, AblationConfig.from_dict(yaml.safe_load(text), source=f"{name}: fix of {top['id']}"), tmp_path / "fixed",
           directions=dirs, progress=False)
    fixed = AutoModelForCausalLM.from_pretrained(tmp_path / "fixed", dtype=torch.float32, experts_implementation="eager").eval()
    m = O.evaluate(fixed, tok, rows)
    assert m["harmful_refusal"] <= 0.10 and m["harmless_correct"] >= base_eval(model, tok, rows)["harmless_correct"] - 0.10, \
        f"{name}: applying the fix of {top['id']} ({top['fix'].get('summary')}) gives {m}"


# -- the cases are what they say (what reached the weights; no manifest where a foreign tool made them) ----------------


def _changed(case) -> set[str]:
    from audit.model.directory import ModelDir

    a, b = ModelDir(case.ablated_dir), ModelDir(case.base_dir)
    return {k for k in b.tensors if not torch.equal(a.tensor(k), b.tensor(k))}


def _layers(keys) -> set[int]:
    return {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}


def test_foreign_cases_edit_what_their_tools_would():
    prefix = C.build_case("glm-prefix-135")
    assert not (prefix.ablated_dir / "ablation-manifest.json").exists() and prefix.config_path.is_file() and prefix.directions_path.is_file()
    changed = _changed(prefix)
    assert _layers(changed) == {1, 3, 5, 10, 11}  # "model.layers.1" without the dot also matched 10 and 11
    assert all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in changed)
    from audit.intent.config import load_config

    assert [e.layer for e in load_config(prefix.config_path).entries] == [1, 3, 5]
    dense = C.build_case("mix-dense-names")
    changed = _changed(dense)
    assert changed and all(k.endswith("self_attn.o_proj.weight") for k in changed) and len(_layers(changed)) == 8


@pytest.mark.parametrize("name", ["glm-top1-expert", "mix-top1-expert"])
def test_top1_expert_notebook_edits_one_routed_expert_per_layer(name):
    case = C.build_case(name)
    assert not (case.ablated_dir / "ablation-manifest.json").exists()
    experts = [k for k in _changed(case) if ".experts." in k]
    per_layer = {}
    for k in experts:
        per_layer.setdefault(int(k.split(".")[2]), set()).add(int(k.split(".experts.")[1].split(".")[0]))
    assert {str(l): sorted(e) for l, e in per_layer.items()} == case.applied["experts"]
    assert all(k.endswith(("down_proj.weight", "w2.weight")) for k in experts)
