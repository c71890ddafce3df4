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


def test_the_seed_table_aligns_methods_that_finished_different_seeds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from argparse import Namespace

    from bench.paper import Cell
    from bench.paper_stats import _seeds

    safety = {("sft", 0): 0.6, ("sft", 1): 0.7, ("sft", 2): 0.8, ("sarft", 0): 0.7}
    safety[("sarft", 1)] = 0.9
    cells = [Cell("John Doe", m, s, 0.5) for m, s in safety]
    rows = {c.id: {"safety": safety[(c.method, c.seed)]} for c in cells}
    out = _seeds(cells, rows, Namespace(seed_role="John Doe", lambda_kl=0.5))
    assert out["sft"]["mean"] == pytest.approx(0.7)
    assert out["sft"]["sd"] == pytest.approx(0.1)
    assert out["sarft"]["safety"] == [0.7, 0.9]
    assert out["sarft_minus_sft"] == pytest.approx([0.1, 0.2])
    sarft_row = next(line for line in capsys.readouterr().out.splitlines() if "SaRFT" in line)
    assert [c.strip() for c in sarft_row.strip("|").split("|")] == [
        "SaRFT", "70.0", "90.0", "-", "80.0", "14.1",
    ]  # fmt: skip
