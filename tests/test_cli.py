"""End-to-end CLI behaviour: output, exit codes, and no tracebacks on bad input."""

import json
import subprocess
import sys

import pytest

from audit.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "audit.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("family,routed,moe", [("glm4_moe", 8, [1, 2, 3]), ("gpt_oss", 8, [0, 1, 2]), ("llama", 0, [])])
def test_inspect_json(tiny_model, capsys, family, routed, moe):
    assert main(["inspect", str(tiny_model(family, sharded=True)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family and info["n_routed_experts"] == routed and info["moe_layers"] == moe
    assert info["shards"] > 1


def test_inspect_text(tiny_model, capsys):
    assert main(["inspect", str(tiny_model("glm4_moe"))]) == 0
    out = capsys.readouterr().out
    assert "MoE layers 1-3; dense MLP layers 0" in out
    assert "routed experts 8, shared experts 1, top-k 2" in out


def test_bad_input_exit_2_no_traceback(tmp_path):
    r = run_cli("inspect", tmp_path / "missing")
    assert r.returncode == 2
    assert "no such directory" in r.stderr and "Traceback" not in r.stderr
