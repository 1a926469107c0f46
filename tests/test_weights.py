"""Key diff of base vs ablated weights: left-out groups, untouched models, prefix collisions, bad pairs, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from audit.cli import main
from audit.model.directory import ModelDir
from audit.weights.static_audit import static_audit
from reports.results_io import validate_results
from audit.organisms.tiny import TINY_CONFIGS
from checks.errors import AuditError
from checks.layout import targets_of
from tests.helpers_ablation import edit_fn, prefix_layers, rewrite

GROUPS = ("attn_out", "attn_in", "mlp_down", "mlp_gate", "mlp_up", "experts_down", "experts_gate", "experts_up",
          "shared_down", "shared_gate", "shared_up", "router")


def _r(h, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(h, generator=g)
    return r / r.norm()


def _config(path, layers, components, extra=""):
    comps = ", ".join(components)
    path.write_text(f"components: [{comps}]\n{extra}ablate:\n" + "".join(f"  - {{layer: {l}, measurement: {l}}}\n" for l in layers))
    return path


def _codes(res, code):
    return [f for f in res["weights"].findings if f.code == code]


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_left_out_group_reported_exactly(family, tiny_model, tmp_path):
    base = tiny_model(family)
    md = ModelDir(base)
    lay = md.layout
    layers = list(range(1, lay.num_layers))
    present = sorted({t for k, role in lay.roles.items() if role.layer in layers for t in targets_of(role)} & set(GROUPS), key=GROUPS.index)
    cfg = _config(tmp_path / "all.yaml", layers, present)
    r = _r(lay.hidden_size)
    for left_out in present:
        out = rewrite(base, tmp_path / f"abl-{left_out}", edit_fn(r, set(present) - {left_out}, set(layers), family=family))
        res = static_audit(out, base=base, config=cfg)
        found = _codes(res, "intended-untouched")
        missing = {t for f in found for t in f.evidence["targets"]}
        assert missing == {left_out}, (family, left_out, [f.message for f in found])
        assert not _codes(res, "unintended-modified"), (family, left_out)
        assert res["weights"].data["modified"].get(left_out) is None
        shutil.rmtree(out)


def test_untouched_model_reports_no_change(tiny_model, tmp_path):
    base = tiny_model("qwen3_moe")
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    res = static_audit(copy, base=base)
    assert [f.code for f in res["weights"].findings] == ["no-change"]
    assert res["weights"].status == "fail"
    assert res["weights"].data["counts"]["changed"] == 0
    assert res["recovery"].data["pattern"] == "none"


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_prefix_collision_names_unintended_layers(family, tiny_model, tmp_path):
    base = tiny_model(family, num_hidden_layers=12)
    lay = ModelDir(base).layout
    cfg = _config(tmp_path / "c.yaml", [1, 5], ["attn_out", "mlp_down", "experts_down"])
    r = _r(lay.hidden_size)
    # a tool matching keys with startswith('...layers.1') rewrites layers 1, 10, 11 for the entry of layer 1
    fn1 = edit_fn(r, {"attn_out", "mlp_down", "experts_down"}, prefix_layers(1))
    fn5 = edit_fn(_r(lay.hidden_size, 5), {"attn_out", "mlp_down", "experts_down"}, {5})
    out = rewrite(base, tmp_path / "abl", lambda k, role, t: fn1(k, role, t) if fn1(k, role, t) is not None else fn5(k, role, t))
    res = static_audit(out, base=base, config=cfg)
    (f,) = _codes(res, "unintended-modified")
    assert f.layers == [10, 11]
    assert f.evidence["prefix_collision"] is True
    assert f.evidence["collisions"] == {"1": [10, 11]}
    assert "layer 1" in f.message and "10-11" in f.message
    # the direction in layers 10-11 is the one of the layer-1 entry
    rows = res["recovery"].data["tables"]["layers"]
    cols = rows["columns"]
    by_layer = {row[cols.index("layer")]: row for row in rows["rows"]}
    assert by_layer[10][cols.index("written_by_entry")] == 1
    assert by_layer[5][cols.index("written_by_entry")] == 5
    assert any(x.code == "unintended-direction" for x in res["recovery"].findings)


def test_layer_gap_and_nan(tiny_model, tmp_path):
    base = tiny_model("llama", num_hidden_layers=6)
    lay = ModelDir(base).layout
    r = _r(lay.hidden_size)
    fn = edit_fn(r, {"attn_out", "mlp_down"}, {1, 2, 4, 5})

    def edit(k, role, t):
        w = fn(k, role, t)
        if w is not None and role.layer == 5 and role.component == "attn":
            w = w.clone()
            w[0, 0] = float("nan")
        return w

    out = rewrite(base, tmp_path / "abl", edit)
    res = static_audit(out, base=base)
    (gap,) = _codes(res, "layer-gap")
    assert gap.layers == [3]
    (nan,) = _codes(res, "nan-inf")
    assert nan.layers == [5] and nan.value == 1


def test_different_family_or_shape_is_a_clear_error(tiny_model, tmp_path, capsys):
    a, b = tiny_model("llama"), tiny_model("qwen3_moe")
    with pytest.raises(AuditError, match="llama model but the base"):
        static_audit(a, base=b)
    assert main(["static", str(a), "--base", str(b), "-o", str(tmp_path / "o")]) == 2
    assert "audit: error:" in capsys.readouterr().err
    wide = tiny_model("llama", hidden_size=48)
    assert main(["static", str(wide), "--base", str(a), "-o", str(tmp_path / "o2")]) == 2
    assert "hidden_size" in capsys.readouterr().err
    assert main(["static", str(a), "-o", str(tmp_path / "o3")]) == 2  # no manifest, no --base


def test_cli_writes_valid_results(tiny_model, tmp_path):
    base = tiny_model("glm4_moe")
    lay = ModelDir(base).layout
    out = rewrite(base, tmp_path / "abl", edit_fn(_r(lay.hidden_size), {"attn_out", "experts_down", "shared_down", "mlp_down"}, {1, 2, 3}))
    rc = main(["static", str(out), "--base", str(base), "-o", str(tmp_path / "res")])
    doc = json.loads((tmp_path / "res" / "results.json").read_text())
    validate_results(doc)
    assert set(doc["checks"]) == {"weights", "projection", "recovery"}
    # no intent stated: the intent is exactly what the edits show, so nothing is "intended but untouched" (issue 25)
    assert rc == 0 and doc["checks"]["weights"]["status"] == "pass"
    assert not doc["checks"]["weights"]["findings"]
    assert doc["checks"]["weights"]["data"]["intended"] == {t: [1, 2, 3] for t in ("attn_out", "experts_down", "shared_down", "mlp_down")
                                                            if t in doc["checks"]["weights"]["data"]["modified"]}
    m = doc["checks"]["weights"]["data"]["matrices"]["intent_vs_actual"]
    assert len(m["rows"]) == lay.num_layers and len(m["values"][0]) == len(m["cols"])
    bad = dict(doc)
    bad["checks"] = {"weights": {**doc["checks"]["weights"], "status": "great"}}
    with pytest.raises(ValueError, match=r"at \$\.checks\.weights\.status"):
        validate_results(bad)
