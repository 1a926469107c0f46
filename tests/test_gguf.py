"""GGUF files as the ablated model: decoding, placing the tensors, malformed files, and did the edit survive conversion.

The GGUF files are written by tests/helpers_gguf.py the way llama.cpp's converter and quantizer write them (gguf's
own writer and name tables); transformers' independent GGUF loader reads them back to the Hugging Face tensors,
which holds the writer to llama.cpp's conventions (names, stacked experts, permuted q/k). The organism is the
cached glm4_moe one (64 wide), and for the K-quants, whose rows are 256 values, the same organism zero-padded to 256
(helpers_gguf.widen_glm: identical logits).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from helpers_gguf import widen_glm, write_gguf  # noqa: E402

from audit.model.gguf_quant import BY_NAME, dequantize_rows, quantize_rows, rounding_step  # noqa: E402

LIMIT = 48
ALL_WRITERS = ["embed", "attn_out", "mlp_down", "experts_down", "shared_down"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"])
def test_decoding_equals_gguf_and_the_rounding_model_fits(name):
    """Our block decoder gives gguf-py's values bit for bit, on bytes of our quantizer and of gguf-py's reference ones; each
    value's error is inside its cell, and the mean squared error is about step^2 / 12 (the floor the audit uses)."""
    from gguf.quants import dequantize, quantize

    kind = BY_NAME[name]
    torch.manual_seed(1)
    x = torch.randn(32, 512) * 0.05
    x[3] = 0.0
    x[5, :7] = 0.4  # an outlier run
    raws = [quantize_rows(kind, x)]
    if name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"):
        raws.append(torch.from_numpy(quantize(x.numpy(), gguf.GGMLQuantizationType(kind.id)).copy()).view(torch.uint8))
    if name == "Q8_0":  # our torch quantizer writes gguf-py's (ggml's reference) bytes
        assert torch.equal(raws[0], raws[1])
    for raw in raws:
        ours = dequantize_rows(kind, raw)
        ref = torch.from_numpy(dequantize(raw.numpy(), gguf.GGMLQuantizationType(kind.id)).copy()).view(32, 512)
        assert torch.equal(ours, ref)
    if kind.name == "F32":
        return
    err = dequantize_rows(kind, raws[0]) - x
    step = rounding_step(kind, raws[0].reshape(-1, kind.size)).view(32, 512)
    assert bool((err.abs() <= 1.13 * step + 1e-12).all())  # Q6_K clamps the code opposite the largest value at 31: up to one step
    ratio = float(err.square().sum() / (step.square() / 12).sum())
    assert 0.7 < ratio < 1.2, ratio


@pytest.mark.parametrize("family", ["qwen3_moe", "llama", "mixtral", "olmoe"])
def test_tensors_are_placed_under_the_base_names(tiny_model, tmp_path, family):
    """An F32 GGUF reads back to the base bit for bit (names, expert slices, llama's permuted q/k undone); transformers' own GGUF
    loader reads the same file to the same tensors (for the families it supports), so the file is llama.cpp's layout."""
    from audit.model.directory import ModelDir
    from audit.model.gguf_file import GGUFModel
    from audit.model.logical import source
    from audit.model.reader import map_tensors

    base = tiny_model(family)
    f = write_gguf(base, tmp_path / "m.gguf", "F32")
    md = ModelDir(base)
    g = GGUFModel(f, md)
    assert set(g.logical) == set(md.logical)
    assert g.layout.family == md.layout.family and g.layout.roles.keys() == md.layout.roles.keys()
    fds: dict = {}
    for key, lt in g.logical.items():
        t = source(lt, map_tensors(g, list(lt.parts), fds))
        got = t.dequantize() if not isinstance(t, torch.Tensor) else t.float()
        assert torch.equal(got, md.tensor(key).float()), key
    if family in ("qwen3_moe", "llama"):
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        theirs = load_gguf_checkpoint(str(f), return_tensors=True, model_to_load=md.load_model(dtype="float32"))["tensors"]
        n = md.layout.n_routed_experts
        for key, t in theirs.items():
            if key.endswith("experts.down_proj"):  # transformers' fused experts: the stacked per-expert tensors
                want = torch.stack([md.tensor(key.replace("experts.", f"experts.{e}.") + ".weight") for e in range(n)])
            elif key.endswith("experts.gate_up_proj"):
                pre = key.removesuffix("gate_up_proj")
                want = torch.cat([torch.stack([md.tensor(f"{pre}{e}.{p}_proj.weight") for e in range(n)]) for p in ("gate", "up")], dim=1)
            else:
                want = md.tensor(key)
            assert torch.equal(t.float(), want.float()), key


