"""audit/model/reader.py maps exactly the bytes written (runs, gaps, unaligned and empty tensors), and the
two-worker comparison gives the same records as one worker, whatever the chunk size (to float32
noise: hints from a worker's previous tensors add gemm rows)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from audit.weights.compare import compare_models, open_pair
from audit.model.directory import ModelDir
from audit.model.shards import TAG_OF
from audit.model.reader import chunks, map_tensors, read_pairs
from checks.errors import AuditError
from checks.layout import targets_of


def _write_raw(path, tensors, gap: int = 0, shift: int = 0):
    """A safetensors file with ``gap`` zero bytes between tensors and data starting ``shift`` bytes after an 8-aligned header."""
    header, off, blobs = {}, shift, [b"\0" * shift]
    for name, t in tensors:
        b = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": TAG_OF[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs += [b, b"\0" * gap]
        off += len(b) + gap
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


@pytest.mark.parametrize("gap,shift", [(0, 0), (6, 0), (1 << 17, 0), (3, 1)])
def test_mapped_tensors_equal_safetensors(tmp_path, gap, shift):
    g = torch.Generator().manual_seed(0)
    ts = [("a", torch.randn(5, 7, generator=g).bfloat16()), ("b", torch.randn(3, generator=g)), ("empty", torch.zeros(0, 4)),
          ("c", torch.randint(-100, 100, (9,), generator=g, dtype=torch.int8)), ("d", torch.randn(2, 3, 4, generator=g).half())]
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _write_raw(d / "model.safetensors", ts, gap, shift)
    want = dict(ts)
    if gap == shift == 0:  # a well-formed file: what safetensors itself reads
        assert all(torch.equal(load_file(str(d / "model.safetensors"))[k], t) for k, t in ts)
    if gap == shift == 0:
        md = ModelDir(d)
    else:  # gaps are refused when a model is opened (issue 15); the mapper still maps exactly what a header says
        with pytest.raises(AuditError, match="gap"):
            ModelDir(d)
        md = _unvalidated(d)
    got = map_tensors(md, list(md.tensors.values()), {})
    assert got.keys() == want.keys()
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k


def _unvalidated(d):
    """The header's TensorInfos as written, without ModelDir's validation: to test the mapper on odd layouts."""
    from types import SimpleNamespace

    from audit.model.shards import TensorInfo

    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    infos = {k: TensorInfo(k, tuple(h["shape"]), h["dtype"], "model.safetensors", 8 + n + h["data_offsets"][0], 8 + n + h["data_offsets"][1])
             for k, h in header.items() if k != "__metadata__"}
    return SimpleNamespace(path=d, tensors=infos, file=lambda shard: d / shard)


def test_unmappable_files_are_read_instead(tmp_path, monkeypatch):
    import mmap

    ts = [("a", torch.randn(5, 7).bfloat16()), ("b", torch.randn(3))]
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _write_raw(d / "model.safetensors", ts)

    def no_mmap(*a, **k):
        raise OSError(19, "No such device")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    md = ModelDir(d)
    got = map_tensors(md, list(md.tensors.values()), {})
    assert all(torch.equal(got[k], t) for k, t in ts)


def test_read_pairs_identity_and_unmatched(tiny_model, tmp_path):
    from audit.model.shards import write_shard

    base = ModelDir(tiny_model("qwen3_moe"))
    ts = load_file(str(base.path / "model.safetensors"))
    key = next(k for k in ts if k.endswith("o_proj.weight"))
    changed = dict(ts)
    changed[key] = ts[key] + 1
    changed["extra.weight"] = torch.ones(3)
    dst = tmp_path / "abl"
    dst.mkdir()
    (dst / "config.json").write_text((base.path / "config.json").read_text())
    write_shard(dst / "model.safetensors", sorted(changed.items()))
    md_a = ModelDir(dst)
    order = sorted(md_a.tensors.values(), key=lambda t: (t.shard, t.begin))
    seen = {ia.name: (ib, w1, w0, same) for g in chunks(order, 4096) for ia, ib, w1, w0, same in read_pairs(md_a, base, g, {})}
    assert seen["extra.weight"][0] is None and seen["extra.weight"][1] is None
    assert seen[key][3] is False and torch.equal(seen[key][1], changed[key]) and torch.equal(seen[key][2], ts[key])
    assert all(v[3] for k, v in seen.items() if k not in (key, "extra.weight"))


@pytest.mark.parametrize("chunk", [1, 1 << 12, 1 << 30])
def test_workers_and_chunks_do_not_change_results(tiny_model, tmp_path, chunk):
    from tests.helpers_ablation import edit_fn, rewrite

    base = tiny_model("qwen3_moe", sharded=True)
    lay = ModelDir(base).layout
    g = torch.Generator().manual_seed(3)
    units = [torch.nn.functional.normalize(torch.randn(lay.hidden_size, generator=g), dim=0) for _ in range(lay.num_layers)]
    out = rewrite(base, tmp_path / "abl", edit_fn(units[0], {"attn_out", "experts_down", "experts_gate"}, set(range(lay.num_layers)), scale=0.9))

    def dirs(key, role):
        return {"local": units[0 if role.layer is None else role.layer]}

    one = compare_models(*open_pair(out, base), dirs, workers=1, chunk=1 << 30)
    two = compare_models(*open_pair(out, base), dirs, workers=2, chunk=chunk)
    assert [x.__dict__ for x in one.diffs] == [x.__dict__ for x in two.diffs]
    assert [p.key for p in one.projections] == [p.key for p in two.projections]
    for p1, p2 in zip(one.projections, two.projections):
        for k, ds in p1.dirs.items():
            other = p2.dirs[k]
            scale = max(ds.before, 1e-12)
            for f in ("before", "after", "floor"):
                assert getattr(other, f) == pytest.approx(getattr(ds, f), abs=1e-5 * scale), (p1.key, f)
    assert [r.key for r in one.recoveries] == [r.key for r in two.recoveries] and one.recoveries
    for a, b in zip(one.recoveries, two.recoveries):  # hints differ by worker: the same direction, found by another path
        assert abs(float(a.recovery.direction @ b.recovery.direction)) > 0.999
        assert a.recovery.scale == pytest.approx(b.recovery.scale, abs=1e-3)
    assert one.bytes_read == two.bytes_read > 0
    assert any(x.status == "changed" and x.changed_targets == targets_of(lay.roles[x.key]) for x in two.diffs)
