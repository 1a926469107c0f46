"""router_mode: suppress: the config, the weight edit, the hook that equals it, and what it does on the experts organism.

The organisms (cached, `experts` variant) plant refusal in two routed experts per layer that the router picks for
harmful prompts; suppressing those experts at the router must remove refusal, measured by generation and the judge.
"""

from __future__ import annotations

import json

import pytest
import torch

from audit.intent.config import AblationConfig
from checks.errors import AuditError

N_EVAL = 48  # held-out harmful prompts per measurement (Wilson interval ~ +-0.07 at 0)


def _cfg(pairs, strength, **kw):
    return AblationConfig.from_dict({"router_mode": "suppress", "suppress_experts": pairs, "suppress_strength": strength, **kw})


# -- the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("d, msg", [
    ({"suppress_experts": [[1, 2]], "suppress_strength": 1.0, "ablate": [{"layer": 1}]}, "only apply with router_mode: suppress"),
    ({"router_mode": "suppress", "suppress_strength": 1.0}, "needs suppress_experts"),
    ({"router_mode": "suppress", "suppress_experts": "some", "suppress_strength": 1.0}, 'suppress_experts: "some" is not allowed; suppress_experts takes auto, or a non-empty list of'),
    ({"router_mode": "suppress", "suppress_experts": [[1]], "suppress_strength": 1.0}, r"suppress_experts\[0\]: \[1\] is not allowed \(\[1\] is too short\)"),
    ({"router_mode": "suppress", "suppress_experts": [[1, -2]], "suppress_strength": 1.0}, r"suppress_experts\[0\]\[1\]: -2 is not allowed"),
    ({"router_mode": "suppress", "suppress_experts": [[1, 2]]}, "needs how much to lower"),
    ({"router_mode": "suppress", "suppress_experts": [[1, 2]], "suppress_strength": -1.0}, "suppress_strength: -1.0 is not allowed .*takes a positive number"),
    ({"router_mode": "sideways", "ablate": [{"layer": 1}]}, 'router_mode: unknown "sideways"; router_mode takes input, none or suppress'),
])
def test_bad_suppress_settings_name_the_setting(d, msg):
    with pytest.raises(AuditError, match=msg):
        AblationConfig.from_dict(d)


def test_suppress_config_round_trips_and_needs_no_ablate_list():
    cfg = _cfg([[2, 5], [1, 3], [2, 5]], 1.5, ablate=[{"layer": 1, "components": ["router", "experts_down"]}])
    assert cfg.suppress_experts == ((1, 3), (2, 5)) and cfg.suppressed() == {1: [3], 2: [5]}
    again = AblationConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert _cfg("auto", 1.0).entries == [] and _cfg("auto", 1.0).suppressed() == {}


def test_suppress_never_projects_the_router(tiny_model):
    from audit.intent.config import plan
    from audit.model.directory import ModelDir

    layout = ModelDir(tiny_model("mixtral")).layout
    cfg = _cfg([[1, 3]], 1.0, components=["router", "experts_down"], ablate=[{"layer": 1}])
    assert plan(cfg, layout) and not [e for e in plan(cfg, layout) if "router" in e.targets]


@pytest.mark.parametrize("family", ["phimoe", "granitemoe", "llama"])
def test_a_router_that_cannot_be_edited_is_a_clear_error(tiny_model, tmp_path, family):
    from audit.ablation.ablate import ablate
    from audit.intent.directions import Directions
    from audit.model.directory import ModelDir

    md = ModelDir(tiny_model(family))
    h, n = md.layout.hidden_size, md.layout.num_layers + 1
    dirs = Directions(torch.randn(n, h), torch.randn(n, h), torch.randn(n, h))
    with pytest.raises(AuditError, match=f"cannot lower expert selection on a {family} model.*Families it supports"):
        ablate(md.path, _cfg([[1, 0]], 1.0), tmp_path / "out", directions=dirs)
    assert not (tmp_path / "out").exists()


def test_layers_and_experts_out_of_range_are_errors(tiny_model, tmp_path):
    from audit.model.directory import ModelDir
    from audit.ablation.suppress import plan_suppress

    layout = ModelDir(tiny_model("glm4_moe")).layout
    dense = [l for l in range(layout.num_layers) if l not in layout.moe_layers][0]
    with pytest.raises(AuditError, match="not a MoE layer"):
        plan_suppress(_cfg([[dense, 0]], 1.0), layout)
    with pytest.raises(AuditError, match="out of range"):
        plan_suppress(_cfg([[layout.moe_layers[0], layout.n_routed_experts]], 1.0), layout)
    with pytest.raises(AuditError, match="must be resolved on the base"):
        plan_suppress(_cfg("auto", 1.0), layout)


