"""audit/weights/pair_stats.py against a plain float64 reference (dense matrices, a full SVD) on every
layout the walker has: whole columns (residual axis last), row panels (residual axis first), fused
experts both ways, in pieces far smaller than the tensor, stored as bf16 and as float32."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from audit.weights import native
from audit.weights.pair_stats import pair_stats, round_mse_coeff

H = 48


def _as_matrix(w: torch.Tensor, axis: int) -> torch.Tensor:
    """[H, rest] float64 with the residual axis first and the rest in [P, Q] order (the walker's column order)."""
    w = w.double()
    p = math.prod(w.shape[:axis])
    return w.reshape(p, w.shape[axis], -1).transpose(0, 1).reshape(w.shape[axis], -1)


def _edit(m: torch.Tensor, r: torch.Tensor, s: float, cols: slice = slice(None)) -> torch.Tensor:
    out = m.clone()
    out[:, cols] -= s * torch.outer(r, r @ m[:, cols])
    return out


def _from_matrix(m: torch.Tensor, shape: tuple, axis: int) -> torch.Tensor:
    p = math.prod(shape[:axis])
    return m.reshape(shape[axis], p, -1).transpose(0, 1).reshape(shape)


LAYOUTS = {  # name: (shape, residual axis, experts axis, number of experts)
    "writer [H, in]": ((H, 70), 0, None, 0),
    "reader [out, H]": ((70, H), 1, None, 0),
    "fused [E, H, I]": ((4, H, 30), 1, 0, 4),
    "fused [E, I, H]": ((4, 30, H), 2, 0, 4),
    "vector [H]": ((H,), 0, None, 0),
}


NO_KERNELS = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the C kernels cannot be built here")
NATIVE = pytest.param(True, marks=NO_KERNELS, id="native")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("edit", ["along r", "half scale", "reflect", "some columns", "unknown direction", "noise"])
@pytest.mark.parametrize("block,retain,use_native", [
    pytest.param(37, 1 << 23, False, id="torch-pieces"), pytest.param(37, 3000, False, id="torch-one-p"),
    pytest.param(37, 0, False, id="torch-none-kept"), pytest.param(1 << 18, 1 << 23, False, id="torch-whole"),
    pytest.param(1 << 18, 1 << 23, True, marks=NO_KERNELS, id="native")])
def test_matches_float64_reference(dtype, layout, edit, block, retain, use_native):
    """``retain``: the whole change kept (the common case), one p's (fused row panels), none (one more pass / per-piece products);
    torch's pieces (``block``, ``retain``) or the C kernels, which read whole tensors."""
    shape, axis, ea, ne = LAYOUTS[layout]
    g = torch.Generator().manual_seed(zlib.crc32(f"{layout}|{edit}".encode()))
    r = torch.nn.functional.normalize(torch.randn(H, generator=g, dtype=torch.float64), dim=0)
    other = torch.nn.functional.normalize(torch.randn(H, generator=g, dtype=torch.float64), dim=0)
    w0 = torch.randn(shape, generator=g).to(dtype)
    m0 = _as_matrix(w0, axis)
    n = m0.shape[1]
    if edit == "noise":
        m1 = m0 + 0.01 * torch.randn(m0.shape, generator=g, dtype=torch.float64)
    else:
        d, s, cols = {"along r": (r, 1.0, slice(None)), "half scale": (r, 0.5, slice(None)), "reflect": (r, 2.0, slice(None)),
                      "some columns": (r, 1.0, slice(0, max(1, n // 3))), "unknown direction": (other, 1.0, slice(None))}[edit]
        m1 = _edit(m0, d, s, cols)
    w1 = _from_matrix(m1, shape, axis).to(dtype)
    m1 = _as_matrix(w1, axis)  # what was stored
    st = pair_stats(w0, w1, axis, {"ablated": r.float()}, ea, ne, block=block, retain=retain, native=use_native)

    dm = m1 - m0
    assert st.base_fro == pytest.approx(float(m0.norm()), rel=1e-5)
    assert st.ablated_fro == pytest.approx(float(m1.norm()), rel=1e-5)
    assert st.diff_fro == pytest.approx(float(dm.norm()), rel=1e-4)
    v0, v1 = r @ m0, r @ m1
    ds = st.dirs["ablated"]
    scale = float(m0.norm())  # float32 sums: errors of about 1e-7 of the tensor's norm
    assert ds.before == pytest.approx(float(v0.norm()), abs=1e-5 * scale)
    assert ds.after == pytest.approx(float(v1.norm()), abs=1e-5 * scale)
    assert ds.dot == pytest.approx(float(v0 @ v1), abs=1e-5 * scale ** 2)
    floor = math.sqrt(round_mse_coeff(dtype) * float((r * r) @ (m1 * m1).sum(1)))
    assert ds.floor == pytest.approx(floor, rel=1e-4, abs=1e-12)
    if ne:
        per = m0.shape[1] // ne
        for e in range(ne):
            cs = slice(e * per, (e + 1) * per)
            assert ds.per_expert["before"][e] == pytest.approx(float(v0[cs].norm()), abs=1e-5 * scale)
            assert ds.per_expert["after"][e] == pytest.approx(float(v1[cs].norm()), abs=1e-5 * scale)
            assert st.expert_rel_change[e] == pytest.approx(float(dm[:, cs].norm() / m0[:, cs].norm()), rel=1e-4)

    u, sv, _ = torch.linalg.svd(dm, full_matrices=False)
    rec = st.recovery
    assert rec is not None
    # a given direction explaining >= 99 % of the change reports its own share: a lower bound of sigma_1^2 / ||D||^2
    assert rec.rank1_share == pytest.approx(float(sv[0] ** 2 / (sv ** 2).sum()), abs=5e-3 if edit != "noise" else 0.15)
    if edit != "noise":  # a directional edit: the top singular vector, and the scale along it
        assert abs(float(rec.direction.double() @ u[:, 0])) > 0.9999
        want = {"half scale": 0.5, "reflect": 2.0}.get(edit, 1.0)
        rounding = 3 * rec.along.floor / rec.along.before  # what storing W' in its dtype can move the scale by
        if n > 1:  # one column: the recovered direction is that column's change, rounding error included, so the scale along it is too
            assert rec.scale == pytest.approx(want, abs=1e-4 + rounding)


BOTH = [False, NATIVE]


@pytest.mark.parametrize("use_native", BOTH)
def test_identical_pair_projects_base_only(use_native):
    shape, axis = (H, 70), 0
    w0 = torch.randn(shape).bfloat16()
    r = torch.nn.functional.normalize(torch.randn(H), dim=0)
    st = pair_stats(w0, w0.clone(), axis, {"ablated": r}, block=37, native=use_native)
    assert st.identical and st.recovery is None and st.base_fro is None
    assert st.dirs["ablated"].before == pytest.approx(float((r.double() @ w0.double()).norm()), rel=1e-5)
    assert st.dirs["ablated"].after == st.dirs["ablated"].before


@pytest.mark.parametrize("use_native", BOTH)
@pytest.mark.parametrize("shape,axis", [((H, 0), 0), ((0, H), 1), ((2, H, 0), 1)])
def test_empty_tensors(shape, axis, use_native):
    r = torch.nn.functional.normalize(torch.randn(H), dim=0)
    for w1 in (torch.zeros(shape), torch.ones(shape)):  # identical by bytes, and "changed" when told so
        st = pair_stats(torch.zeros(shape), w1, axis, {"ablated": r}, identical=None if w1.sum() == 0 else False, native=use_native)
        assert st.rel_change == 0.0 and st.dirs["ablated"].before == 0.0 and st.recovery is None


@pytest.mark.parametrize("use_native", BOTH)
def test_nonfinite_change_counted_not_recovered(use_native):
    w0 = torch.randn(H, 9)
    w1 = w0.clone()
    w1[3, 4] = float("nan")
    st = pair_stats(w0, w1, 0, {"ablated": torch.nn.functional.normalize(torch.randn(H), dim=0)}, native=use_native)
    assert st.nonfinite_ablated == 1 and st.nonfinite_base == 0 and st.recovery is None
