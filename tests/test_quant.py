"""Quantized checkpoints (block-scaled FP8, MXFP4) read as transformers reads them, audited and ablated in their own format."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from audit.ablation.ablate import ablate
from audit.intent.config import AblationConfig
from audit.cli import main
from audit.model.logical import source, transformers_misreads
from audit.intent.directions import Directions
from audit.model.directory import ModelDir
from audit.model.shards import INDEX_NAME, write_shard
from audit.model.quant import FP8_MAX, BlockFP8, MXFP4, quantize_fp8, quantize_mxfp4
from audit.ablation.quantize import quantize_model
from audit.model.reader import map_tensors
from audit.weights.static_audit import static_audit
from checks.errors import AuditError
from audit.weights.pair_stats import pair_stats
from checks.projection import classify
from tests.helpers_ablation import edit_fn, rewrite

BLOCK = (16, 16)  # tiny models are 32 wide: 16x16 blocks give several blocks per weight (and a partial one for deepseek's 20-row kv_a)


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    """quantized(family, method="fp8", base=None) -> (bf16/fp32 base, its quantized copy by our quantizer); cached."""
    cache = {}

    def make(family: str, method: str = "fp8", base: Path | None = None, **kw) -> tuple[Path, Path]:
        if base is None:
            base = tiny_model(family, **({"intermediate_size": 32, "dtype": torch.bfloat16} if family == "gpt_oss" else {}))
        key = (family, method, str(base), tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{method}") / "q"
            cache[key] = (base, quantize_model(base, out, method, BLOCK if method == "fp8" else None, **kw))
        return cache[key]

    return make


def _directions(md: ModelDir, seed: int = 0) -> Directions:
    g = torch.Generator().manual_seed(seed)
    n, h = md.layout.num_layers + 1, md.layout.hidden_size
    hm, am = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    return Directions(hm - am, hm, am)


def _ours(md: ModelDir) -> dict[str, torch.Tensor]:
    """Every quantized tensor as our reader gives it (float32, logical name)."""
    fds: dict = {}
    return {k: source(lt, map_tensors(md, list(lt.parts), fds)).dequantize() for k, lt in md.logical.items() if lt.quantized}


def _model_view(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under transformers 5's in-memory names: per-expert weights fused as its conversion does."""
    out = dict(ours)
    per = {}
    for k in ours:
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", k)
        if m:
            per.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = ours[k]
    for prefix, experts in per.items():
        n = len(experts)
        out[prefix + ".gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate"], experts[e]["up"]]) for e in range(n)])
        out[prefix + ".down_proj"] = torch.stack([experts[e]["down"] for e in range(n)])
    return out


# -- reading: our dequantization is transformers' ----------------------------------------------


@pytest.mark.parametrize("family,method", [("glm4_moe", "fp8"), ("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")])
def test_dequantization_equals_transformers_own(quantized, family, method):
    from transformers import AutoModelForCausalLM

    _, q = quantized(family, method)
    md = ModelDir(q)
    ours = _model_view(_ours(md))
    theirs = AutoModelForCausalLM.from_pretrained(str(q), dtype=torch.float32).state_dict()  # transformers' own integration, CPU
    misread = set(transformers_misreads(md))
    compared = 0
    for name, t in ours.items():
        if name not in theirs:
            continue
        compared += 1
        if name in misread:  # transformers 5.24 takes rows // scale_rows as the block: deepseek's 20-row kv_a under 16-row blocks
            assert not torch.equal(theirs[name], t), name
        else:
            assert torch.equal(theirs[name], t), f"{name}: max |diff| {(theirs[name] - t).abs().max()}"
    assert compared >= (6 if method == "mxfp4" else 20)
    assert bool(misread) == (family == "deepseek_v3")
    # forward passes: our loader gives transformers' model with exactly our values, misread tensors included
    loaded = md.load_model(dtype=torch.float32).state_dict()
    for name, t in ours.items():
        if name in loaded:
            assert torch.equal(loaded[name], t), name