def test_gpt_oss_router_bias_hook_equals_the_weight_edit(tiny_model, tmp_path):
    """gpt-oss: the router's own bias is lowered; hooked base and ablated-on-disk route alike (logits equal)."""
    from audit.ablation.ablate import ablate
    from audit.forward.intervene import apply, from_config
    from audit.intent.directions import Directions
    from audit.model.directory import ModelDir

    md = ModelDir(tiny_model("gpt_oss"))
    h, n = md.layout.hidden_size, md.layout.num_layers + 1
    dirs = Directions(torch.randn(n, h), torch.randn(n, h), torch.randn(n, h))
    cfg = _cfg([[0, 1], [2, 5]], 4.0)
    m = ablate(md.path, cfg, tmp_path / "out", directions=dirs)
    assert [r["rule"] for r in m["router_suppressed"]] == ["router_bias", "router_bias"]
    assert all(abs(b - a - 4.0) < 1e-5 for r in m["router_suppressed"] for b, a in zip(r["before"], r["after"]))
    base, abl = md.load_model(), ModelDir(tmp_path / "out").load_model()
    x = torch.randint(5, 100, (2, 7))
    logits = {}
    for name, model in (("abl", abl), ("hook", base)):
        seen = []
        hs = [model.model.layers[i].mlp.router.register_forward_hook(lambda mod, a, o: seen.append(o[0].float())) for i in (0, 2)]
        with apply(model, from_config(cfg, dirs) if name == "hook" else []), torch.no_grad():
            model(input_ids=x)
        [hh.remove() for hh in hs]
        logits[name] = seen
    for a, b in zip(logits["abl"], logits["hook"]):
        assert torch.equal(a, b)


# -- the organisms --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def experts_organism():
    """experts_organism(family) -> (path, planted [[layer, expert]], Directions), measured once per session."""
    from audit.forward.measure import measure_directions
    from audit.model.directory import ModelDir
    from audit.organisms.build import cached_organism
    from audit.model.prompts import load_prompts

    cache = {}

    def get(family):
        if family not in cache:
            path = cached_organism(family, "experts", 0)
            info = json.loads((path / "organism.json").read_text())
            pairs = sorted([int(l), e] for l, es in info["carriers"]["experts"].items() for e in es)
            dirs = measure_directions(ModelDir(path), load_prompts(str(path / "prompts" / "train_harmful.txt"), "harmful"),
                                      load_prompts(str(path / "prompts" / "train_harmless.txt"), "harmless"))
            cache[family] = (path, pairs, dirs)
        return cache[family]

    return get


def _routes(model, tok, prompts):
    """Per MoE layer: (router logits, chosen experts) of every token of ``prompts``."""
    from audit.forward.structure import decoder_layers, ffn_block, router_of

    out, hs = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        r = router_of(ffn_block(layer))
        if r is not None:
            hs.append(r.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, (o[0].float(), o[2]))))
    ids = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True, padding=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        model(**ids)
    for h in hs:
        h.remove()
    return out


def _refusal(model, tok, prompts):
    """(refusal rate, undecided) by greedy generation judged by the default judge."""
    from audit.forward.generate import LocalBackend
    from audit.judgement.judges import make_judge

    comps = LocalBackend(model, tok).complete(prompts, 24, 16)
    js = make_judge("rules").many([c.answer for c in comps], [c.prompt for c in comps], [c.finish_reason == "length" for c in comps])
    decided = [j.refused for j in js if j.refused is not None]
    return sum(decided) / max(1, len(decided)), len(js) - len(decided)


def _kl(model, tok, prompts, lp0):
    from audit.forward.generate import last_token_logprobs

    lp = last_token_logprobs(model, tok, prompts, 16)
    return float((lp0.exp() * (lp0 - lp)).sum(-1).mean())


