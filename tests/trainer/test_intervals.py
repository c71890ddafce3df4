"""Paired comparison of two models' refusals: Newcombe's interval and the exact McNemar test."""

from __future__ import annotations

import math
import random

import pytest

from trainer.intervals import mcnemar_exact_p, paired_difference


def pairs(e: int, f: int, g: int, h: int) -> tuple[list[bool], list[bool]]:
    """Newcombe's cells: e both yes, f first yes only, g second yes only, h both no."""
    first = [True] * e + [True] * f + [False] * g + [False] * h
    second = [True] * e + [False] * f + [True] * g + [False] * h
    return first, second


# Newcombe (1998), Stat Med 17:2635, Table III, method 10: 95% limits of (f - g) / n.
@pytest.mark.parametrize(
    ("cells", "limits"),
    [
        ((36, 12, 2, 0), (0.0569, 0.3404)),
        ((20, 12, 2, 16), (0.0562, 0.3292)),
        ((36, 14, 0, 0), (0.1528, 0.4167)),
        ((54, 0, 0, 0), (-0.0664, 0.0664)),
        ((2, 97, 1, 0), (0.8721, 0.9854)),
    ],
)
def test_the_interval_reproduces_newcombes_table(
    cells: tuple[int, int, int, int], limits: tuple[float, float]
) -> None:
    first, second = pairs(*cells)
    # The difference here is second - first, so the published limits change sign.
    result = paired_difference(second, first)
    e, f, g, _h = cells
    assert result.difference == pytest.approx((f - g) / sum(cells))
    assert result.ci95 == pytest.approx(limits, abs=1e-4)
    assert (result.both, result.only_first, result.only_second) == (e, g, f)


def test_the_interval_is_narrower_than_independent_ones_when_models_agree() -> None:
    first, second = pairs(60, 8, 2, 30)
    result = paired_difference(first, second)
    assert result.difference == pytest.approx(-0.06)
    low, high = result.ci95
    # Two independent Wilson intervals at n=100 would put the difference within about
    # +-13 points; the pairs agree on 90 prompts, so the paired interval is much tighter.
    assert high - low < 0.14
    assert low < -0.06 < high


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    rng = random.Random(7)
    covered, trials, n = 0, 2000, 60
    # Correlated pairs: the second refuses like the first unless a 20% flip happens, and
    # the first refuses with probability 0.6; E[second] = 0.6 * 0.8 + 0.4 * 0.2 = 0.56.
    true_difference = 0.56 - 0.6
    for _ in range(trials):
        first = [rng.random() < 0.6 for _ in range(n)]
        second = [x if rng.random() >= 0.2 else not x for x in first]
        low, high = paired_difference(first, second).ci95
        covered += low <= true_difference <= high
    assert 0.93 <= covered / trials <= 0.98


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (2, 12, 2 * (1 + 14 + 91) / 2**14),
        (0, 5, 2 / 2**5),
        (3, 3, 1.0),
        (0, 0, 1.0),
        (1, 0, 1.0),
    ],
)
def test_mcnemar_exact_p_is_the_doubled_binomial_tail(b: int, c: int, p: float) -> None:
    assert mcnemar_exact_p(b, c) == pytest.approx(p)
    assert mcnemar_exact_p(c, b) == pytest.approx(p)


def test_mcnemar_p_of_a_large_table_stays_exact() -> None:
    # 400 discordant pairs, 180 one way: the normal approximation's p is about 0.05.
    p = mcnemar_exact_p(180, 220)
    assert 0.04 < p < 0.06
    assert not math.isnan(p)


def test_bad_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="2 first verdicts but 1"):
        paired_difference([True, False], [True])
    with pytest.raises(ValueError, match="no prompts"):
        paired_difference([], [])