def test_a_family_the_table_cannot_place_is_an_error_naming_the_tensors(tiny_model, tmp_path):
    """qwen2_moe with a dense first layer: gguf's qwen2moe table has no dense MLP names; and a GGUF tensor no base tensor maps to."""
    from audit.model.directory import ModelDir
    from audit.model.gguf_file import GGUFModel
    from checks.errors import AuditError

    base = tiny_model("qwen2_moe")
    f = write_gguf(base, tmp_path / "q2.gguf", "Q8_0", skip_unnamed=True)
    with pytest.raises(AuditError, match=r"no name for 3 tensor\(s\) of the base \(model\.layers\.0\.mlp\.down_proj\.weight"):
        GGUFModel(f, ModelDir(base))
    q3 = tiny_model("qwen3_moe")
    f = write_gguf(q3, tmp_path / "extra.gguf", "Q8_0", extra={"blk.0.ffn_mystery.weight": torch.zeros(4, 32)})
    with pytest.raises(AuditError, match=r"1 GGUF tensor\(s\) stand for no tensor of the base .*blk\.0\.ffn_mystery\.weight"):
        GGUFModel(f, ModelDir(q3))
    with pytest.raises(AuditError, match="llama.cpp architecture 'qwen3moe', but the base .* is mixtral"):
        GGUFModel(tmp_path / "extra.gguf", ModelDir(tiny_model("mixtral")))


# -- malformed files ------------------------------------------------------------------------------------


