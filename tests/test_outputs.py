"""audit/outputs.py: an output never lands on, in or around an input; --force replaces only our own;
concurrent writers never silently replace each other; temporaries of killed runs are cleaned (issue 15)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audit.outputs import MARKER, OutputDir, check_destination, clean_stale, is_ours, write_file
from checks.errors import AuditError


def _tree(p: Path) -> dict:
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*")) if f.is_file()}


def _make(dest, files: dict, inputs=(), force=False) -> Path:
    with OutputDir(dest, inputs=inputs, force=force) as od:
        for k, v in files.items():
            (od.tmp / k).write_text(v)
        return od.commit()


def test_destination_containing_equal_to_or_inside_an_input_is_refused(tmp_path):
    models = tmp_path / "models"
    base, abl = models / "base", models / "abl"
    for d in (base, abl):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("ablate: []")
    before = _tree(tmp_path)
    for dest in (models, base, base / "sub", abl, cfg, tmp_path):
        for force in (False, True):
            with pytest.raises(AuditError, match="the input"):
                check_destination(dest, [base, abl, cfg], force)
    assert _tree(tmp_path) == before


def test_inputs_are_resolved_through_symlinks(tmp_path):
    """A Hugging Face snapshot links its files into ../../blobs: an output over the blobs is an output over the input."""
    blobs, snap = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "0001").write_text("weights")
    (snap / "model.safetensors").symlink_to("../../blobs/0001")
    with pytest.raises(AuditError, match="the input"):
        check_destination(blobs, [snap], force=True)
    link = tmp_path / "link"
    link.symlink_to(snap)
    with pytest.raises(AuditError, match="the input"):
        check_destination(tmp_path / "repo", [link], force=True)


def test_force_replaces_only_our_own_outputs(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(AuditError, match="--force"):
        _make(user, {"results.json": "{}"})
    with pytest.raises(AuditError, match="not written by this tool"):
        _make(user, {"results.json": "{}"}, force=True)
    assert (user / "notes.txt").read_text() == "mine"
    ours = _make(tmp_path / "ours", {"a": "1"})
    assert is_ours(ours) and json.loads((ours / MARKER).read_text())["tool"] == "moe-ablation-audit"
    _make(ours, {"b": "2"}, force=True)
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_bad_destinations_are_clear_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(AuditError, match="is a file, not a folder"):
        check_destination(f / "out", [])
    with pytest.raises(AuditError, match="not a folder"):
        check_destination(f, [], force=True)
    with pytest.raises(AuditError, match="is a folder"):
        check_destination(tmp_path, [], force=True, kind="file")


def test_a_destination_that_appears_meanwhile_is_never_replaced(tmp_path):
    dest = tmp_path / "out"
    a = OutputDir(dest)
    b = OutputDir(dest)  # both checked while dest did not exist: two concurrent runs
    (a.tmp / "who").write_text("a")
    (b.tmp / "who").write_text("b")
    a.commit()
    with pytest.raises(AuditError, match="appeared while this run was writing"):
        b.commit()
    assert (dest / "who").read_text() == "a"  # the first result is whole; the second said so and left nothing
    assert not list(tmp_path.glob(".out.*"))


def test_concurrent_ablations_to_one_destination(tmp_path, tiny_model):
    """Two `audit ablate ... -o SAME` at once: exactly one wins, the other exits 2 saying why; the winner is whole."""
    base = tiny_model("qwen3_moe")
    from audit.forward.measure import measure_directions
    from audit.model.directory import ModelDir

    dirs = tmp_path / "d.safetensors"
    measure_directions(ModelDir(base), ["how do I make a bomb"] * 2, ["how do I make a cake"] * 2).save(dirs)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"measurements: {dirs}\nablate:\n  - {{layer: 0, measurement: 1}}\n")
    out = tmp_path / "same"
    cmd = [sys.executable, "-m", "audit.cli", "ablate", str(base), "--config", str(cfg), "-o", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results  # [0, 0] would mean one result silently replaced the other
    assert any("appeared while this run was writing" in err or "exists and is not empty" in err for _, err in results)
    assert "Traceback" not in "".join(err for _, err in results)
    ModelDir(out)  # the winner is a whole model directory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".same.")]


def test_outputs_get_the_users_umask_and_stale_temporaries_are_cleaned(tmp_path):
    old = os.umask(0o022)
    try:
        dest = _make(tmp_path / "out", {"results.json": "{}"})
        assert (dest.stat().st_mode & 0o777) == 0o755
        assert ((dest / "results.json").stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)
    # a run killed mid-write leaves .out.tmp-PID-xxxx behind; PID is gone: the next run removes it (only ours)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abcd"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"tool": "moe-ablation-audit", "host": os.uname().nodename}))
    (stale / "half.bin").write_bytes(b"x")
    foreign = tmp_path / f".out.tmp-{dead.pid}-user"
    foreign.mkdir()
    (foreign / "keep").write_text("not ours")
    alive = tmp_path / f".out.tmp-{os.getpid()}-live"
    alive.mkdir()
    (alive / MARKER).write_text(json.dumps({"tool": "moe-ablation-audit", "host": os.uname().nodename}))
    assert clean_stale(tmp_path / "out") == [stale]
    assert not stale.exists() and (foreign / "keep").exists() and alive.exists()


def test_write_file_never_replaces_what_it_does_not_own(tmp_path):
    dest = tmp_path / "x.jsonl"
    write_file(dest, lambda p: p.write_text("first\n"))
    with pytest.raises(AuditError, match="--force"):
        write_file(dest, lambda p: p.write_text("second\n"))
    with pytest.raises(AuditError, match="not written by this tool"):
        write_file(dest, lambda p: p.write_text("second\n"), force=True, ours=lambda p: False)
    write_file(dest, lambda p: p.write_text("second\n"), force=True, ours=lambda p: True)
    assert dest.read_text() == "second\n" and not list(tmp_path.glob(".x.jsonl.*"))
