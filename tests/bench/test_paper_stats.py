"""bench/paper.py's statistics over saved cells: rates by group, paired differences over roles."""

from __future__ import annotations

import pytest

from bench.paper_stats import paired, rates
from trainer.intervals import mcnemar_exact_p

A = {
    ("default", "advbench"): [True, False, False, True],
    ("default", "advbench-caesar"): [True] * 4,
}
B = {("default", "advbench"): [True, True, True, True], ("default", "advbench-caesar"): [True] * 4}


def test_rates_pool_the_jailbreak_sets_and_average_the_groups() -> None:
    got = rates({**A, ("in_character", "beavertails"): [False, True]})
    assert got["advbench/default"] == 0.5
    assert got["jailbreak/default"] == 1.0
    assert got["beavertails/in_character"] == 0.5
    assert got["safety"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_a_paired_difference_over_roles() -> None:
    one_role = paired([(A, B)])
    # Two of eight prompts gained a refusal, none lost one.
    assert one_role["difference"] == pytest.approx(2 / 8)
    assert (one_role["only_first"], one_role["only_second"]) == (0, 2)
    assert one_role["mcnemar_p"] == mcnemar_exact_p(0, 2) == 0.5
    low, high = one_role["ci95"]
    assert 0 <= low <= 2 / 8 <= high <= 1  # resampled prompts may all be the changed ones
    pooled = paired([(A, B), (B, B)])
    # The second role changed nothing: the mean of the per-role differences halves.
    assert pooled["difference"] == pytest.approx(1 / 8)
    assert pooled["pairs"] == 16
    same = paired([(A, A)])
    assert (same["difference"], same["ci95"], same["mcnemar_p"]) == (0.0, [0.0, 0.0], 1.0)
