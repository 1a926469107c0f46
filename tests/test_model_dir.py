"""Model directories: lazy reads, atomic writes, and one clear error for every broken input."""

import json
import shutil
import struct

import pytest
import torch

from audit.model_dir import ModelDir, OutputDir, read_header, write_shard
from checks.errors import AuditError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_lists_without_reading_and_reads_lazily(tiny_model):
    md = ModelDir(tiny_model("qwen3_moe", sharded=True))
    info = md.tensors["model.layers.0.mlp.experts.3.down_proj.weight"]
    assert info.shape == (32, 16) and info.dtype == "F32"
    t = md.tensor(info.name)
    assert tuple(t.shape) == info.shape and t.dtype == torch.float32
    names = [n for n, _ in md.iter_tensors()]
    assert sorted(names) == sorted(md.tensors)


def test_write_shard_roundtrip_and_header(tmp_path):
    ts = [("a", torch.randn(3, 4)), ("b", torch.randn(5).to(torch.bfloat16)), ("c", torch.zeros(0))]
    write_shard(tmp_path / "x.safetensors", ts, {"format": "pt"})
    infos, meta, _ = read_header(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"} and infos["b"].dtype == "BF16"
    from safetensors.torch import load_file

    back = load_file(tmp_path / "x.safetensors")
    for n, t in ts:
        assert torch.equal(back[n], t)


def test_output_dir_atomic_and_refuses_inputs(tmp_path, tiny_model):
    base = tiny_model("llama")
    with pytest.raises(AuditError, match="never writes into an input"):
        OutputDir(base / "out", inputs=[base])
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputDir(dest) as od:
            (od.tmp / "f").write_text("x")
            raise RuntimeError("boom")
    assert not dest.exists() and not list(tmp_path.glob(".out.tmp-*"))
    with OutputDir(dest) as od:
        (od.tmp / "f").write_text("x")
        od.commit()
    assert (dest / "f").read_text() == "x"
    with pytest.raises(AuditError, match="--force"):
        OutputDir(dest)
    with OutputDir(dest, force=True) as od:
        (od.tmp / "g").write_text("y")
        od.commit()
    assert sorted(p.name for p in dest.iterdir()) == ["g"]


# -- bad input: each one message naming the file, raised as AuditError ------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(AuditError, match="no such directory"):
        ModelDir(tmp_path / "nope")


def test_missing_config(tmp_path, tiny_model):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(AuditError, match=r"config.json: missing"):
        ModelDir(d)


def test_invalid_config(tmp_path, tiny_model):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(AuditError, match="not valid JSON"):
        ModelDir(d)


def test_unknown_model_type(tmp_path, tiny_model):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "made_up_moe"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AuditError, match="unknown architecture model_type='made_up_moe'"):
        ModelDir(d).layout


def test_truncated_shard(tmp_path, tiny_model):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(AuditError, match="truncated"):
        ModelDir(d)


def test_corrupt_header(tmp_path, tiny_model):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    with pytest.raises(AuditError, match="corrupt safetensors header"):
        ModelDir(d)
    data[0:8] = struct.pack("<Q", 16)
    data[8:24] = b"{garbage garbage"
    f.write_bytes(bytes(data))
    with pytest.raises(AuditError, match="header"):
        ModelDir(d)


def test_index_names_missing_shard(tmp_path, tiny_model):
    d = _copy(tiny_model("llama", sharded=True), tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(AuditError, match="missing"):
        ModelDir(d)


def test_index_points_outside(tmp_path, tiny_model):
    d = _copy(tiny_model("llama", sharded=True), tmp_path / "m")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "../evil.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(AuditError, match="outside the model directory"):
        ModelDir(d)


def test_same_tensor_in_two_shards(tmp_path, tiny_model):
    d = _copy(tiny_model("llama", sharded=True), tmp_path / "m")
    shards = sorted(d.glob("*.safetensors"))
    infos, _, _ = read_header(shards[0])
    name = next(iter(infos))
    dup = d / "extra.safetensors"
    write_shard(dup, [(name, torch.zeros(infos[name].shape))])
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["some.other"] = "extra.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(AuditError, match="stored twice"):
        ModelDir(d)


def test_only_pickle_weights(tmp_path, tiny_model):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AuditError, match="only pickle weights"):
        ModelDir(d)


def test_no_weights(tmp_path, tiny_model):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(AuditError, match="no \\*.safetensors"):
        ModelDir(d)


def test_loads_through_transformers(tiny_model):
    md = ModelDir(tiny_model("glm4_moe", sharded=True))
    model = md.load_model(dtype=torch.float32)
    tok = md.tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "the cat writes a song"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model(**ids)
    assert out.logits.shape[-1] == len(tok)
