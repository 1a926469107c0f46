"""Model directories: lazy reads, atomic writes, and one clear error for every broken input."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from audit.model.directory import ModelDir

from audit.model.shards import read_header, write_shard
from audit.outputs import MARKER, OutputDir
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
    with pytest.raises(AuditError, match="lies inside the input"):
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
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "g"]


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


# -- issue 15: every header validated at open; the Hugging Face cache layout; unreadable files -------------

def _raw_shard(path, header: dict, data: bytes):
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


@pytest.mark.parametrize("header, data, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
     bytes(12), "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
     bytes(16), "gap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "needs 12"),
    ({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, bytes(8), "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}, bytes(8), "exactly"),
    ({"__metadata__": {"x": 3}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "__metadata__"),
])
def test_every_header_defect_is_refused_at_open(tmp_path, header, data, match):
    f = _raw_shard(tmp_path / "x.safetensors", header, data)
    with pytest.raises(AuditError, match=match) as e:
        read_header(f)
    assert str(f) in str(e.value)


def test_duplicate_header_keys_are_refused(tmp_path):
    f = tmp_path / "x.safetensors"
    hb = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + bytes(8))
    with pytest.raises(AuditError, match="appears twice"):
        read_header(f)


def test_a_valid_header_still_opens_and_the_library_agrees(tmp_path):
    """The validation accepts what safetensors writes (padding, empty tensors, every float dtype)."""
    from safetensors.torch import save_file

    f = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(0), "c": torch.zeros(7, dtype=torch.bfloat16), "d": torch.zeros(2, dtype=torch.int64)}, f)
    infos, _, _ = read_header(f)
    assert {k: v.shape for k, v in infos.items()} == {"a": (3, 5), "b": (0,), "c": (7,), "d": (2,)}


def test_hugging_face_cache_snapshot_with_symlinked_shards(tmp_path, tiny_model):
    """snapshots/REV/*.safetensors -> ../../blobs/HASH, as huggingface_hub stores a download: accepted."""
    src = tiny_model("qwen3_moe", sharded=True)
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        if f.is_file():
            blob = blobs / f"{i:04d}deadbeef"
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    md = ModelDir(snap)
    assert len(md.shards) > 1 and md.layout.family == "qwen3_moe"
    assert torch.equal(md.tensor("model.embed_tokens.weight"), ModelDir(src).tensor("model.embed_tokens.weight"))
    # an index *name* that escapes is still refused, symlink or not
    idx = json.loads((snap / "model.safetensors.index.json").read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = "../../blobs/0000deadbeef"
    (snap / "model.safetensors.index.json").unlink()
    (snap / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(AuditError, match="outside the model directory"):
        ModelDir(snap)


def test_unreadable_config_is_bad_input(tmp_path, tiny_model, monkeypatch):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    real = Path.read_text

    def deny(self, *a, **k):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(AuditError, match="config.json: cannot read it"):
        ModelDir(d)


def test_pickle_named_safetensors_in_a_model_folder(tmp_path, tiny_model):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    torch.save({"w": torch.zeros(3)}, d / "model.safetensors")  # a torch.save zip under the safetensors name
    with pytest.raises(AuditError, match="pickle renamed .safetensors|corrupt safetensors"):
        ModelDir(d)


def test_identity_tells_a_changed_base(tmp_path, tiny_model):
    from audit.model.directory import identity_changes

    d = _copy(tiny_model("llama"), tmp_path / "m")
    before = ModelDir(d).identity()
    assert identity_changes(before, ModelDir(d).identity()) == []
    assert identity_changes(before, ModelDir(_copy(d, tmp_path / "copy")).identity()) == []  # a copy is the same model
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (d / "config.json").write_text(json.dumps(cfg))
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-64:] = bytes(64)  # the last tensor's values, header untouched
    f.write_bytes(bytes(data))
    assert identity_changes(before, ModelDir(d).identity()) == ["config.json differs", "shard model.safetensors differs (content)"]


def test_stored_dtype_and_device_map_with_disk_offload_in_a_scratch_folder_of_ours(tmp_path, tiny_model, tiny_tok):
    """load_model keeps bf16 as bf16 by default; with device auto and a small budget, layers go to disk inside a
    temporary folder of ours (marker first) under the offload folder, removed as soon as the model is freed."""
    import gc

    from audit.model.loading import input_device, parse_max_memory, placement
    from audit.organisms.tiny import build_tiny

    path = build_tiny("qwen3_moe", tmp_path / "bf16", tiny_tok, dtype=torch.bfloat16, shard_bytes=20_000)
    md = ModelDir(path)
    assert next(md.load_model().parameters()).dtype == torch.bfloat16
    assert next(md.load_model(dtype="float32").parameters()).dtype == torch.float32
    off = tmp_path / "offload"
    model = md.load_model(device="auto", max_memory=parse_max_memory(f"cpu={md.nbytes // 4}"), offload_folder=off)
    where = placement(model)
    assert where.get("disk", 0) > 0, where
    scratch = [p for p in off.iterdir()]
    assert len(scratch) == 1 and scratch[0].name.startswith(".audit-offload.tmp-") and (scratch[0] / MARKER).is_file()
    assert any(p.suffix == ".safetensors" for p in scratch[0].iterdir())  # the fused experts, written once for this load
    assert input_device(model) == torch.device("cpu")
    del model
    gc.collect()
    assert not any(off.iterdir())
    with pytest.raises(AuditError, match="scratch files never go into an input"):
        md.load_model(device="auto", offload_folder=path / "off")
    assert not (path / "off").exists()
    with pytest.raises(AuditError, match="pass --device auto"):
        md.load_model(max_memory={"cpu": 10})


@pytest.mark.parametrize("spec,want", [("cpu=2GiB", {"cpu": 2 << 30}), ("0=70GiB, cpu=200GiB", {0: 70 << 30, "cpu": 200 << 30}),
                                       ("cpu=500MB", {"cpu": 500 * 10**6}), ("cpu=1234", {"cpu": 1234})])
def test_max_memory_parsed(spec, want):
    from audit.model.loading import parse_max_memory

    assert parse_max_memory(spec) == want


@pytest.mark.parametrize("spec,match", [("cpu", "DEVICE=SIZE"), ("gpu=1GB", "unknown device"), ("cpu=big", "not a size"), ("", "at least one"),
                                        ("cpu=1GB,cpu=2GB", "twice")])
def test_max_memory_refused(spec, match):
    from audit.model.loading import parse_max_memory

    with pytest.raises(AuditError, match=match):
        parse_max_memory(spec)


def test_bounded_loading_reads_the_same_weights_and_puts_transformers_back(tmp_path, tiny_model, tiny_tok, monkeypatch):
    """load_model reads with pread, one conversion at a time (bounded_loading): the same tensors as transformers' own
    loading, and its safe_open and HF_DEACTIVATE_ASYNC_LOAD are as they were afterwards."""
    import os

    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "0")
    before = mu.safe_open
    path = tiny_model("qwen3_moe", sharded=True)
    got = ModelDir(path).load_model().state_dict()
    want = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert mu.safe_open is before and os.environ["HF_DEACTIVATE_ASYNC_LOAD"] == "0"
