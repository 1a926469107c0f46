"""What a verdict is about: input hashes (Hugging Face cache blob names reused), `audit verify` and `audit run --reproduce`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

LIMIT = 24


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_hashes_are_sha256_and_hf_cache_blob_names_are_reused(tmp_path):
    """A snapshot file linking to blobs/<sha256> is taken by its name (not read); any other file is hashed; a file listed under
    two roles is read once; `verify` (reuse_hf=False) reads the blob and catches one whose content is not its name."""
    from audit.model.hashes import hash_inputs

    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    data = b"weights" * 1000
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    (snap / "model.safetensors").symlink_to(Path("../../blobs") / digest)
    (blobs / "0123456789abcdef0123456789abcdef01234567").write_bytes(b"{}")  # a small file: a git SHA-1 name, hashed
    (snap / "config.json").symlink_to(Path("../../blobs/0123456789abcdef0123456789abcdef01234567"))
    (tmp_path / "gate.yaml").write_text("max_kl: 0.5\n")
    entries = [("model", snap, "model.safetensors"), ("model", snap, "config.json"), ("gate", tmp_path, "gate.yaml"), ("copy", snap, "config.json")]
    h = hash_inputs(entries)
    by = {(f["role"], f["name"]): f for f in h["files"]}
    assert by["model", "model.safetensors"]["source"] == "hf-cache-blob" and by["model", "model.safetensors"]["sha256"] == digest
    assert by["model", "config.json"]["source"] == "computed" and by["model", "config.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()
    assert by["gate", "gate.yaml"]["sha256"] == _sha(tmp_path / "gate.yaml")
    assert h["bytes_hashed"] == 2 + len("max_kl: 0.5\n") and len(h["files"]) == 4
    (blobs / digest).write_bytes(data + b"!")  # the blob no longer holds what its name says
    assert hash_inputs(entries[:1])["files"][0]["sha256"] == digest  # the name is taken on trust in a run...
    assert hash_inputs(entries[:1], reuse_hf=False)["files"][0]["sha256"] != digest  # ...and verify reads it


def test_the_ablation_manifest_records_its_inputs(tiny_model, tmp_path):
    from audit.ablation.ablate import ablate
    from audit.intent.config import load_config
    from audit.intent.directions import Directions

    import torch

    base = tiny_model("qwen3_moe")
    d = Directions(torch.randn(4, 32), torch.randn(4, 32), torch.randn(4, 32))
    d.save(tmp_path / "dirs.safetensors")
    (tmp_path / "cfg.yaml").write_text("measurements: dirs.safetensors\ncomponents: [attn_out]\nablate:\n  - {layer: 1, measurement: 1}\n")
    m = ablate(base, load_config(tmp_path / "cfg.yaml"), tmp_path / "out")
    files = {(f["role"], f["name"]): f["sha256"] for f in m["inputs"]["files"]}
    assert files["base", "model.safetensors"] == _sha(base / "model.safetensors")
    assert files["config", "cfg.yaml"] == _sha(tmp_path / "cfg.yaml") and files["directions", "dirs.safetensors"] == _sha(tmp_path / "dirs.safetensors")
    assert m["timings"]["hash_s"] >= 0


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory):
    """An `audit run` of a sound organism ablation, written to disk: (folder, results, ablated model)."""
    from audit.ablation.ablate import ablate
    from audit.forward.measure import measure_directions
    from audit.intent.config import AblationConfig
    from audit.model.directory import ModelDir
    from audit.model.prompts import load_prompts
    from audit.organisms.build import cached_organism, read_meta
    from audit.pipeline.run import RunOptions, run_audit

    root = tmp_path_factory.mktemp("verify")
    path = cached_organism("glm4_moe", "base", 0)
    dirs = measure_directions(ModelDir(path), load_prompts(str(path / "prompts" / "train_harmful.txt"), "harmful"),
                              load_prompts(str(path / "prompts" / "train_harmless.txt"), "harmless"))
    cfg = AblationConfig.from_dict({"components": ["embed", "attn_out", "mlp_down", "experts_down", "shared_down"],
                                    "ablate": [{"layer": l, "measurement": read_meta(path)["separating_index"]} for l in range(4)]})
    abl = root / "abl"
    ablate(path, cfg, abl, directions=dirs)
    (root / "gate.yaml").write_text("max_kl: 0.5\nmax_refusal_after: 0.2\n")
    res = run_audit(RunOptions(model_dir=str(abl), out=str(root / "run"), limit=LIMIT, max_new_tokens=16, quiet=True, simulate=False,
                               gate=str(root / "gate.yaml")))
    return root / "run", res, abl


def test_run_records_every_input_and_verify_passes_then_fails_on_one_byte(organism_run, tmp_path, capsys):
    from audit.cli import main

    out, res, abl = organism_run
    roles = {f["role"] for f in res["inputs"]["files"]}
    assert {"model", "base", "gate", "prompts:harmful", "prompts:harmless"} <= roles, roles
    assert "hashes" in res["run"]["stages"] and res["run"]["gate_config"]["limits"]["max_kl"] == 0.5
    rec = {(f["role"], f["name"]): f["sha256"] for f in res["inputs"]["files"]}
    assert rec["model", "model.safetensors"] == _sha(abl / "model.safetensors")
    assert main(["verify", str(out / "results.json")]) == 0
    assert "verify: PASS" in capsys.readouterr().out
    # a copy of the model with one byte changed, verified in place of the recorded one
    copy = tmp_path / "copy"
    shutil.copytree(abl, copy)
    assert main(["verify", str(out), str(copy)]) == 0
    capsys.readouterr()
    shard = copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out), str(copy)]) == 1
    text = capsys.readouterr().out
    assert "CHANGED  model" in text and str(shard) in text and "NOT about these bytes" in text and "verify: FAIL" in text
    assert main(["verify", str(tmp_path / "nope.json")]) == 2


def test_verify_reevaluates_the_gate_on_the_recorded_evidence(organism_run, tmp_path, capsys):
    """The bytes unchanged, but the recorded refusal rate edited above the recorded gate's limit: verify fails on the gate."""
    from audit.cli import main

    out, res, _ = organism_run
    doc = json.loads((out / "results.json").read_text())
    doc["checks"]["refusal"]["data"]["after"].update(rate=0.5, k=12, n=24)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert main(["verify", str(tmp_path / "results.json")]) == 1
    text = capsys.readouterr().out
    assert "evaluated again on the recorded checks: FAIL (recorded verdict: pass)" in text
    del doc["inputs"]
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert main(["verify", str(tmp_path / "results.json")]) == 2