@pytest.mark.parametrize("family, rule, must_remove", [
    ("glm4_moe", "correction_bias", True),   # selection only: an exact constant shift of the chosen experts' scores
    ("mixtral", "row_along_mean", False),    # no bias: the fallback, router rows shifted along the mean input
    ("qwen3_moe", "row_along_mean", False),
])
def test_suppressing_the_planted_experts_removes_refusal_and_the_simulation_agrees(experts_organism, tmp_path, family, rule, must_remove):
    """Walking the family's strengths as the diagnosis proposes them (SUPPRESS_STRENGTHS, smallest first): at every strength the
    hook gives the applied model's refusal, KL, router logits and choices, so the diagnosis's simulated suppression is what
    applying it does. With a correction bias one strength removes refusal (<= 10%). The bias-free fallback is not an exact
    shift (inputs far from the mean move less) and is not guaranteed to: on the committed mixtral organism the best strength
    leaves 26%, on qwen3_moe strength 4 leaves 7% with most answers degenerate (an older build of each passed at 2.0); the
    simulation says so before anything is applied, which is what the diagnosis relies on."""
    from audit.ablation.ablate import ablate
    from audit.forward.generate import last_token_logprobs
    from audit.forward.intervene import apply, from_config
    from audit.model.directory import ModelDir
    from audit.organisms.build import read_prompts
    from checks.layout import SUPPRESS_STRENGTHS

    path, pairs, dirs = experts_organism(family)
    harmful, harmless = read_prompts(path, "harmful")[:N_EVAL], read_prompts(path, "harmless")[:N_EVAL]
    base_md = ModelDir(path)
    tok = base_md.tokenizer()
    base = base_md.load_model()
    lp0 = last_token_logprobs(base, tok, harmless, 16)
    before, _ = _refusal(base, tok, harmful)
    assert before >= 0.9
    worked = None
    for strength in SUPPRESS_STRENGTHS[rule]:
        cfg = _cfg(pairs, strength)
        m = ablate(path, cfg, tmp_path / f"sup-{strength}", directions=dirs)
        assert {r["rule"] for r in m["router_suppressed"]} == {rule}
        assert sorted([r["layer"], e] for r in m["router_suppressed"] for e in r["experts"]) == pairs
        abl = ModelDir(tmp_path / f"sup-{strength}").load_model()
        applied, applied_unknown = _refusal(abl, tok, harmful)
        kl_applied = _kl(abl, tok, harmless, lp0)
        routes_abl = _routes(abl, tok, harmful[:8] + harmless[:8])
        with apply(base, from_config(cfg, dirs)):
            simulated, _ = _refusal(base, tok, harmful)
            kl_sim = _kl(base, tok, harmless, lp0)
            routes_hook = _routes(base, tok, harmful[:8] + harmless[:8])
        print(f"{family} strength {strength}: refusal before {before:.2f}, applied {applied:.2f} ({applied_unknown} undecided), "
              f"simulated {simulated:.2f}; KL applied {kl_applied:.2e}, simulated {kl_sim:.2e}")
        assert abs(simulated - applied) <= 0.10
        assert kl_applied == pytest.approx(kl_sim, abs=1e-4)
        for layer, (logits, idx) in routes_abl.items():  # the hook is the weight edit: same logits, same choices
            assert torch.allclose(logits, routes_hook[layer][0], atol=1e-5)
            assert torch.equal(idx.sort(-1).values, routes_hook[layer][1].sort(-1).values)
        if applied <= 0.10:
            worked = (strength, kl_applied)
            break
    if must_remove:
        assert worked is not None, f"{family}: no strength of {SUPPRESS_STRENGTHS[rule]} removes refusal"
        assert worked[1] < 1.0


def test_too_weak_a_strength_leaves_refusal(experts_organism):
    """strength 1.0 on the saturated GLM router leaves the planted experts chosen: the strength is a real knob, not a switch."""
    from audit.forward.intervene import apply, from_config
    from audit.model.directory import ModelDir
    from audit.organisms.build import read_prompts

    path, pairs, dirs = experts_organism("glm4_moe")
    md = ModelDir(path)
    base, tok = md.load_model(), md.tokenizer()
    with apply(base, from_config(_cfg(pairs, 0.5), dirs)):
        weak, _ = _refusal(base, tok, read_prompts(path, "harmful")[:16])
    assert weak >= 0.9


@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_moe"])
def test_auto_finds_the_planted_experts_and_what_reached_reproduces_it(experts_organism, tmp_path, family):
    from audit.ablation.ablate import ablate
    from audit.intent.reached import reached
    from audit.weights.static_audit import static_audit

    path, pairs, dirs = experts_organism(family)
    m = ablate(path, _cfg("auto", 3.0), tmp_path / "auto", directions=dirs)
    assert m["config"]["suppress_experts"] == pairs  # the routing check's refusal experts are exactly the planted ones
    assert all(r["reason"].startswith("auto: routing check") and all(w["q"] < 0.05 for w in r["why"].values()) for r in m["router_suppressed"])
    record = {}
    res = static_audit(tmp_path / "auto", record=record)
    assert res["weights"].status == "pass", res["weights"].summary  # the router entries are intended, and named
    assert res["recovery"].status == "pass" and res["projection"].status == "pass"
    got = reached(record, dirs).config
    assert got.router_mode == "suppress" and [list(p) for p in got.suppress_experts] == pairs
    assert got.suppress_strength == pytest.approx(3.0, rel=0.02)