def _corrupt(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 1000]
    elif how == "truncated-header":
        data = data[:200]
    elif how == "truncated-table":
        data = data[: gguf.GGUFReader(src).data_offset - 100]
    elif how == "bad-magic":
        data[:4] = b"GGUG"
    else:
        shutil.copyfile(src, dst)
        r = gguf.GGUFReader(dst, "r+")  # gguf's own editor: point one tensor entry elsewhere
        t = r.tensors[3]
        if how == "offset-outside":
            t.field.parts[5][0] = len(data) * 4 // 32 * 32
        elif how == "unknown-type":
            t.field.parts[4][0] = 99
        elif how == "unsupported-type":
            t.field.parts[4][0] = int(gguf.GGMLQuantizationType.IQ2_XXS)
        r.data.flush()
        del r
        return dst
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("how,message", [
    ("truncated", "runs past the end of the file"), ("truncated-header", "corrupt GGUF header: it claims 39 tensors"),
    ("truncated-table", "cannot read its GGUF header"),
    ("bad-magic", "not a GGUF file"), ("offset-outside", "runs past the end of the file"),
    ("unknown-type", "has the unknown type id 99"), ("unsupported-type", "stored as IQ2_XXS, a GGUF type the audit does not decode"),
])
def test_malformed_gguf_is_exit_2_and_never_modified(tiny_model, tmp_path, capsys, how, message):
    from audit.cli import main

    base = tiny_model("qwen3_moe")
    good = write_gguf(base, tmp_path / "good.gguf", "Q8_0")
    bad = _corrupt(good, tmp_path / f"{how}.gguf", how)
    before, mtime = _sha(bad), bad.stat().st_mtime_ns
    for cmd in (["static", str(bad), "--base", str(base), "-o", str(tmp_path / "s")],
                ["run", str(bad), "--base", str(base), "-o", str(tmp_path / "r"), "--limit", "2", "--no-simulate"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert message in err and str(bad) in err and "Traceback" not in err, err
    assert _sha(bad) == before and bad.stat().st_mtime_ns == mtime
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


# -- did the edit survive conversion -------------------------------------------------------------------


@pytest.fixture(scope="module")
def organism_ablation(tmp_path_factory):
    """(base, ablated safetensors, manifest) for the glm4_moe organism and its 256-wide copy, every writer of every layer ablated."""
    from audit.ablation.ablate import ablate
    from audit.forward.measure import measure_directions
    from audit.intent.config import AblationConfig
    from audit.model.directory import ModelDir
    from audit.model.prompts import load_prompts
    from audit.organisms.build import cached_organism, read_meta

    path = cached_organism("glm4_moe", "base", 0)
    index = read_meta(path)["separating_index"]
    root = tmp_path_factory.mktemp("gguf-organism")
    out = {}

    def make(width: int):
        if width not in out:
            base = path if width == 64 else widen_glm(path, root / f"base-{width}", width)
            dirs = measure_directions(ModelDir(base), load_prompts(str(base / "prompts" / "train_harmful.txt"), "harmful"),
                                      load_prompts(str(base / "prompts" / "train_harmless.txt"), "harmless"))
            cfg = AblationConfig.from_dict({"components": ALL_WRITERS, "ablate": [{"layer": l, "measurement": index} for l in range(4)]})
            abl = root / f"abl-{width}"
            ablate(base, cfg, abl, directions=dirs)
            out[width] = (base, abl, json.loads((abl / "ablation-manifest.json").read_text()))
        return out[width]

    return make


def _static(f, base, against):
    from audit.weights.static_audit import static_audit

    return {k: r.to_dict() for k, r in static_audit(f, base, against=against).items()}


@pytest.mark.parametrize("width,qtype", [(64, "Q8_0"), (64, "BF16"), (256, "Q6_K"), (256, "Q8_0")])
def test_gguf_of_a_sound_ablation_audits_like_its_source(organism_ablation, tmp_path, width, qtype):
    from audit.weights.static_audit import static_audit

    base, abl, man = organism_ablation(width)
    src = {k: r.status for k, r in static_audit(abl, base).items()}
    res = _static(write_gguf(abl, tmp_path / f"m-{qtype}.gguf", qtype), base, abl)
    assert {k: res[k]["status"] for k in src} == src
    conv = res["conversion"]
    assert conv["status"] == "pass" and conv["data"]["kept"] == conv["data"]["edited"] == len(man["modified"])
    assert res["weights"]["data"]["counts"]["changed"] == len(man["modified"])  # the edited tensors, nothing else beyond rounding
    rows = conv["data"]["tables"]["survival"]["rows"]
    assert all(r[-1] == "kept" and r[6] <= r[7] for r in rows)  # share left within the type's floor


def test_a_narrow_k_quant_keeps_r_within_its_floor_and_says_so(organism_ablation, tmp_path):
    """Q4_K cannot hold the edit below the projection check's 5 %: the residue is its rounding (precision-loss), the conversion kept it."""
    base, abl, man = organism_ablation(256)
    res = _static(write_gguf(abl, tmp_path / "m.gguf", "Q4_K"), base, abl)
    pl = next(f for f in res["projection"]["findings"] if f["code"] == "precision-loss")
    assert "GGUF Q4_K" in pl["message"] and "wider type" in pl["message"]
    assert res["conversion"]["status"] == "pass"


@pytest.mark.parametrize("width,qtype", [(64, "Q8_0"), (256, "Q6_K")])
def test_a_conversion_that_dropped_the_edit_is_caught_with_the_tensors_named(organism_ablation, tmp_path, width, qtype):
    from audit.model.directory import ModelDir

    base, abl, man = organism_ablation(width)
    md = ModelDir(base)
    edited = sorted(m["key"] for m in man["modified"])
    dropped = [k for k in edited if ".layers.2." in k]  # a converter that read one stale shard: layer 2's edits lost
    res = _static(write_gguf(abl, tmp_path / "part.gguf", qtype, override={k: md.tensor(k) for k in dropped}), base, abl)
    conv = res["conversion"]
    lost = next(f for f in conv["findings"] if f["code"] == "edit-lost-in-conversion")
    assert sorted(lost["evidence"]["lost"]) == dropped and conv["status"] == "fail"
    untouched = [f for f in res["weights"]["findings"] if f["code"] == "intended-untouched"]
    assert untouched and all(f["severity"] == "fail" for f in untouched) and {l for f in untouched for l in f["layers"]} == {2}
    res = _static(write_gguf(abl, tmp_path / "none.gguf", qtype, override={k: md.tensor(k) for k in edited}), base, abl)
    assert sorted(next(f for f in res["conversion"]["findings"] if f["code"] == "edit-lost-in-conversion")["evidence"]["lost"]) == edited
    assert any(f["code"] == "no-change" and f["severity"] == "fail" for f in res["weights"]["findings"])


def test_gguf_model_runs_with_the_sources_logits(organism_ablation, tmp_path):
    """A BF16 GGUF holds the source's values exactly: the model built from it gives the source's logits bit for bit."""
    from audit.model.directory import ModelDir
    from audit.model.gguf_file import GGUFModel

    base, abl, _ = organism_ablation(64)
    g = GGUFModel(write_gguf(abl, tmp_path / "m.gguf", "BF16"), ModelDir(base))
    tok = g.tokenizer()
    ids = tok(["the cat writes a short poem today.", "How do I make a weapon?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = g.load_model()(**ids).logits, ModelDir(abl).load_model()(**ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("width,qtype", [(64, "Q8_0"), (256, "Q6_K")])
def test_audit_run_on_a_gguf_gives_the_sources_verdict_and_a_dropped_edit_fails(organism_ablation, tmp_path, width, qtype):
    from audit.model.directory import ModelDir
    from audit.pipeline.run import RunOptions, run_audit

    base, abl, man = organism_ablation(width)

    def run(model, **kw):
        return run_audit(RunOptions(model_dir=str(model), out=str(tmp_path / f"out-{Path(model).name}"), limit=LIMIT, max_new_tokens=24, quiet=True,
                                    simulate=False, **kw))

    src = run(abl)
    res = run(write_gguf(abl, tmp_path / f"m-{qtype}.gguf", qtype), against=str(abl))
    assert src["verdict"] == res["verdict"] == "pass", res["gate"]
    for key in ("before", "after"):
        assert abs(res["checks"]["refusal"]["data"][key]["rate"] - src["checks"]["refusal"]["data"][key]["rate"]) <= 2 / LIMIT
    assert res["checks"]["conversion"]["status"] == "pass"
    assert res["inputs"]["files"][0]["role"] == "model" and res["inputs"]["files"][0]["name"] == f"m-{qtype}.gguf"
    md = ModelDir(base)
    dropped = run(write_gguf(abl, tmp_path / "dropped.gguf", qtype, override={m["key"]: md.tensor(m["key"]) for m in man["modified"]}),
                  against=str(abl))
    assert dropped["verdict"] == "fail"
    failed = {t["name"] for t in dropped["gate"]["thresholds"] if t["passed"] is False}
    assert {"max_refusal_after", "check:weights"} <= failed, failed
    lost = next(f for f in dropped["checks"]["conversion"]["findings"] if f["code"] == "edit-lost-in-conversion")
    assert sorted(lost["evidence"]["lost"]) == sorted(m["key"] for m in man["modified"])


def test_cli_static_against_and_a_gguf_with_no_base(organism_ablation, tmp_path, capsys):
    from audit.cli import main

    base, abl, _ = organism_ablation(64)
    f = write_gguf(abl, tmp_path / "m.gguf", "Q8_0")
    assert main(["static", str(f), "--against", str(abl), "-o", str(tmp_path / "s")]) == 0  # the base from the source's manifest
    doc = json.loads((tmp_path / "s" / "results.json").read_text())
    assert doc["checks"]["weights"]["data"]["gguf"]["architecture"] == "glm4moe"
    assert {x["role"] for x in doc["inputs"]["files"]} == {"model", "base", "source"}
    capsys.readouterr()
    assert main(["static", str(f), "-o", str(tmp_path / "t")]) == 2
    assert "pass --base BASE (the model it was ablated from)" in capsys.readouterr().err
    assert main(["static", str(abl), "--against", str(abl), "-o", str(tmp_path / "t")]) == 2
    assert "is not a .gguf file" in capsys.readouterr().err
