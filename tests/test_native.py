"""audit/weights/native.py: the C kernels against float64 on shapes with every kind of tail, and the fallback
to torch where they cannot be built or read a tensor."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from audit.weights import native
from audit.weights.pair_stats import pair_stats

needs_kernels = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the C kernels cannot be built here")


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """[P, H, Q] -> the [H, P*Q] float64 view the kernels work on."""
    P, H, Q = x.shape
    return x.double().permute(1, 0, 2).reshape(H, P * Q)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    if want.numel():
        assert float((got.double() - want).abs().max()) <= rel * max(float(want.abs().max()), 1e-30)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 50, 1), (70, 33, 1), (1, 50, 37), (2, 33, 300), (4, 7, 257), (2, 9, 1601), (1, 1, 5), (5, 1, 1)])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_kernels_match_float64(dtype, shape, m):
    """Residual axis last (Q = 1) and not (row panels, tiles of CB columns), tails of 16 lanes and 4 rows, 1, 4 and 8 directions."""
    K = native.kernels()
    g = torch.Generator().manual_seed(sum(shape) * m)
    P, H, Q = shape
    x0 = torch.randn(shape, generator=g).to(dtype)
    x1 = (x0.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype)
    R = torch.randn(m, H, generator=g)
    m0, m1 = _matrix(x0), _matrix(x1)

    a0, a1, sums = torch.zeros(m, P * Q), torch.zeros(m, P * Q), torch.zeros(P, 3, dtype=torch.float64)
    K.project(x0, x1, R, a0, a1, sums)
    _close(a0, R.double() @ m0)
    _close(a1, R.double() @ m1)
    want = torch.stack([x0.double().square().sum((1, 2)), x1.double().square().sum((1, 2)), (x1.double() - x0.double()).square().sum((1, 2))], 1)
    _close(sums, want)

    single = torch.zeros(m, P * Q)
    K.project(x0, None, R, single, None)
    _close(single, R.double() @ m0)
    sq = torch.zeros(m, P * Q)
    K.project(x1, None, R, sq, None, square=True)
    _close(sq, R.double() @ m1.square())

    t, z = torch.randn(P * Q, generator=g), torch.zeros(H)
    K.apply_d(x0, x1, t, z)
    _close(z, (m1 - m0) @ t.double())

    flat = torch.zeros(3, dtype=torch.float64)
    K.sums(x0.reshape(-1), x1.reshape(-1), flat)
    _close(flat, want.sum(0))


@needs_kernels
def test_kernels_refuse_what_they_cannot_take():
    K = native.kernels()
    x = torch.randn(1, 8, 1)
    with pytest.raises(ValueError):  # directions come one, or 4 at a time
        K.project(x, x, torch.randn(3, 8), torch.zeros(3, 1), torch.zeros(3, 1))
    assert not native.usable(torch.randn(4, 4).half()) and not native.usable(torch.randn(4, 4).t())
    assert native.usable(torch.randn(4, 4).bfloat16(), torch.randn(4))


@needs_kernels
@pytest.mark.parametrize("shape,axis,ea,ne", [((48, 70), 0, None, 0), ((70, 48), 1, None, 0), ((4, 48, 30), 1, 0, 4), ((4, 30, 48), 2, 0, 4)])
def test_pair_stats_native_equals_torch(shape, axis, ea, ne):
    """The two paths of pair_stats give the same record to float32 rounding, with directions and without."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(shape, generator=g).bfloat16()
    w1 = (w0.float() * (1 + 0.1 * torch.randn(shape, generator=g))).bfloat16()
    r = torch.nn.functional.normalize(torch.randn(shape[axis], generator=g), dim=0)
    for dirs in ({"a": r}, {}):
        a, b = (pair_stats(w0, w1, axis, dirs, ea, ne, native=n) for n in (True, False))
        assert a.base_fro == pytest.approx(b.base_fro, rel=1e-6) and a.diff_fro == pytest.approx(b.diff_fro, rel=1e-5)
        if ne:
            assert a.expert_rel_change == pytest.approx(b.expert_rel_change, rel=1e-5)
        for k in dirs:
            assert a.dirs[k].after == pytest.approx(b.dirs[k].after, rel=1e-5) and a.dirs[k].floor == pytest.approx(b.dirs[k].floor, rel=1e-5)
        assert abs(float(a.recovery.direction @ b.recovery.direction)) > 0.9999


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """native's loader forgets its library before and after the test; temporary files go under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    native._load.cache_clear()
    yield tmp_path
    native._load.cache_clear()


def test_disabled_or_not_built_falls_back_to_torch(monkeypatch, fresh_loader):
    """AUDIT_NATIVE=0, or no library in the package (no compiler at install): no kernels, and pair_stats still answers (through torch)."""
    w0 = torch.randn(16, 5).bfloat16()
    w1 = (w0.float() * 1.5).bfloat16()
    monkeypatch.setenv("AUDIT_NATIVE", "0")
    assert native.kernels() is None
    with pytest.raises(RuntimeError, match="unavailable"):
        pair_stats(w0, w1, 0, {}, native=True)
    assert pair_stats(w0, w1, 0, {}).rel_change == pytest.approx(0.5, rel=1e-2)

    monkeypatch.setenv("AUDIT_NATIVE", "1")
    monkeypatch.setattr(native, "library_path", lambda: None)
    assert native.kernels() is None and not native.built()
    assert pair_stats(w0, w1, 0, {}).rel_change == pytest.approx(0.5, rel=1e-2)


def test_kernels_are_built_at_install_where_a_compiler_exists():
    """A build failure at install time must not hide as skipped tests: where a C compiler exists, the
    extension is there and loads (issue 15)."""
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine: the kernels are optional")
    lib = native.library_path()
    assert lib is not None, "audit/weights/_pair_kernels was not built at install time (see the pip install log)"
    assert lib.parent == Path(native.__file__).resolve().parent
    assert native.kernels() is not None


def test_never_loads_code_from_a_cache_or_temporary_folder(monkeypatch, fresh_loader):
    """Nothing is compiled at run time and nothing is loaded from $AUDIT_CACHE or /tmp, where another local
    user could plant a library: only the package's own file counts."""
    planted = [fresh_loader / "tmp" / "moe-ablation-audit-0" / "pair_kernels-0123456789abcdef.so",
               fresh_loader / "cache" / "kernels" / "pair_kernels-0123456789abcdef.so"]
    for f in planted:
        f.parent.mkdir(parents=True)
        f.write_bytes(b"not a library")
    monkeypatch.setenv("AUDIT_CACHE", str(fresh_loader / "cache"))
    monkeypatch.setattr(native, "library_path", lambda: None)
    assert native.kernels() is None
    import inspect

    src = inspect.getsource(native)
    assert "subprocess" not in src and "gettempdir" not in src and "mkstemp" not in src