def test_audit_run_diagnoses_a_weak_suppression_and_its_fix_applied_matches_the_simulation(experts_organism, tmp_path):
    """audit run on a GLM organism suppressed too weakly (strength 1.0): the cause proposes a stronger suppression, the
    simulator walks it, --apply-fix re-ablates with it, and the applied refusal agrees with the simulated one."""
    from audit.ablation.ablate import ablate
    from audit.pipeline.run import RunOptions, run_audit

    path, pairs, dirs = experts_organism("glm4_moe")
    ablate(path, _cfg(pairs, 1.0), tmp_path / "weak", directions=dirs)
    res = run_audit(RunOptions(model_dir=str(tmp_path / "weak"), out=str(tmp_path / "report"), limit=48, max_new_tokens=24, quiet=True,
                               apply_fix=str(tmp_path / "fixed")))
    assert res["verdict"] == "fail"
    weights = res["checks"]["weights"]
    assert weights["status"] == "pass" and any(f["code"] == "router-suppressed" for f in weights["findings"])
    table = weights["data"]["tables"]["router-suppressed"]  # rows as lists: the results.json written was validated against its schema
    assert all(isinstance(r, list) and len(r) == len(table["columns"]) for r in table["rows"])
    assert res["simulation"]["reproduction"]["agrees"] is True  # the reached suppression, as hooks, gives the model's refusal
    top = res["causes"][0]
    assert top["id"] == "weak-scale" and "suppress" in top["fix"]["patch"] and top["fix"]["patch"]["suppress"]["strength"] > 1.0
    sim, applied = top["simulated"], res["applied_fix"]
    assert sim["reaches_target"] and sim["kl"] is not None and sim["kl"] < 0.01
    assert applied["verdict"] == "pass" and abs(applied["refusal_rate"] - sim["refusal_rate"]) <= 0.10
    assert "suppress_strength" in top["fix"]["config_yaml"]
    assert "Router entries lowered" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.parametrize("family", ["mixtral", "glm4_moe"])
def test_offloaded_routers_get_the_same_suppression(experts_organism, tmp_path, family):
    """With most layers on disk (accelerate reloads offloaded weights at each forward, so a swapped tensor would not
    last), the hook recomputes the router's output with the edit: the same choices as the weights written."""
    from audit.ablation.ablate import ablate
    from audit.forward.intervene import apply, from_config
    from audit.model.directory import ModelDir
    from audit.organisms.build import read_prompts

    path, pairs, dirs = experts_organism(family)
    cfg = _cfg(pairs, 2.0)
    ablate(path, cfg, tmp_path / "sup", directions=dirs)
    md = ModelDir(path)
    tok = md.tokenizer()
    prompts = read_prompts(path, "harmful")[:8] + read_prompts(path, "harmless")[:8]
    want = _routes(ModelDir(tmp_path / "sup").load_model(), tok, prompts)
    off = md.load_model(device="auto", max_memory={"cpu": 200_000}, offload_folder=tmp_path / "offload")
    from audit.model.loading import placement

    assert placement(off).get("disk"), placement(off)
    with apply(off, from_config(cfg, dirs)):
        got = _routes(off, tok, prompts)
    for layer, (logits, idx) in want.items():
        same = (idx.sort(-1).values == got[layer][1].sort(-1).values).all(-1).float().mean().item()
        assert same >= 0.99, (layer, same)


# -- the diagnosis ---------------------------------------------------------------------------------


def _labels(cause):
    return [c["label"] for c in cause.fix["candidates"]]


