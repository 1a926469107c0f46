"""`audit run` end to end on the organism: verdicts, causes proven by applying their fix, exit codes.

Each scenario ablates an organism variant incompletely with our ablation, audits it with
``--apply-fix`` and checks the claim the report makes: the top cause's simulated fix predicts the
measured result of really applying it, and applying it passes. Where the variant's carrier is
known (organism.json), the top cause must name it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import serve_model

LIMIT = 48  # prompts per set: keeps each audit to seconds; Wilson intervals stay ~ +-0.07 at 0 or 1


@pytest.fixture(scope="session")
def organism():
    """organism(variant) -> (path, info, Directions) for glm4_moe, built once per cache and measured once per session."""
    from audit.forward.measure import measure_directions
    from audit.model.directory import ModelDir
    from audit.organisms.build import cached_organism, read_meta
    from audit.model.prompts import load_prompts

    cache = {}

    def get(variant: str = "base"):
        if variant not in cache:
            path = cached_organism("glm4_moe", variant, 0)
            info = read_meta(path)
            dirs = measure_directions(ModelDir(path), load_prompts(str(path / "prompts" / "train_harmful.txt"), "harmful"),
                                      load_prompts(str(path / "prompts" / "train_harmless.txt"), "harmless"))
            cache[variant] = (path, info, dirs)
        return cache[variant]

    return get


def _ablate(organism, tmp_path, variant, components, layers, measurement=None, scale=1.0):
    from audit.ablation.ablate import ablate
    from audit.intent.config import AblationConfig

    path, info, dirs = organism(variant)
    m = info["separating_index"] if measurement is None else measurement
    cfg = AblationConfig.from_dict({"components": components, "ablate": [{"layer": l, "measurement": m, "scale": scale} for l in layers]})
    out = tmp_path / f"abl-{variant}"
    ablate(path, cfg, out, directions=dirs)
    return out


def _audit(model_dir, tmp_path, apply_fix=True, limit=LIMIT, **kw):  # noqa: D103
    from audit.pipeline.run import RunOptions, run_audit

    # damage beyond KL has its own tests (test_damage_beyond_kl), the refinement of the fix search its own (test_fix): not paid per scenario
    kw = {"capability": "none", "multi_turn": 0, "fix_budget": 30, **kw}
    opts = RunOptions(model_dir=str(model_dir), out=str(tmp_path / "report"), limit=limit, max_new_tokens=24, quiet=True,
                      apply_fix=str(tmp_path / "fixed") if apply_fix else None, **kw)
    return run_audit(opts)


ALL_WRITERS = ["embed", "attn_out", "mlp_down", "experts_down", "shared_down"]
ALL_LAYERS = [0, 1, 2, 3]
SCENARIOS = {  # name: (variant, components, layers, measurement (None: the organism's separating layer), scale, expected top cause)
    "guide-band": ("base", ["experts_down", "router", "shared_down", "attn_out"], [1, 2], None, 1.0, "layer-coverage"),
    "shared-left-out": ("shared", ["embed", "attn_out", "mlp_down", "experts_down"], ALL_LAYERS, None, 1.0, "shared-experts-not-ablated"),
    "experts-left-out": ("experts", ["embed", "attn_out", "mlp_down", "shared_down"], ALL_LAYERS, None, 1.0, "routed-experts-not-ablated"),
    "late-narrow-band": ("late", ALL_WRITERS, [0, 1], None, 1.0, "layer-coverage"),
    "wrong-index": ("late", ALL_WRITERS, ALL_LAYERS, 1, 1.0, "direction-mismatch"),
    # the final norm's index: on the committed base organism it removes refusal (100% -> 4%) but moves the harmless answers
    # (KL 2.7 nats): the damage is the cause, and its fix measures at a better index (measured; an older build of this
    # organism kept refusing here, and the test then expected direction-mismatch first)
    "final-norm-index": ("base", ALL_WRITERS, ALL_LAYERS, 4, 1.0, ("model-damaged",)),
    "half-scale": ("base", ALL_WRITERS, ALL_LAYERS, None, 0.5, "weak-scale"),
}


def _check_proven(res):
    """The report's claim holds: the top fix, really applied, passes, and its simulation predicted that."""
    top = res["causes"][0]
    applied = res["applied_fix"]
    assert applied["cause"] == top["id"]
    assert applied["verdict"] == "pass" and applied["refusal_rate"] <= 0.10, applied
    sim = top["simulated"]
    assert sim is not None and abs(sim["refusal_rate"] - applied["refusal_rate"]) <= 0.10, (sim, applied)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_incomplete_ablation_is_diagnosed_and_the_fix_proven(organism, tmp_path, name):
    variant, comps, layers, measurement, scale, expected = SCENARIOS[name]
    res = _audit(_ablate(organism, tmp_path, variant, comps, layers, measurement, scale), tmp_path)
    assert res["verdict"] == "fail", res["headline"]
    expected = (expected,) if isinstance(expected, str) else expected
    assert res["causes"][0]["id"] == expected[0], [(c["id"], c["confidence"]) for c in res["causes"]]
    assert set(expected) <= {c["id"] for c in res["causes"] if not c["demoted"]}, [(c["id"], c["demoted"]) for c in res["causes"]]
    _check_proven(res)
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "applied-fix" / "report.html").is_file()