def _numbers(x, out: dict, path: str = "") -> dict:
    """Every float in a results tree by its path, timings left out (for a tolerance comparison of two runs)."""
    if isinstance(x, dict):
        for k in x:
            if "seconds" not in k and not k.endswith("_s"):
                _numbers(x[k], out, f"{path}/{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _numbers(v, out, f"{path}/{i}")
    elif isinstance(x, float):
        out[path] = x
    return out


@needs_kernels
@pytest.mark.parametrize("family", ["glm4_moe", "gpt_oss", "llama4_text", "qwen2"])
def test_static_audit_same_verdicts_on_both_paths(family, tiny_model, tmp_path, monkeypatch):
    """The whole weights stage on a model ablated by hand (writers of layers 0-1, bf16): same statuses,
    findings and classes with the kernels and with torch, numbers equal to float32 rounding."""
    from audit.model.directory import ModelDir
    from audit.weights.static_audit import static_audit
    from tests.helpers_ablation import edit_fn, rewrite

    base = tiny_model(family)
    h = ModelDir(base).layout.hidden_size
    r = torch.nn.functional.normalize(torch.randn(h, generator=torch.Generator().manual_seed(3)), dim=0)
    out = rewrite(base, tmp_path / "abl", edit_fn(r, {"attn_out", "mlp_down", "experts_down", "shared_down"}, {0, 1}, family=family))
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("AUDIT_NATIVE", flag)
        runs.append({k: v.to_dict() for k, v in static_audit(out, base=base).items()})
    a, b = runs
    for name in a:
        assert (a[name]["status"], a[name]["summary"]) == (b[name]["status"], b[name]["summary"]), name
        assert [f["id"] if "id" in f else f.get("title") for f in a[name]["findings"]] == \
               [f["id"] if "id" in f else f.get("title") for f in b[name]["findings"]], name
    na, nb = _numbers(a, {}), _numbers(b, {})
    assert na.keys() == nb.keys()
    assert na == pytest.approx(nb, rel=2e-3, abs=1e-6)