def test_refusal_expert_causes_propose_suppression_after_ablating_every_expert():
    from checks.diagnosis import Evidence, diagnose

    ev = dict(partial_experts={1: [6]}, refusal_experts=((1, 6), (1, 7), (2, 0)), n_experts=8, moe_layers=(1, 2),
              suppress_strengths=(0.5, 1.5), suppress_unit="sigmoid score", router_modified=True, router_unchanged=True,
              modified={"router": [1, 2]})
    causes = {c.id: c for c in diagnose(Evidence(**ev))["causes"]}
    for cid in ("redundant-refusal-experts", "router-ablation-ineffective"):
        labels = _labels(causes[cid])
        sup = [i for i, l in enumerate(labels) if l.startswith("suppress the 3 refusal experts")]
        assert len(sup) == 2 and min(sup) > 0 and "strength 0.5" in labels[sup[0]]  # beside "ablate every expert", smallest first
        assert causes[cid].fix["candidates"][sup[0]]["patch"] == {"suppress": {"experts": [[1, 6], [1, 7], [2, 0]], "strength": 0.5}}
    no_rule = {c.id: c for c in diagnose(Evidence(**{**ev, "suppress_strengths": ()}))["causes"]}  # a family whose router cannot be edited
    assert not any(l.startswith("suppress") for l in _labels(no_rule["redundant-refusal-experts"]))


def test_a_weak_suppression_is_weak_scale_with_stronger_candidates():
    from checks.diagnosis import Evidence, diagnose

    ev = Evidence(refusal_experts=((1, 6), (1, 7)), moe_layers=(1,), suppress_strengths=(0.5, 1.0, 1.5, 3.0),
                  suppress_unit="sigmoid score", suppressed={"experts": [[1, 6]], "strength": 1.0})
    c = next(c for c in diagnose(ev)["causes"] if c.id == "weak-scale")
    strengths = [cand["patch"]["suppress"]["strength"] for cand in c.fix["candidates"]]
    assert strengths[:2] == [1.5, 3.0]
    assert c.fix["candidates"][-1]["patch"]["suppress"]["experts"] == [[1, 6], [1, 7]]  # the refusal expert left out joins


def test_the_suppress_patch_turns_off_router_projection():
    from audit.intent.fixes import apply_patch, config_yaml

    cfg = AblationConfig.from_dict({"components": ["router", "experts_down"], "ablate": [{"layer": 1}, {"layer": 2}]})
    new = apply_patch(cfg, {"suppress": {"experts": [[2, 3], [1, 5]], "strength": 1.5}})
    assert new.router_mode == "suppress" and new.suppressed() == {1: [5], 2: [3]} and new.suppress_strength == 1.5
    again = AblationConfig.from_dict(__import__("yaml").safe_load(config_yaml(new)))
    assert again.to_dict() == new.to_dict()
    empty = apply_patch(AblationConfig([], (), source="nothing"), {"suppress": {"experts": [[1, 5]], "strength": 2.0}})
    assert empty.entries == [] and empty.suppressed() == {1: [5]}


def test_ablate_cli_auto_takes_the_prompts_given_and_says_so(experts_organism, tmp_path, capsys):
    """`audit ablate --harmful F --harmless G` with suppress_experts: auto: the routing check runs on those prompts (the
    manifest records them and how many), the planted experts are still found; the flags without auto are refused."""
    from audit.cli import main

    path, pairs, dirs = experts_organism("glm4_moe")
    dirs_file = dirs.save(tmp_path / "dirs.safetensors")
    for kind in ("harmful", "harmless"):
        lines = (path / "prompts" / f"train_{kind}.txt").read_text().splitlines()[:48]
        (tmp_path / f"{kind}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "auto.yaml").write_text("router_mode: suppress\nsuppress_experts: auto\nsuppress_strength: 3.0\n")
    args = ["ablate", str(path), "--config", str(tmp_path / "auto.yaml"), "--directions", str(dirs_file), "--quiet",
            "--harmful", str(tmp_path / "harmful.txt"), "--harmless", str(tmp_path / "harmless.txt")]
    assert main([*args, "-o", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "ablation-manifest.json").read_text())
    assert m["config"]["suppress_experts"] == pairs
    assert all(r["reason"].startswith("auto: routing check") for r in m["router_suppressed"])
    assert m["suppress_auto"]["n_harmful"] == m["suppress_auto"]["n_harmless"] == 48
    assert m["suppress_auto"]["prompts"] == {"harmful": str(tmp_path / "harmful.txt"), "harmless": str(tmp_path / "harmless.txt")}
    (tmp_path / "listed.yaml").write_text("router_mode: suppress\nsuppress_experts: [[1, 2]]\nsuppress_strength: 3.0\n")
    bad = ["ablate", str(path), "--config", str(tmp_path / "listed.yaml"), "--directions", str(dirs_file), "--quiet",
           "--harmful", str(tmp_path / "harmful.txt"), "-o", str(tmp_path / "out2")]
    assert main(bad) == 2
    assert "suppress_experts: auto" in capsys.readouterr().err and not (tmp_path / "out2").exists()
