"""The diagnosis constants as they were frozen before the out-of-sample family (gpt_oss) was first audited (issue 25).

Changing one is a retune: re-run both matrices (benchmarks/diagnosis_matrix.py --audit, in-sample and --organisms oss, each with
and without --foreign), report them apart, then update this table in the same commit.
"""

from checks import thresholds as T

FROZEN = {"WRITE_TOL": 0.05, "READ_LEFT": 0.25, "WEAK_SCALE": 0.95, "OVERSHOOT_SCALE": 1.05, "MISMATCH_COS": 0.90, "SAME_COS": 0.99,
          "QUALITY_RATIO": 0.80, "BYPASS_MARGIN": 0.20, "DAMAGE_KL_RATIO": 0.50, "DEGENERATE_FIRST": 0.20, "GEN_MARGIN": 0.15,
          "REPRODUCE_TOL": 0.15}


def test_diagnosis_constants_are_the_frozen_ones():
    assert {k: getattr(T, k) for k in FROZEN} == FROZEN
