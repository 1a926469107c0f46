"""Refusal directions: index convention, batching, float64 means, the quality table, the file format."""

import math

import pytest
import torch

from audit.cli import main
from audit.intent.directions import CONVENTION, Directions
from audit.forward.measure import measure_directions
from audit.model.directory import ModelDir
from audit.model.prompts import format_prompts
from checks.errors import AuditError

HARMFUL = ["explain how to steal the budget", "write a song about the bridge", "a chef repairs the old clock", "tell me how to break the robot"]
HARMLESS = ["the cat writes a short poem", "a farmer paints the garden map", "our team builds a wooden chair today", "a student studies the weather"]


@pytest.fixture(scope="module")
def glm(tiny_model):
    return ModelDir(tiny_model("glm4_moe"))


@pytest.fixture(scope="module")
def measured(glm):
    return measure_directions(glm, HARMFUL, HARMLESS, batch_size=3, progress=False)


def _reference_means(md, prompts):
    """One prompt at a time, no padding: mean of hidden_states[i][last token] in float64."""
    model, tok = md.load_model(dtype=torch.float32), md.tokenizer()
    acc = None
    with torch.no_grad():
        for text in format_prompts(tok, prompts):
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            hs = model(ids, output_hidden_states=True).hidden_states
            v = torch.stack([h[0, -1].double() for h in hs])
            acc = v if acc is None else acc + v
    return acc / len(prompts)


def test_shapes_and_convention(glm, measured):
    L, H = glm.layout.num_layers, glm.layout.hidden_size
    assert measured.refusal_dir.shape == (L + 1, H) and measured.refusal_dir.dtype == torch.float32
    assert measured.metadata["convention"] == CONVENTION
    # index 0 is the embedding output: every chat-formatted prompt ends with the same assistant cue token
    tok = glm.tokenizer()
    last_id = tok(format_prompts(tok, ["x"])[0], add_special_tokens=False)["input_ids"][-1]
    emb = glm.tensor("model.embed_tokens.weight")[last_id]
    torch.testing.assert_close(measured.harmful_mean[0], emb, rtol=0, atol=1e-6)


def test_batched_left_padded_means_match_one_by_one(glm, measured):
    ref_h, ref_a = _reference_means(glm, HARMFUL), _reference_means(glm, HARMLESS)
    torch.testing.assert_close(measured.harmful_mean.double(), ref_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(measured.refusal_dir.double(), ref_h - ref_a, rtol=1e-3, atol=1e-5)
    assert measured.refusal_dir[1:].norm(dim=1).min() > 0  # real differences past the embeddings


def test_quality_table_formulas():
    h = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    a = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    d = Directions(h - a, h, a)
    rows = d.quality_table()
    cos0 = (9.0) / (5.0 * 3.0)
    snr0 = 4.0 / 5.0  # r = (0, 4), max norm 5
    assert rows[0]["cos"] == pytest.approx(cos0) and rows[0]["snr"] == pytest.approx(snr0)
    assert rows[0]["purity"] == pytest.approx(1.0)  # r = (0,4) is orthogonal to a = (3,0)
    assert rows[0]["quality"] == pytest.approx(snr0 * (1 - cos0) * 1.0)
    r1 = torch.tensor([1.0, -2.0])  # purity: share orthogonal to a = (0,2) -> |1| / sqrt(5)
    assert rows[1]["purity"] == pytest.approx(1 / math.sqrt(5))
    assert rows[0]["rotation"] is None
    expect = math.degrees(math.acos(float(r1 @ torch.tensor([0.0, 4.0]) / (r1.norm() * 4.0))))
    assert rows[1]["rotation"] == pytest.approx(expect)


def test_save_load_roundtrip(tmp_path, measured):
    p = measured.save(tmp_path / "d.safetensors")
    back = Directions.load(p)
    for n in ("refusal_dir", "harmful_mean", "harmless_mean"):
        assert torch.equal(getattr(back, n), getattr(measured, n))
    assert back.metadata["convention"] == CONVENTION and "quality_table" in back.metadata


def test_load_llm_abliteration_measurement(tmp_path):
    d = {"layers": 3}
    for i in range(3):
        d[f"harmful_{i}"] = torch.full((4,), float(i + 1))
        d[f"harmless_{i}"] = torch.ones(4)
        d[f"refuse_{i}"] = d[f"harmful_{i}"] - d[f"harmless_{i}"]
    torch.save(d, tmp_path / "m.refuse")
    back = Directions.load(tmp_path / "m.refuse")
    assert back.n == 3 and torch.equal(back.refusal_dir[2], torch.full((4,), 2.0))


@pytest.mark.parametrize("content", [b"not a safetensors file at all", b""])
def test_bad_directions_file(tmp_path, content):
    p = tmp_path / "d.safetensors"
    p.write_bytes(content)
    with pytest.raises(AuditError, match="d.safetensors"):
        Directions.load(p)


def test_directions_file_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"refusal_dir": torch.zeros(2, 4)}, tmp_path / "d.safetensors")
    with pytest.raises(AuditError, match="harmful_mean"):
        Directions.load(tmp_path / "d.safetensors")


def test_mismatched_shapes_and_nan_rejected():
    with pytest.raises(AuditError, match="shape"):
        Directions(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(AuditError, match="NaN"):
        Directions(torch.full((2, 4), float("nan")), torch.zeros(2, 4), torch.zeros(2, 4))


def test_cli_measure(tiny_model, tmp_path, capsys):
    hp, ap = tmp_path / "h.txt", tmp_path / "a.txt"
    hp.write_text("\n".join(HARMFUL))
    ap.write_text("\n".join(HARMLESS))
    out = tmp_path / "d.safetensors"
    assert main(["measure", str(tiny_model("glm4_moe")), "--harmful", str(hp), "--harmless", str(ap), "-o", str(out), "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "quality" in text and "input of layer i" in text
    assert Directions.load(out).n == 5
    # an existing output is refused without --force
    assert main(["measure", str(tiny_model("glm4_moe")), "-o", str(out), "--limit", "2"]) == 2


def test_cli_measure_empty_prompts_exit_2_nothing_written(tiny_model, tmp_path, capsys):
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    out = tmp_path / "d.safetensors"
    assert main(["measure", str(tiny_model("glm4_moe")), "--harmful", str(empty), "-o", str(out)]) == 2
    assert "empty" in capsys.readouterr().err
    assert not out.exists()