def test_guide_fix_for_expert_inputs_is_simulated_and_demoted(organism, tmp_path):
    """The guide's first suggestion (ablate gate/up) is tested, not believed: on the base organism it changes nothing."""
    res = _audit(_ablate(organism, tmp_path, "base", ["experts_down", "router", "shared_down", "attn_out"], [1, 2]), tmp_path, apply_fix=False)
    inputs = next(c for c in res["causes"] if c["id"] == "expert-inputs-not-ablated")
    assert inputs["demoted"] and inputs["simulated"]["refusal_rate"] >= 0.9
    assert res["causes"].index(inputs) > 0


def test_nothing_matched_is_keys_not_matched(organism, tmp_path):
    """Another tool "ablated" with a config whose patterns matched nothing: the copy is bit-identical to the base."""
    import shutil

    path, info, dirs = organism("base")
    shutil.copytree(path, tmp_path / "abl")
    dirs.save(tmp_path / "dirs.safetensors")
    (tmp_path / "cfg.yaml").write_text("measurements: dirs.safetensors\ncomponents: [embed, attn_out, mlp_down, experts_down, shared_down]\n"
                                       f"ablate:\n  - {{layer: '0-3', measurement: {info['separating_index']}}}\n")
    res = _audit(tmp_path / "abl", tmp_path, base=str(path), config=str(tmp_path / "cfg.yaml"))
    assert res["verdict"] == "fail" and res["causes"][0]["id"] == "keys-not-matched"
    _check_proven(res)


def test_untouched_component_without_r_is_not_blamed(organism, tmp_path):
    """Attention left out of an otherwise complete ablation: on the base organism it writes little r, so the audit passes and says why."""
    res = _audit(_ablate(organism, tmp_path, "base", ["embed", "mlp_down", "experts_down", "shared_down"], ALL_LAYERS), tmp_path, apply_fix=False)
    assert res["verdict"] == "pass", res["headline"]
    assert any(nb["component"].startswith("attention") for nb in res["not_blamed"])
    assert not any(c["id"] == "attention-not-ablated" for c in res["causes"])


def test_sound_ablation_passes_without_false_alarm(organism, tmp_path):
    res = _audit(_ablate(organism, tmp_path, "base", ALL_WRITERS, [0, 1, 2, 3]), tmp_path, apply_fix=False)
    assert res["verdict"] == "pass", (res["headline"], res["gate"])
    assert all(c["confidence_label"] == "low" for c in res["causes"]), [(c["id"], c["confidence"]) for c in res["causes"]]
    assert res["simulation"] is None  # nothing to prove: no time spent simulating