def test_reproduce_reruns_the_recorded_passes_within_their_intervals(organism_run, tmp_path, capsys):
    from audit.cli import main

    out, res, _ = organism_run
    assert main(["run", "--reproduce", str(out / "results.json"), "-o", str(tmp_path / "again")]) == 0
    text = capsys.readouterr().out
    assert "reproduction: PASS" in text
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    rep = again["reproduction"]
    assert rep["passed"] and rep["inputs_changed"] == [] and all(r["within"] for r in rep["rows"])
    names = {r["name"] for r in rep["rows"]}
    assert {"refusal on harmful prompts, ablated", "KL on harmless prompts, first answer token", "verdict"} <= names
    assert again["run"]["options"]["limit"] == LIMIT and again["verdict"] == res["verdict"]
    # the recorded numbers changed (another run's claim): the re-run falls outside their intervals
    doc = json.loads((out / "results.json").read_text())
    doc["checks"]["refusal"]["data"]["after"].update(rate=0.5, lo=0.3, hi=0.7)
    doc["checks"]["damage"]["data"]["first_token"]["per_prompt"] = [2.0] * LIMIT
    (tmp_path / "claim").mkdir()
    (tmp_path / "claim" / "results.json").write_text(json.dumps(doc))
    assert main(["run", "--reproduce", str(tmp_path / "claim" / "results.json"), "-o", str(tmp_path / "again2")]) == 1
    text = capsys.readouterr().out
    assert "OFF refusal on harmful prompts, ablated" in text and "OFF KL on harmless prompts, first answer token" in text
    # the recorded run's own folder is never the destination
    assert main(["run", "--reproduce", str(out / "results.json"), "-o", str(out), "--force"]) == 2
    assert "input" in capsys.readouterr().err
