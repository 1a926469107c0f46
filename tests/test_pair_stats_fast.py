"""The fast paths of audit/weights/pair_stats.py agree with the plain ones: memcmp equality, a precomputed
``identical`` flag, and directions padded to a multiple of 4 rows for the gemm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import audit.weights.pair_stats as ps
from checks.linalg import project_out


def _numpy_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.contiguous().view(torch.uint8).numpy(), b.contiguous().view(torch.uint8).numpy())


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_bytes_equal_memcmp_matches_numpy(n):
    a = torch.randn(n).bfloat16()
    b = a.clone()
    assert ps.bytes_equal(a, b) and _numpy_equal(a, b)
    if n:
        b[-1] = -b[-1] if b[-1] != 0 else 1.0
        assert not ps.bytes_equal(a, b) and not _numpy_equal(a, b)
        z0, z1 = torch.zeros(n), torch.zeros(n)
        z1[n // 2] = -0.0  # -0.0 == 0.0 numerically, not bytewise
        assert not ps.bytes_equal(z0, z1)


def test_precomputed_identical_and_padding_agree():
    torch.manual_seed(0)
    H = 64
    r = torch.randn(H)
    r /= r.norm()
    w0 = torch.randn(H, 40).bfloat16()
    w1 = project_out(w0.float(), r, 0).bfloat16()
    dirs = {"ablated": r, "local": torch.nn.functional.normalize(torch.randn(H), dim=0)}
    a = ps.pair_stats(w0, w1, 0, dirs)
    b = ps.pair_stats(w0, w1, 0, dirs, identical=False)
    assert a.dirs.keys() == b.dirs.keys() and a.diff_fro == b.diff_fro
    for k in dirs:  # each direction alone (1 row, no padding) vs together (padded to 4 rows)
        one = ps.pair_stats(w0, w1, 0, {k: dirs[k]})
        scale = {"before": a.dirs[k].before, "after": a.dirs[k].before, "dot": a.dirs[k].before ** 2, "floor": a.dirs[k].floor}
        for f in ("before", "after", "dot", "floor"):  # float32 noise of another gemm kernel: 1e-6 of the quantity's scale
            assert getattr(one.dirs[k], f) == pytest.approx(getattr(a.dirs[k], f), abs=1e-6 * scale[f]), (k, f)
    assert a.dirs["ablated"].share_left < 0.02 and not math.isclose(a.dirs["local"].share_left, 0.0, abs_tol=0.1)
    same = ps.pair_stats(w0, w0.clone(), 0, dirs, identical=True)
    assert same.identical and same.dirs["ablated"].before == pytest.approx(a.dirs["ablated"].before, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lazy_rounding_floor_keeps_every_class(dtype):
    """The floor computed only where the bound leaves the verdict open: same classes, exact floors
    where they matter, and a bound never below the exact floor elsewhere."""
    from checks.projection import classify, floor_can_matter

    torch.manual_seed(1)
    H = 64
    r = torch.nn.functional.normalize(torch.randn(H), dim=0)
    dirs = {"ablated": r, "local": torch.nn.functional.normalize(torch.randn(H), dim=0)}
    faint = project_out(torch.randn(H, 300), r, 0) + 1.3 * torch.finfo(dtype).eps * torch.outer(r, torch.randn(300))  # little r: the residue is rounding
    cases = {s: (torch.randn(H, 300), s) for s in (1.0, 0.5, 2.0, 0.0)} | {"faint": (faint, 1.0)}
    seen, kinds = set(), set()
    for name, (w, s) in cases.items():
        for axis, ea, ne, shape in ((0, None, 0, (H, 300)), (1, 0, 4, (4, H, 75))):
            w0 = w.to(dtype) if axis == 0 else w.reshape(H, 4, 75).transpose(0, 1).contiguous().to(dtype)
            w1 = project_out(w0.float(), r, axis, s).to(dtype)
            exact = ps.pair_stats(w0, w1, axis, dirs, ea, ne)
            lazy = ps.pair_stats(w0, w1, axis, dirs, ea, ne, floor_needed=floor_can_matter)
            pairs = [(exact.dirs[k], lazy.dirs[k]) for k in dirs]
            if exact.recovery is not None:
                pairs.append((exact.recovery.along, lazy.recovery.along))
            for e, l in pairs:
                assert classify(e, True) == classify(l, True), (name, axis)
                seen.add(classify(e, True))
                kinds.add(l.floor_exact)
                if l.floor_exact:
                    assert l.floor == pytest.approx(e.floor, rel=1e-5)
                else:
                    assert l.floor >= e.floor * (1 - 1e-6) and not floor_can_matter(l)
    assert {"removed", "rounding", "weak-scale", "reflected", "not-ablated"} <= seen and kinds == {True, False}
    same = ps.pair_stats(w0, w0.clone(), 1, dirs, 0, 4, floor_needed=floor_can_matter)
    assert same.rel_change == 0.0 and same.base_fro is None and same.dirs["ablated"].before > 0