def test_cli_exit_codes(organism, tmp_path):
    abl = _ablate(organism, tmp_path, "base", ["attn_out"], [1])
    cmd = [sys.executable, "-m", "audit.cli", "run", str(abl), "-o", str(tmp_path / "r"), "--limit", "16", "--max-new-tokens", "16", "--no-simulate"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]  # gate failed
    assert "verdict: FAIL" in r.stdout
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["verdict"] == "fail" and doc["causes"]
    assert doc["run"]["judge"]["judge"] == "rules" and doc["run"]["judge"]["accuracy"] >= 0.93  # the judge and its measured accuracy
    assert "refusals judged by rules" in (tmp_path / "r" / "report.html").read_text()
    bad = subprocess.run(cmd + ["--judge", "magic", "--force"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--judge 'magic'" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    gate = tmp_path / "gate.yaml"
    gate.write_text("max_refusal: 0.1\n")
    bad = subprocess.run(cmd[:-1] + ["--gate", str(gate), "--force"], capture_output=True, text=True)
    assert bad.returncode == 2 and "gate.yaml: unknown key(s) 'max_refusal'" in bad.stderr


def test_no_output_written_into_inputs(organism, tmp_path):
    from checks.errors import AuditError

    abl = _ablate(organism, tmp_path, "base", ALL_WRITERS, [0, 1, 2, 3])
    before = sorted(p.name for p in Path(abl).iterdir())
    from audit.pipeline.run import RunOptions, run_audit

    with pytest.raises(AuditError, match="lies inside the input"):
        run_audit(RunOptions(model_dir=str(abl), out=str(abl / "report"), limit=8, max_new_tokens=8, quiet=True, simulate=False))
    assert sorted(p.name for p in Path(abl).iterdir()) == before
    # -o a folder that *holds* the inputs, with --force: refused too, nothing deleted (issue 15)
    for dest in (tmp_path, Path(abl).parent):
        snapshot = sorted(str(p) for p in dest.rglob("*"))
        with pytest.raises(AuditError, match="contains the input"):
            run_audit(RunOptions(model_dir=str(abl), out=str(dest), force=True, limit=8, max_new_tokens=8, quiet=True, simulate=False))
        assert sorted(str(p) for p in dest.rglob("*")) == snapshot


def test_both_generation_passes_on_servers_give_the_same_audit(organism, tmp_path):
    """The base and the ablated model each served by `transformers serve` (two processes side by side, as with vLLM):
    every completion comes from a server and the audit is the one local generation gives (the same answers, word for
    word; test_generate checks a server against local generation token for token)."""
    path, info, dirs = organism("base")
    abl = _ablate(organism, tmp_path, "base", ALL_WRITERS, ALL_LAYERS)
    n = 24
    with serve_model(path, dtype="bfloat16") as base_url, serve_model(abl, dtype="bfloat16") as abl_url:
        res_server = _audit(abl, tmp_path / "server", apply_fix=False, limit=n, server=abl_url, served_model=str(abl), base_server=base_url,
                            served_base_model=str(path))
        # the servers swapped by mistake: the base's answers (--server) do not open with the ablated model's greedy first token
        from checks.errors import AuditError

        with pytest.raises(AuditError, match=rf"the server at {base_url}/v1 \(--server\) does not seem to serve the model.*harmful prompts"):
            _audit(abl, tmp_path / "swapped", apply_fix=False, limit=n, server=base_url, served_model=str(path), base_server=abl_url,
                   served_base_model=str(abl))
    res_local = _audit(abl, tmp_path / "local", apply_fix=False, limit=n)
    for key in ("before", "after", "harmless_after", "harmless_before"):
        assert res_server["checks"]["refusal"]["data"][key] == res_local["checks"]["refusal"]["data"][key], key
    answers = lambda res: sorted((x["when"], x["set"], x["prompt"], x["completion"]) for x in res["checks"]["refusal"]["data"]["samples"])
    assert answers(res_server) == answers(res_local)
    assert res_server["checks"]["refusal"]["data"]["before"]["rate"] >= 0.95 and res_server["checks"]["refusal"]["data"]["after"]["rate"] <= 0.05
    assert res_server["verdict"] == res_local["verdict"] == "pass"
    assert [c["id"] for c in res_server["causes"]] == [c["id"] for c in res_local["causes"]]
    run = res_server["run"]
    assert run["completions_from"].startswith(abl_url) and run["base_completions_from"].startswith(base_url)
    assert set(run["servers"]) == {"abl", "base"} and all(v["template"].startswith("not checked") for v in run["servers"].values())
    assert all(a["agree"] == a["of"] for v in run["servers"].values() for a in v["first_token_agreement"].values())


def test_offloaded_to_disk_gives_the_same_audit(organism, tmp_path, capsys):
    """`--device auto` with a memory budget far below the model: accelerate puts layers on disk (the device map says so),
    the probes, generation and the simulated fixes' hooks run on the offloaded model, and the audit is the plain CPU run's.
    The offload folder is ours, beside the inputs, and gone afterwards."""
    abl = _ablate(organism, tmp_path, "experts", ["embed", "attn_out", "mlp_down", "shared_down"], ALL_LAYERS)
    off = tmp_path / "offload"
    n = 24
    cmd = [sys.executable, "-m", "audit.cli", "run", str(abl), "-o", str(tmp_path / "r"), "--limit", str(n), "--max-new-tokens", "24",
           "--device", "auto", "--max-memory", "cpu=300KB", "--offload-folder", str(off)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-3000:]
    res_off = json.loads((tmp_path / "r" / "results.json").read_text())
    placement = res_off["run"]["placement"]
    assert len(placement) == 2 and all(p["dtype"] == "bfloat16" and p["devices"].get("disk", 0) > 0 for p in placement.values()), placement
    assert off.is_dir() and not any(off.iterdir())  # the scratch folders were removed
    _audit(abl, tmp_path / "plain", apply_fix=False, limit=n)
    res = json.loads((tmp_path / "plain" / "report" / "results.json").read_text())  # both as written (rounded alike)
    assert res["run"]["placement"] and all(not p["devices"] for p in res["run"]["placement"].values())
    assert res_off["verdict"] == res["verdict"] == "fail"
    assert [c["id"] for c in res_off["causes"]] == [c["id"] for c in res["causes"]] and res["causes"][0]["id"] == "routed-experts-not-ablated"
    for key in ("before", "after", "harmless_before", "harmless_after"):
        assert res_off["checks"]["refusal"]["data"][key] == res["checks"]["refusal"]["data"][key], key
    assert [c["simulated"]["refusal_rate"] for c in res_off["causes"]] == [c["simulated"]["refusal_rate"] for c in res["causes"]]
    from audit.cli import main

    for extra, message in ((["--max-memory", "cpu=lots"], "'lots' is not a size"),
                           (["--offload-folder", str(abl / "off")], "scratch files never go into an input"),
                           (["--device", "cpu"], "pass --device auto with them")):
        assert main(cmd[3:] + extra + ["--force"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (abl / "off").exists()


def test_servers_that_are_down_or_wrong_are_exit_2_before_any_model_loads(organism, tmp_path, capsys):
    """`audit run` (the CLI's own entry point) with a server that is down or serves other names: exit 2, the URL and what
    to check in the message, no traceback, nothing written, and no model loaded first."""
    import socket

    from fake_openai import Behaviour, fake_server

    from audit.cli import main

    abl = _ablate(organism, tmp_path, "base", ALL_WRITERS, ALL_LAYERS)
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    args = ["run", str(abl), "-o", str(tmp_path / "r"), "--limit", "8", "--max-new-tokens", "16", "--no-simulate"]

    def run(*extra) -> str:
        assert main(args + list(extra)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "directions ..." not in err  # stopped in the inputs stage
        return err

    assert f"cannot reach the server at http://127.0.0.1:{port}/v1 (--base-server): connection refused" in run("--base-server", f"http://127.0.0.1:{port}")
    with fake_server(Behaviour(models=["someone-else"])) as url:
        err = run("--server", url)
        assert f"the server at {url}/v1 (--server) does not serve a model named {str(abl)!r}" in err and "--served-model" in err
        err = run("--server", url, "--served-model", "someone-else", "--base-server", url, "--served-base-model", "someone-else")
        assert "cannot be the base and the ablated model" in err
    assert "--served-base-model 'x' names a served model, but no --base-server URL" in run("--served-base-model", "x")
    assert not (tmp_path / "r").exists()


def test_broken_ablation_fails_closed(organism, tmp_path):
    """One layer's o_proj all NaN (issue 15): once PASS with "refusal 100% -> nan%"; now a failed verdict that says why."""
    import torch

    from audit.model.directory import ModelDir

    from audit.model.shards import write_shard

    abl = Path(_ablate(organism, tmp_path, "base", ALL_WRITERS, ALL_LAYERS))
    md = ModelDir(abl)
    key = "model.layers.1.self_attn.o_proj.weight"
    shard = md.tensors[key].shard
    tensors = [(n, torch.full_like(t, float("nan")) if n == key else t.clone()) for n, t in md.iter_tensors() if md.tensors[n].shard == shard]
    meta = md.shard_meta[shard]
    md.close()
    write_shard(abl / shard, tensors, meta)
    res = _audit(abl, tmp_path, apply_fix=False, simulate=False)
    assert res["verdict"] == "fail", res["headline"]
    assert "nan%" not in res["headline"] and "not measurable" in res["headline"], res["headline"]
    failed = {t["name"] for t in res["gate"]["thresholds"] if t["passed"] is False}
    assert "check:weights" in failed and "max_refusal_after" in failed, res["gate"]
    assert any(f["code"] == "nan-inf" for f in res["checks"]["weights"]["findings"])


def test_one_model_resident_at_a_time(organism, tmp_path, monkeypatch):
    """When the base loads, nothing keeps the ablated model alive (no backend, hook, tap or cache): it is collected."""
    import gc
    import weakref

    import audit.pipeline.run as run

    loaded, alive_at_load = [], []
    real = run.load_model

    def spy(md, opts, ctx=None, inputs=()):
        gc.collect()
        alive_at_load.append([w() is not None for w in loaded])
        m = real(md, opts, ctx, inputs)
        loaded.append(weakref.ref(m))
        return m

    monkeypatch.setattr(run, "load_model", spy)
    abl = _ablate(organism, tmp_path, "base", ["attn_out"], [1])
    res = _audit(abl, tmp_path, apply_fix=False)  # fails: the simulator runs on the base too
    assert res["verdict"] == "fail" and res["simulation"] is not None
    assert alive_at_load == [[], [False]], alive_at_load
    assert [p["dtype"] for p in res["run"]["placement"].values()] == ["bfloat16", "bfloat16"]  # the stored dtype, not float32


def _foreign(ablated: Path, dest: Path) -> Path:
    """The ablation as another tool leaves it: the model files without our manifest and directions file."""
    import shutil

    shutil.copytree(ablated, dest, ignore=shutil.ignore_patterns("ablation-manifest.json", "directions.safetensors"))
    return dest


def test_a_sound_foreign_ablation_passes_and_required_intent_fails_it_closed(organism, tmp_path):
    """Every residual writer of every layer ablated by "another tool" (no manifest, no YAML): behaviour decides and it passes,
    exit 0, forbid_unintended not applicable with the reason; a gate with required: [forbid_unintended] fails it closed, exit 1
    (issue 25)."""
    path, info, dirs = organism("base")
    abl = _foreign(_ablate(organism, tmp_path, "base", ALL_WRITERS, ALL_LAYERS), tmp_path / "foreign")
    base_cmd = [sys.executable, "-m", "audit.cli", "run", str(abl), "--base", str(path), "--limit", "24", "--max-new-tokens", "20"]
    r = subprocess.run(base_cmd + ["-o", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["verdict"] == "pass" and doc["run"]["intent_source"] == "inferred" and not doc["causes"]
    row = next(t for t in doc["gate"]["thresholds"] if t["name"] == "forbid_unintended")
    assert row["state"] == "not-applicable" and "no intent was stated" in row["message"]
    assert not [f for f in doc["checks"]["weights"]["findings"] if f["code"] == "intended-untouched"]  # nothing invented
    assert (tmp_path / "r" / "reached-config.yaml").is_file() and doc["reached_config"]
    gate = tmp_path / "gate.yaml"
    gate.write_text("required: [forbid_unintended]\n")
    r = subprocess.run(base_cmd + ["-o", str(tmp_path / "r2"), "--gate", str(gate)], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((tmp_path / "r2" / "results.json").read_text())
    row = next(t for t in doc["gate"]["thresholds"] if t["name"] == "forbid_unintended")
    assert row["state"] == "not-measured" and row["passed"] is False and "no intent was stated" in row["message"]
    assert doc["diagnosis"]["status"] == "unexplained" and "likely" not in doc["headline"].lower()  # no cause invented for a gate rule
    # the run's reached-config.yaml, given back as --config, is an intent the model is then held to (and meets)
    r = subprocess.run(base_cmd + ["-o", str(tmp_path / "r3"), "--gate", str(gate), "--config", str(tmp_path / "r" / "reached-config.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_an_overshooting_sound_ablation_passes_with_the_flipped_r_as_a_warning(organism, tmp_path):
    """W - 2 r r^T W on every writer of every layer: r reflected, refusal gone, harmless answers intact, so it passes; the
    projection check warns with the sign and size of the r left, and neither weak-scale nor scale-overshoot is named
    (issue 25; at scale 3 this organism's harmless answers break: that is damage, and it fails)."""
    path, info, dirs = organism("base")
    abl = _foreign(_ablate(organism, tmp_path, "base", ALL_WRITERS, ALL_LAYERS, scale=2.0), tmp_path / "foreign")
    res = _audit(abl, tmp_path, apply_fix=False, base=str(path))
    assert res["verdict"] == "pass", (res["headline"], [t for t in res["gate"]["thresholds"] if t["passed"] is False])
    refl = [f for f in res["checks"]["projection"]["findings"] if f["code"] == "reflected"]
    assert refl and refl[0]["severity"] == "warn" and refl[0]["value"] == pytest.approx(-1.0, abs=0.05) and "x r.W" in refl[0]["message"]
    assert res["checks"]["projection"]["status"] == "warn"
    assert not {c["id"] for c in res["causes"]} & {"weak-scale", "scale-overshoot"}
