"""Wilson intervals, exact McNemar and rate summaries against known values."""

import math

import pytest

from checks.stats import mcnemar_exact, paired_change, rate_summary, wilson


def test_wilson_known_values():
    p, lo, hi = wilson(8, 10)
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    p, lo, hi = wilson(0, 20)
    assert p == 0 and lo == 0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson(20, 20)[1] == pytest.approx(1 - 0.1611, abs=1e-4) and wilson(20, 20)[2] == 1.0
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_wilson_narrows_with_n_and_rejects_bad_counts():
    assert wilson(50, 100)[2] - wilson(50, 100)[1] < wilson(5, 10)[2] - wilson(5, 10)[1]
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_mcnemar_exact():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 * 0.5 ** 6)  # 0.03125
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(10, 1) == pytest.approx(2 * sum(math.comb(11, k) for k in range(2)) / 2 ** 11)
    assert mcnemar_exact(10, 1) == mcnemar_exact(1, 10)


def test_rate_and_paired_leave_unknowns_out():
    r = rate_summary([True, True, False, None])
    assert (r["k"], r["n"], r["unknown"]) == (2, 3, 1) and r["rate"] == pytest.approx(2 / 3)
    pc = paired_change([True, True, True, False, None], [False, False, True, True, False])
    assert (pc["n_pairs"], pc["b"], pc["c"]) == (4, 2, 1)
    with pytest.raises(ValueError):
        paired_change([True], [True, False])