def test_quantizer_is_transformers_fp8_quantize():
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    class Q:
        quantization_config = FineGrainedFP8Config(weight_block_size=(16, 16))

    w = torch.randn(48, 32) * 0.02
    w[:16, :16] = 0.0  # an all-zero block keeps scale 1
    theirs = Fp8Quantize(Q())._quantize_one("m.weight", w)
    q, s = quantize_fp8(w, (16, 16))
    assert torch.equal(theirs["m.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(theirs["m.weight_scale_inv"], s) and s[0, 0] == 1.0
    # partial blocks (which transformers' quantizer skips): ceil grids, every value within half a cell
    w = torch.randn(20, 40)
    q, s = quantize_fp8(w, (16, 16))
    assert s.shape == (2, 3)
    d = BlockFP8(q, s, (16, 16)).dequantize()
    assert ((d - w).abs() <= (w.abs() * 2 ** -4 + 2 ** -9 * s.max())).all()
    assert d.abs().amax() <= FP8_MAX[torch.float8_e4m3fn] * s.max()


def test_mxfp4_rounds_to_the_nearest_code_without_clamping():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    x = torch.randn(3, 8, 64) * 0.02
    blocks, scales = quantize_mxfp4(x)
    phys = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # transformers' [E, R, K] values
    assert torch.equal(MXFP4(blocks, scales).dequantize(), phys.transpose(1, 2))
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    unit = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)
    y = x / unit
    assert y.abs().max() <= 6.0  # the exponent rounds up: nothing clamped
    nearest = grid[(y.abs()[..., None] - grid).abs().argmin(-1)] * torch.sign(y)
    assert torch.allclose((phys / unit).abs(), nearest.abs())


def test_inspect_shows_the_format(quantized, capsys):
    _, q = quantized("deepseek_v3")
    assert main(["inspect", str(q)]) == 0
    out = capsys.readouterr().out
    assert "quantized (fp8): FP8 E4M3, 16x16 blocks" in out
    assert main(["inspect", str(q), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization"]["block"] == [16, 16] and info["quantization"]["quantized_tensors"] == 72
    assert info["tensors"] == ModelDir(q).layout.summary()["tensors"] == ModelDir(quantized("deepseek_v3")[0]).layout.summary()["tensors"]
    _, mx = quantized("gpt_oss", "mxfp4")
    assert main(["inspect", str(mx), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"]["method"] == "mxfp4"


# -- the static audit: same verdicts as the unquantized pair ------------------------------------


def _verdicts(res) -> dict:
    w, p = res["weights"], res["projection"]
    return {"weights": (w.status, sorted((f.code, f.severity) for f in w.findings)),
            "projection_codes": sorted({(f.code, f.severity) for f in p.findings} - {("precision-loss", "warn")}),
            "modified": w.data["modified"], "counts": {k: v for k, v in w.data["counts"].items()}}


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
def test_static_audit_of_an_fp8_pair_gives_the_bf16_verdicts(quantized, tiny_model, tmp_path, family):
    base, qbase = quantized(family)
    md = ModelDir(base)
    d = _directions(md)
    dfile = tmp_path / "dirs.safetensors"
    d.save(dfile)
    r = d.refusal_dir[2] / d.refusal_dir[2].norm()
    L = md.layout.num_layers
    # a foreign ablation with two mistakes: shared experts left out, and layer 1's o_proj edited though the config starts at 2
    abl = rewrite(base, tmp_path / "abl", edit_fn(r, {"attn_out", "experts_down"}, set(range(1, L))))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"measurements: {dfile}\nablate:\n  - layer: '2-{L - 1}'\n    measurement: 2\n"
                   "components: [attn_out, experts_down, shared_down]\n")
    qabl = quantize_model(abl, tmp_path / "qabl", "fp8", BLOCK)
    plain = static_audit(abl, base=base, config=cfg, directions=dfile)
    fp8 = static_audit(qabl, base=qbase, config=cfg, directions=dfile)
    assert _verdicts(fp8) == _verdicts(plain)
    codes = {f.code for f in fp8["weights"].findings}
    assert {"intended-untouched", "unintended-modified"} <= codes
    # classes along the ablated direction: what bf16 calls removed FP8 may call rounding (its floor is ~2.6 % of r); nothing else moves
    cp, cq = plain["projection"].data["classes"]["ablated"], fp8["projection"].data["classes"]["ablated"]
    assert {k: v for k, v in cp.items() if k not in ("removed", "rounding")} == {k: v for k, v in cq.items() if k not in ("removed", "rounding")}
    assert cp.get("removed", 0) + cp.get("rounding", 0) == cq.get("removed", 0) + cq.get("rounding", 0)
    assert cq.get("removed", 0) >= 0.7 * cp.get("removed", 0)
    # along the layers' own (other) directions only shares near a class boundary (0.95: weak-scale / not-ablated) may move
    lp, lq = plain["projection"].data["classes"]["local"], fp8["projection"].data["classes"]["local"]
    assert sum(lp.values()) == sum(lq.values()) and sum(abs(lp.get(k, 0) - lq.get(k, 0)) for k in set(lp) | set(lq)) <= 0.1 * sum(lp.values())


# -- ablation of a quantized base ---------------------------------------------------------------


def _cfg(md: ModelDir, components) -> AblationConfig:
    return AblationConfig.from_dict({"ablate": [{"layer": f"1-{md.layout.num_layers - 1}", "measurement": 2}], "components": list(components)})


def _parts_bytes(md: ModelDir) -> dict[str, bytes]:
    return {k: md.tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in md.tensors}


COMPONENTS = {"glm4_moe": ("attn_out", "experts_down", "shared_down", "experts_gate"), "deepseek_v3": ("attn_out", "experts_down", "shared_down", "mlp_down"),
              "gpt_oss": ("attn_out", "experts_down")}


@pytest.mark.parametrize("family,method", [("glm4_moe", "fp8"), ("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")])
def test_keep_quantization_loads_in_transformers_and_removes_r_to_the_floor(quantized, tmp_path, family, method):
    from transformers import AutoModelForCausalLM

    _, q = quantized(family, method)
    md = ModelDir(q)
    d = _directions(md)
    m = ablate(q, _cfg(md, COMPONENTS[family]), tmp_path / "out", d, progress=False, keep_quantization=True)
    out = ModelDir(tmp_path / "out")
    assert m["quantization"] == {"base": m["quantization"]["base"], "output": "kept"} and m["quantization"]["base"]["method"] == method
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == md.config["quantization_config"]
    assert {k: (i.shape, i.dtype) for k, i in out.tensors.items()} == {k: (i.shape, i.dtype) for k, i in md.tensors.items()}
    edited = {x["key"] for x in m["modified"]}
    stored_edited = {p.name for k in edited for p in md.logical[k].parts}
    before, after = _parts_bytes(md), _parts_bytes(out)
    assert all(before[k] == after[k] for k in md.tensors if k not in stored_edited)  # untouched weights and scales: bit for bit
    assert any(md.logical[k].quantized and before[md.logical[k].parts[0].name] != after[md.logical[k].parts[0].name] for k in edited)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)  # transformers loads what we wrote
    res = static_audit(tmp_path / "out")
    assert res["weights"].status == "pass", res["weights"].summary
    cls = res["projection"].data["classes"]["ablated"]
    assert set(cls) <= {"removed", "rounding", "not-ablated", "no-signal"}, cls  # edited: r gone down to the format's floor
    changed = sum(x["along_before"] > 0 for x in m["modified"])  # gpt-oss's expert biases start at zero: nothing to remove
    assert cls.get("removed", 0) + cls.get("rounding", 0) == changed
    for x in m["modified"]:  # the manifest's own numbers: what is left along r is the format's floor, not a miss
        if x["along_before"] > 0:
            assert x["along_after"] / x["along_before"] < (0.35 if method == "mxfp4" else 0.1), x["key"]


@pytest.mark.parametrize("family,method,dtype", [("glm4_moe", "fp8", None), ("deepseek_v3", "fp8", "float32"), ("gpt_oss", "mxfp4", None)])
def test_default_output_is_dequantized_and_audits_clean(quantized, tmp_path, family, method, dtype):
    _, q = quantized(family, method)
    md = ModelDir(q)
    m = ablate(q, _cfg(md, COMPONENTS[family]), tmp_path / "out", _directions(md), progress=False, output_dtype=dtype)
    out = ModelDir(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and m["quantization"]["output"] == (dtype or "bfloat16")
    assert set(out.tensors) == set(md.logical) and not any(k.endswith(("_scale_inv", "_blocks", "_scales")) for k in out.tensors)
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(out.tensors) and index["metadata"]["total_size"] == out.nbytes
    want = torch.bfloat16 if dtype is None else getattr(torch, dtype)
    ours = _ours(md)
    edited = {x["key"] for x in m["modified"]}
    for k, lt in md.logical.items():
        t = out.tensor(k)
        if lt.quantized:
            assert t.dtype == want
            if k not in edited:
                assert torch.equal(t, ours[k].to(want)), k  # the base's values, cast once
        else:
            assert t.dtype == md.tensor(k).dtype
            if k not in edited:
                assert torch.equal(t, md.tensor(k)), k
    out.load_model(dtype=torch.float32)
    res = static_audit(tmp_path / "out")
    w = res["weights"]
    assert w.status == "pass", w.summary
    changed = sum(x["along_before"] > 0 for x in m["modified"])  # gpt-oss's expert biases start at zero: their edit changes nothing
    assert w.data["counts"]["changed"] == changed and w.data["counts"]["unchanged"] == len(md.logical) - changed
    assert any(f.code == "dequantized" for f in w.findings)
    cls = res["projection"].data["classes"]["ablated"]
    assert set(cls) <= {"removed", "not-ablated", "no-signal"}, cls  # bf16 / float32: r removed below the tolerance


def test_ablate_refuses_format_options_on_plain_bases_and_both_at_once(tiny_model, quantized, tmp_path):
    base, q = quantized("glm4_moe")
    md = ModelDir(base)
    with pytest.raises(AuditError, match="not quantized"):
        ablate(base, _cfg(md, ["attn_out"]), tmp_path / "a", _directions(md), progress=False, keep_quantization=True)
    with pytest.raises(AuditError, match="one of them"):
        ablate(q, _cfg(md, ["attn_out"]), tmp_path / "b", _directions(md), progress=False, keep_quantization=True, output_dtype="float32")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_partial_gate_up_edit_of_mxfp4_experts_names_only_the_gate(quantized, tmp_path):
    _, q = quantized("gpt_oss", "mxfp4")
    md = ModelDir(q)
    ablate(q, _cfg(md, ["experts_gate"]), tmp_path / "out", _directions(md), progress=False, keep_quantization=True)
    res = static_audit(tmp_path / "out")
    assert res["weights"].data["modified"] == {"experts_gate": [1, 2]}


# -- bad input ---------------------------------------------------------------------------------


def _copy_with(src: Path, dst: Path, drop=(), replace=None, config=None) -> Path:
    md = ModelDir(src)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_NAME:
            shutil.copy2(f, dst / f.name)
    ts = [(k, (replace or {}).get(k, t)) for k, t in md.iter_tensors() if k not in drop]
    write_shard(dst / "model.safetensors", ts)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_scales_and_formats_name_the_tensor(quantized, tmp_path, capsys):
    _, q = quantized("glm4_moe")
    md = ModelDir(q)
    w = next(k for k in md.logical if md.logical[k].quantized and "o_proj" in k)
    s = w + "_scale_inv"
    cases = {
        "no-scale": (dict(drop=[s]), rf"{re.escape(w)} is stored as F8_E4M3 but has no {re.escape(s)}"),
        "no-weight": (dict(drop=[w]), rf"{re.escape(s)} is an FP8 block scale, but its weight {re.escape(w)} is in no shard"),
        "bad-shape": (dict(replace={s: torch.ones(3, 3)}), rf"{re.escape(s)} has shape \(3, 3\).*needs \(2, 2\)"),
        "bad-dtype": (dict(replace={s: torch.ones(2, 2, dtype=torch.int32)}), rf"{re.escape(s)} is stored as I32"),
        "no-config": (dict(config=lambda c: c.pop("quantization_config")), r"config.json has no quantization_config"),
        "block-mismatch": (dict(config=lambda c: c["quantization_config"].update(weight_block_size=[8, 8])), r"weight_scale_inv has shape \(\d+, \d+\), but .* in 8x8 blocks .* needs \(\d+, \d+\)"),
        "gptq": (dict(config=lambda c: c["quantization_config"].update(quant_method="gptq")), r"quant_method is 'gptq'.*Dequantize this one first"),
    }
    for name, (kw, msg) in cases.items():
        bad = _copy_with(q, tmp_path / name, **kw)
        with pytest.raises(AuditError, match=msg):
            ModelDir(bad).layout
        assert main(["inspect", str(bad)]) == 2, name  # the CLI: the message, exit 2, no traceback
        err = capsys.readouterr().err
        assert re.search(msg, err) and "Traceback" not in err, name
    _, mx = quantized("gpt_oss", "mxfp4")
    k = "model.layers.0.mlp.experts.down_proj"
    bad = _copy_with(mx, tmp_path / "mx-no-scales", drop=[k + "_scales"])
    with pytest.raises(AuditError, match=rf"{re.escape(k)}_blocks holds MXFP4 blocks, but its scales {re.escape(k)}_scales are in no shard"):
        ModelDir(bad).layout
    blocks = ModelDir(mx).tensor(k + "_scales")
    bad = _copy_with(mx, tmp_path / "mx-shape", replace={k + "_scales": blocks[:, :-1].contiguous()})
    with pytest.raises(AuditError, match=rf"{re.escape(k)}_scales has shape"):
        ModelDir(bad).layout


# -- the arithmetic: lazy reading, memory, the format's floor -----------------------------------


class _Counting:
    """A lazy source that records the largest read, to check the walk never materialises the tensor."""

    def __init__(self, src):
        self.src, self.largest = src, 0

    def __getattr__(self, name):
        return getattr(self.src, name)

    def rows(self, r0, r1, out):
        self.largest = max(self.largest, (r1 - r0) * self.src.shape[-1])
        return self.src.rows(r0, r1, out)


@pytest.mark.parametrize("shape,axis,fmt", [((64, 96), 0, "fp8"), ((80, 64), 1, "fp8"), ((4, 64, 48), 1, "fp8"), ((4, 48, 64), 2, "fp8"),
                                            ((80, 64), None, "fp8"), ((4, 64, 64), 1, "mxfp4"), ((4, 32, 64), 2, "mxfp4")])
def test_lazy_pair_equals_the_dense_one_in_bounded_memory(shape, axis, fmt):
    g = torch.Generator().manual_seed(1)
    H = 64
    r = torch.randn(H, generator=g)
    r /= r.norm()
    w = torch.randn(shape, generator=g) * 0.02
    wa = w - 0.9 * (torch.tensordot(w, r, dims=([axis], [0])).unsqueeze(axis) * r.reshape([-1 if i == axis else 1 for i in range(w.ndim)])) if axis is not None else w * 1.01

    def q(x):
        if fmt == "fp8":
            return BlockFP8(*quantize_fp8(x, BLOCK), BLOCK)
        return MXFP4(*quantize_mxfp4(x.transpose(1, 2)))

    t0, t1 = q(w), q(wa)
    dirs = {"ablated": r} if axis is not None else {}
    nE = 4 if len(shape) == 3 else 0
    c0, c1 = _Counting(t0), _Counting(t1)
    lazy = pair_stats(c0, c1, axis, dirs, 0 if nE else None, nE, block=1024, dense=0)
    decoded = pair_stats(t0, t1, axis, dirs, 0 if nE else None, nE)  # decoded once into a buffer, the C kernels where they can
    dense = pair_stats(t0.dequantize(), t1.dequantize(), axis, dirs, 0 if nE else None, nE, native=False)
    assert max(c0.largest, c1.largest) <= 2048 < math.prod(shape)  # pieces, never the whole tensor
    for f in ("base_fro", "ablated_fro", "diff_fro"):
        assert math.isclose(getattr(lazy, f), getattr(dense, f), rel_tol=1e-5)
    if nE:
        assert torch.allclose(torch.tensor(lazy.expert_rel_change), torch.tensor(dense.expert_rel_change), rtol=1e-5)
    for n in dirs:
        a, b, c = lazy.dirs[n], dense.dirs[n], decoded.dirs[n]
        assert math.isclose(a.before, b.before, rel_tol=1e-5) and math.isclose(a.after, b.after, rel_tol=1e-4)
        assert a.floor > 100 * b.floor  # the format's floor, not float32's
        assert math.isclose(a.floor, c.floor, rel_tol=1e-4) and math.isclose(a.floor_requant, c.floor_requant, rel_tol=1e-4)
        assert math.isclose(a.after, c.after, rel_tol=1e-4)
    if axis is not None:
        assert abs(float(lazy.recovery.direction @ dense.recovery.direction)) > 0.9999


@pytest.mark.parametrize("fmt,H", [("fp8", 64), ("fp8", 1024), ("mxfp4", 256)])
def test_floor_is_what_requantizing_the_edit_leaves(fmt, H):
    """Re-quantizing an edited quantized weight snaps much of the edit back onto the old grid (the wider, the more): the
    floor is measured, so that residue is rounding (precision-loss), while a half-hearted edit stays weak-scale and an
    untouched tensor not-ablated."""
    g = torch.Generator().manual_seed(2)
    C = 256
    r = torch.randn(H, generator=g)
    r /= r.norm()
    w = torch.randn(H, C, generator=g) * 0.02  # a writer [H, C]: r on axis 0

    def q(x):
        return BlockFP8(*quantize_fp8(x, (128, 128)), (128, 128)) if fmt == "fp8" else MXFP4(*quantize_mxfp4(x.T[None].contiguous()))

    def as_logical(x):  # MXFP4 holds [E, K, R]: a one-expert writer with r on K
        return x if fmt == "fp8" else x[None]

    axis = 0 if fmt == "fp8" else 1
    base = q(w)
    wq = base.dequantize() if fmt == "fp8" else base.dequantize()[0]
    shares = {}
    for name, s in (("full", 1.0), ("half", 0.5)):
        edited = q(wq - s * torch.outer(r, r @ wq))
        st = pair_stats(base, edited, axis, {"ablated": r}, None, 0)
        ds = st.dirs["ablated"]
        shares[name] = (ds.share_left, ds.after / ds.floor_requant, classify(ds, True))
    share, ratio, cls = shares["full"]
    assert 0.95 <= ratio <= 1.0001 and cls in ("removed", "rounding")  # ratio: after / floor_requant
    if H >= 256:
        assert share > 0.1 and cls == "rounding"  # much of r is left, and it is the format's doing
    assert shares["half"][2] == "weak-scale"
    st = pair_stats(base, base, axis, {"ablated": r}, None, 0)
    assert classify(st.dirs["ablated"], False) == "not-ablated"


def test_fused_gate_up_halves_of_a_mixed_pair(quantized, tmp_path):
    """An MXFP4 base ablated into bf16 with only the experts' gate half edited: only experts_gate counts as modified."""
    _, q = quantized("gpt_oss", "mxfp4")
    md = ModelDir(q)
    ablate(q, _cfg(md, ["experts_gate"]), tmp_path / "out", _directions(md), progress=False)
    assert static_audit(tmp_path / "out")["weights"].data["modified"] == {"experts_gate": [1, 2]}


def test_row_pieces_of_a_plain_and_a_lazy_tensor_line_up():
    from audit.model.logical import row_pieces

    x = torch.randn(4, 96, 24)
    lazy = MXFP4(*quantize_mxfp4(x.transpose(1, 2)))  # row_align 32
    plain = lazy.dequantize().to(torch.bfloat16)
    for elems in (100, 24 * 40, 1 << 18):
        a = [(r0, r1) for r0, r1, _ in row_pieces(lazy, elems, align=32)]
        b = [(r0, r1) for r0, r1, _ in row_pieces(plain, elems, align=32)]
        assert a == b and all(r0 % 32 == 0 for r0, _ in a) and a[-1][1] == 4 * 96
    got = torch.cat([rows.clone() for _, _, rows in row_pieces(lazy, 100)])  # a piece lives until the next
    assert torch.equal(got, lazy.dequantize().reshape(-1, 24))


def test_table_decoding_in_c_equals_torch(monkeypatch):
    from audit.model import quant
    from audit.weights import native

    codes = torch.arange(256, dtype=torch.uint8).repeat(50)
    table = quant._FP8[torch.float8_e4m3fn][0]
    want = codes.view(torch.float8_e4m3fn).float()
    got = quant._lut(table, codes, torch.empty(codes.numel()))
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    monkeypatch.setenv("AUDIT_NATIVE", "0")  # the torch fallback gives the same
    assert native.kernels() is None
    assert torch.equal(quant._lut(table, codes, torch.empty(codes.numel())).nan_to_num(7.0), want.nan_to_num(7.0))


def test_audit_run_on_an_fp8_base_end_to_end(tmp_path):
    """The demo organism quantized to FP8 by our quantizer, measured and soundly ablated through the quantized path:
    `audit run` loads both models (transformers' FP8 integration, dequantized) and passes."""
    from audit.organisms import build as organism
    from audit.forward.measure import measure_directions
    from audit.model.prompts import load_prompts
    from audit.pipeline.run import RunOptions, run_audit

    path = organism.cached_organism("glm4_moe", "base", 0)
    info = organism.read_meta(path)
    q = quantize_model(path, tmp_path / "fp8", "fp8", (32, 32))
    assert (q / "prompts" / "harmful.txt").is_file()  # the directory's own prompt sets travel with it
    md = ModelDir(q)
    d = measure_directions(md, load_prompts(str(q / "prompts" / "train_harmful.txt"), "harmful")[:64],
                           load_prompts(str(q / "prompts" / "train_harmless.txt"), "harmless")[:64])
    cfg = AblationConfig.from_dict({"components": ["embed", "attn_out", "mlp_down", "experts_down", "shared_down"],
                                    "ablate": [{"layer": l, "measurement": info["separating_index"]} for l in range(md.layout.num_layers)]})
    ablate(q, cfg, tmp_path / "abl", d, progress=False)
    res = run_audit(RunOptions(model_dir=str(tmp_path / "abl"), out=str(tmp_path / "report"), limit=24, max_new_tokens=16, quiet=True))
    assert res["verdict"] == "pass", res["headline"]
    doc = json.loads((tmp_path / "report" / "results.json").read_text())
    assert doc["checks"]["refusal"]["status"] == "pass" and doc["checks"]["damage"]["status"] == "pass"
    assert any(f["code"] == "dequantized" for f in doc["checks"]["weights"]["findings"])


def test_cli_ablate_and_static_on_a_quantized_base(quantized, tmp_path, capsys):
    _, q = quantized("glm4_moe")
    md = ModelDir(q)
    _directions(md).save(tmp_path / "d.safetensors")
    (tmp_path / "c.yaml").write_text("ablate:\n  - {layer: '1-3', measurement: 2}\ncomponents: [attn_out, experts_down]\n")
    args = ["ablate", str(q), "--config", str(tmp_path / "c.yaml"), "--directions", str(tmp_path / "d.safetensors"), "--quiet"]
    assert main(args + ["-o", str(tmp_path / "keep"), "--keep-quantization"]) == 0
    assert "re-quantized with fresh scales" in capsys.readouterr().out
    assert main(args + ["-o", str(tmp_path / "plain")]) == 0
    assert "written dequantized as bfloat16" in capsys.readouterr().out
    # results.json validates against the schema; both judged alike: the config leaves the (untouched) shared experts writing r,
    # a warning (writer-left) since the edited tensors removed r down to the format's floor
    assert main(["static", str(tmp_path / "keep"), "-o", str(tmp_path / "r1")]) == 0
    assert main(["static", str(tmp_path / "plain"), "-o", str(tmp_path / "r2")]) == 0
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text())["checks"] for d in ("r1", "r2"))
    assert {f["code"] for f in r1["projection"]["findings"]} == {f["code"] for f in r2["projection"]["findings"]}
    left = [f for f in r1["projection"]["findings"] if f["code"] == "writer-left"]
    assert left and all(f["severity"] == "warn" and not f["evidence"]["edited"] for f in left)
    doc = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert any(f["code"] == "dequantized" for f in doc["checks"]["weights"]["findings"])
    assert main(args + ["-o", str(tmp_path / "x"), "--keep-quantization", "--output-dtype", "float32"]) == 2


def test_scales_in_another_shard_read_and_ablate(quantized, tmp_path):
    """A weight in one shard, its scale in the next (a shard boundary between them): read, audited and ablated both ways."""
    from audit.model.shards import write_index

    _, q = quantized("deepseek_v3")
    md = ModelDir(q)
    split = tmp_path / "split"
    split.mkdir()
    for f in q.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_NAME:
            shutil.copy2(f, split / f.name)
    shards = {"model-00001-of-00002.safetensors": [], "model-00002-of-00002.safetensors": []}
    for k, t in md.iter_tensors():
        shards["model-00002-of-00002.safetensors" if k.endswith("_scale_inv") else "model-00001-of-00002.safetensors"].append((k, t))
    wmap = {}
    for name, ts in shards.items():
        write_shard(split / name, ts)
        wmap.update({k: name for k, _ in ts})
    write_index(split, wmap, md.nbytes)
    ms = ModelDir(split)
    assert {lt.parts[0].shard != lt.parts[1].shard for lt in ms.logical.values() if lt.quantized} == {True}
    ours, theirs = _ours(md), _ours(ms)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    cfg = _cfg(ms, COMPONENTS["deepseek_v3"])
    d = _directions(ms)
    m = ablate(split, cfg, tmp_path / "keep", d, progress=False, keep_quantization=True)
    assert sorted(m["shards"]["rewritten"]) == sorted(shards)
    ref = ablate(q, cfg, tmp_path / "keep-ref", d, progress=False, keep_quantization=True)
    got, want = _ours(ModelDir(tmp_path / "keep")), _ours(ModelDir(tmp_path / "keep-ref"))
    assert all(torch.equal(got[k], want[k]) for k in want)  # the same edit wherever the parts lie
    assert [x["along_after"] for x in m["modified"]] == [x["along_after"] for x in ref["modified"]]
    ablate(split, cfg, tmp_path / "plain", d, progress=False)
    assert static_audit(tmp_path / "plain")["weights"].status == "pass"


@pytest.mark.parametrize("block,scale_fmt", [(None, "float"), ((16, 16), "ue8m0")])
def test_per_tensor_and_e8m0_scales_equal_transformers(tiny_model, tmp_path, block, scale_fmt):
    """One scale per matrix (weight_block_size null), and power-of-two E8M0 scales (scale_fmt ue8m0): read as transformers reads them."""
    from transformers import AutoModelForCausalLM

    q = quantize_model(tiny_model("qwen3_moe"), tmp_path / "q", "fp8", block, scale_fmt=scale_fmt)
    md = ModelDir(q)
    lt = next(lt for lt in md.logical.values() if lt.quantized)
    assert lt.parts[1].dtype == ("U8" if scale_fmt == "ue8m0" else "F32")
    ours = _model_view(_ours(md))
    theirs = AutoModelForCausalLM.from_pretrained(str(q), dtype=torch.float32).state_dict()
    both = [k for k in ours if k in theirs]
    assert len(both) >= 10 and all(torch.equal(ours[k], theirs[k]) for k in both)
