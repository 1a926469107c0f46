"""Damage that KL misses, and controls, end to end on the organism (issue 29).

The glm4_moe base organism, ablated with our ablation: every residual writer of every layer (sound), and the same at
scale 12 (damaged). Capability items are the organism's own held-out harmless questions as multiple choice
(audit/organisms/items.py). The damaged ablation loses points and fails the capability check with the drop and its
interval; the sound one keeps them; the random-direction control leaves refusal in place with its KL beside the real
edit's; the base audited against itself (--control) passes with zero edits.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("audit.organisms.build")

ALL_WRITERS = ["embed", "attn_out", "mlp_down", "experts_down", "shared_down"]


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    """(path, info, directions, items file) of the glm4_moe base organism, measured once per module."""
    from audit.forward.measure import measure_directions
    from audit.model.directory import ModelDir
    from audit.model.prompts import load_prompts
    from audit.organisms.build import cached_organism, read_meta
    from audit.organisms.items import write_items

    path = cached_organism("glm4_moe", "base", 0)
    dirs = measure_directions(ModelDir(path), load_prompts(str(path / "prompts" / "train_harmful.txt"), "harmful"),
                              load_prompts(str(path / "prompts" / "train_harmless.txt"), "harmless"))
    items = write_items(path, tmp_path_factory.mktemp("items") / "organism-facts.jsonl")
    return path, read_meta(path), dirs, items


def _ablate(organism, out: Path, scale: float = 1.0) -> Path:
    from audit.ablation.ablate import ablate
    from audit.intent.config import AblationConfig

    path, info, dirs, _ = organism
    cfg = AblationConfig.from_dict({"components": ALL_WRITERS, "ablate": [{"layer": l, "measurement": info["separating_index"], "scale": scale}
                                                                          for l in range(4)]})
    ablate(path, cfg, out, directions=dirs)
    return out


def _audit(organism, model_dir, out: Path, **kw) -> dict:
    from audit.pipeline.run import RunOptions, run_audit

    return run_audit(RunOptions(model_dir=str(model_dir), out=str(out), limit=48, max_new_tokens=24, quiet=True, capability=str(organism[3]), **kw))


def _row(res, name):
    return next(t for t in res["gate"]["thresholds"] if t["name"] == name)


def test_a_damaged_ablation_loses_points_and_its_control_keeps_refusal(organism, tmp_path):
    res = _audit(organism, _ablate(organism, tmp_path / "abl", scale=12.0), tmp_path / "report")
    cap = res["checks"]["capability"]
    drop = next(f for f in cap["findings"] if f["code"] == "capability-drop")
    assert cap["status"] == "fail" and drop["severity"] == "fail" and drop["value"] > 0.5, drop["message"]
    assert drop["evidence"]["lo"] > 0.3 and "95% CI" in drop["message"] and drop["evidence"]["lost_examples"]
    assert _row(res, "max_capability_drop")["state"] == "fail" and res["verdict"] == "fail"
    assert cap["data"]["tables"]["accuracy"]["rows"][0][0] == "organism-facts"  # the report's table: drop per task with its interval
    # the answers loop: the health check says so with examples, before vs after
    health = res["checks"]["health"]
    loops = health["data"]["rates"]["loop_at_limit.harmless"]
    assert health["status"] == "warn" and loops["abl"]["rate"] > 0.5 and loops["base"]["rate"] == 0 and health["data"]["examples"]
    # the same edits along a random direction orthogonal to r: refusal stays; its KL is reported beside the real edit's
    ctl = res["checks"]["controls"]["data"]
    assert ctl["random_direction"]["refusal"] >= 0.8 and ctl["random_direction"]["max_abs_cos_to_r"] < 1e-6
    after = res["checks"]["refusal"]["data"]["after"]  # the judge may leave every looping answer undecided: then no rate to compare
    if after["n"]:
        assert ctl["refusal_removed_by_r"] >= 0.9 and ctl["specificity"] >= 0.7
    else:
        assert ctl["specificity"] is None and res["checks"]["controls"]["findings"][0]["code"] == "control-unmeasured"
    assert ctl["kl_control"] < ctl["kl_ablated"] and ctl["kl_beyond_control"] == pytest.approx(ctl["kl_ablated"] - ctl["kl_control"])
    assert (tmp_path / "report" / "report.html").read_text().count("Random-direction control") >= 1
    import json

    import jsonschema

    schema = json.loads((Path(__import__("checks").__file__).parent / "schemas" / "results.schema.json").read_text())
    for name in ("capability", "health", "multiturn", "controls"):  # each new check is a check as results.json defines one
        jsonschema.validate(res["checks"][name], {"$defs": schema["$defs"], **schema["$defs"]["check"]})


def test_a_sound_ablation_keeps_its_points_and_the_effect_is_r_s(organism, tmp_path):
    res = _audit(organism, _ablate(organism, tmp_path / "abl"), tmp_path / "report")
    assert res["verdict"] == "pass", res["headline"]
    cap = res["checks"]["capability"]["data"]["tasks"]["organism-facts"]
    assert cap["above_chance"] and cap["acc_norm"]["before"] >= 0.95 and cap["acc_norm"]["drop"] <= 0.02
    assert _row(res, "max_capability_drop")["state"] == "pass"
    ctl = res["checks"]["controls"]
    assert ctl["status"] == "pass" and ctl["data"]["random_direction"]["refusal"] >= 0.9 and ctl["data"]["specificity"] >= 0.9
    assert res["checks"]["health"]["status"] == "pass"
    turn2 = res["checks"]["multiturn"]
    assert set(turn2["data"]["turn2"]) == {"harmful", "harmless"} and turn2["data"]["turn2"]["harmless"]["after"]["n"] == 16
    assert any(s["set"] == "harmful, turn 2" for s in turn2["data"]["samples"])


def test_the_base_against_itself_is_a_noop_control(organism, tmp_path, capsys):
    from audit.cli import main
    from checks.errors import AuditError

    path = organism[0]
    with pytest.raises(AuditError, match="are the same directory: there is no ablation to audit.*or --control"):
        _audit(organism, path, tmp_path / "r0", base=str(path))
    assert main(["run", str(path), "--base", str(path), "-o", str(tmp_path / "r1")]) == 2
    assert "--control to audit the base" in capsys.readouterr().err and not (tmp_path / "r1").exists()
    res = _audit(organism, path, tmp_path / "r2", base=str(path), control=True)
    assert res["verdict"] == "pass" and res["headline"].startswith("No-op control passes"), res["headline"]
    noop = res["checks"]["noop"]["data"]
    assert noop == {"changed_tensors": 0, "kl_max": 0.0, "answers_changed": 0}
    states = {t["name"]: t["state"] for t in res["gate"]["thresholds"]}
    assert states["check:noop"] == "pass" and states["max_refusal_after"] == "not-applicable" and states["max_kl"] == "pass"
    assert res["checks"]["controls"]["status"] == "skip" and res["run"]["control"] == "noop"
    assert res["checks"]["weights"]["status"] == "skip" and "no-op control" in res["checks"]["weights"]["summary"]  # junit shows no failure
