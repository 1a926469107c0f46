"""llm-abliteration's files read as they are: the measurement .pt (weights_only) and the YAML config."""

from __future__ import annotations

import collections

import pytest
import torch

from audit.intent.directions import load_directions, load_measurement
from audit.model.directory import ModelDir
from audit.weights.static_audit import static_audit
from checks.errors import AuditError
from tests.helpers_ablation import edit_fn, rewrite


def _write_measurement(path, n, h, seed=0, extra=None):
    g = torch.Generator().manual_seed(seed)
    d = {"layers": n}
    for i in range(n):
        harmful, harmless = torch.randn(h, generator=g), torch.randn(h, generator=g)
        d[f"harmful_{i}"], d[f"harmless_{i}"] = harmful, harmless
        d[f"refuse_{i}"] = harmful - harmless
        d[f"refusenorm_{i}"] = (harmful - harmless) / (harmful - harmless).norm()
    d.update(extra or {})
    torch.save(d, path)
    return d


def test_measurement_file_is_read(tmp_path):
    d = _write_measurement(tmp_path / "m.refuse", 5, 16)
    dirs = load_measurement(tmp_path / "m.refuse")
    assert dirs.refusal_dir.shape == (5, 16)
    assert torch.allclose(dirs.refusal_dir[3], d["refuse_3"])
    assert torch.allclose(dirs.harmless_mean[4], d["harmless_4"])
    assert load_directions(tmp_path / "m.refuse").n == 5  # found by content


@pytest.mark.parametrize("first", [b"\x80", b"PK"])
def test_our_directions_file_whose_header_length_looks_like_a_pickle(tmp_path, first):
    """A safetensors header of 0x..80 bytes starts the file with 0x80, a pickle's mark (seen on a 25-layer file)."""
    from audit.intent.directions import Directions

    g = torch.Generator().manual_seed(0)
    d = Directions(torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g))
    path = tmp_path / "directions.safetensors"
    d.metadata["note"] = ""
    d.save(path)
    n0 = int.from_bytes(path.read_bytes()[:8], "little")
    want = int.from_bytes(first, "little")
    step = 256 ** len(first)
    target = n0 + (want - n0) % step  # the next header length whose low byte(s) are ``first``
    for extra in range(0, 64):  # the header is padded to 8 bytes: try the pads around the exact one
        d.metadata["note"] = "x" * (target - n0 + extra - 8)
        d.save(path)
        if path.read_bytes()[:len(first)] == first:
            break
    assert path.read_bytes()[:len(first)] == first
    got = load_directions(path)
    assert torch.equal(got.refusal_dir, d.refusal_dir)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_non_tensor_pickle_is_refused(tmp_path, capsys):
    _write_measurement(tmp_path / "evil.pt", 2, 8, extra={"payload": Evil()})
    with pytest.raises(AuditError, match="refused: not a measurement of plain tensors"):
        load_measurement(tmp_path / "evil.pt")
    assert "must never run" not in capsys.readouterr().out
    torch.save({"layers": 1, "refuse_0": [1.0, 2.0], "harmful_0": torch.ones(2), "harmless_0": torch.ones(2)}, tmp_path / "list.pt")
    with pytest.raises(AuditError, match="'refuse_0' is a list"):
        load_measurement(tmp_path / "list.pt")
    torch.save(collections.OrderedDict(layers=2, refuse_0=torch.ones(3)), tmp_path / "short.pt")
    with pytest.raises(AuditError, match="lacks 'harmful_0'|lacks 'refuse_1'"):
        load_measurement(tmp_path / "short.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(AuditError, match="refused"):
        load_measurement(tmp_path / "junk.pt")


def test_llm_abliteration_config_and_measurement_audit(tiny_model, tmp_path):
    """Their YAML (exact keys o_proj / mlp.down_proj per entry) + their .pt: intent vs what changed, entry by entry."""
    base = tiny_model("llama", num_hidden_layers=12)
    lay = ModelDir(base).layout
    d = _write_measurement(tmp_path / "meas.refuse", lay.num_layers + 1, lay.hidden_size, seed=3)
    (tmp_path / "abl.yml").write_text("model: base\nmeasurements: meas.refuse\noutput: out\nablate:\n"
                                      "  - layer: 1\n    measurement: 6\n    scale: 1.0\n    sparsity: 0.00\n"
                                      "  - layer: 2\n    measurement: 6\n    scale: 1.0\n    sparsity: 0.00\n")
    r = d["refuse_6"] / d["refuse_6"].norm()
    # a prefix-matching tool: the layer-1 entry also rewrites layers 10 and 11; layer 2 forgot o_proj
    fn = edit_fn(r, {"attn_out", "mlp_down"}, lambda k, role: str(role.layer).startswith("1"))
    fn2 = edit_fn(r, {"mlp_down"}, {2})
    out = rewrite(base, tmp_path / "out", lambda k, role, t: fn(k, role, t) if fn(k, role, t) is not None else fn2(k, role, t))
    res = static_audit(out, base=base, config=tmp_path / "abl.yml")
    w = res["weights"]
    assert w.data["intent"]["source"] == "config"
    un = [f for f in w.findings if f.code == "unintended-modified"]
    assert un and un[0].layers == [10, 11] and un[0].evidence["prefix_collision"]
    miss = [f for f in w.findings if f.code == "intended-untouched"]
    assert len(miss) == 1 and miss[0].evidence["targets"] == ["attn_out"] and miss[0].layers == [2]
    p = res["projection"].data["matrices"]["ablated:share_left_by_group"]
    col = p["cols"].index("mlp_down")
    assert p["values"][1][col] < 1e-4 and p["values"][10][col] < 1e-4 and p["values"][3][col] == pytest.approx(1.0)
    g = res["recovery"].data["groups"]
    assert len(g) == 1 and g[0]["best_index"] == 6 and g[0]["cos_best"] > 0.999 and g[0]["intended_layers"] == "1-2"
