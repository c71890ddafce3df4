"""Confidence intervals of proportions and paired tests, torch-free: the API's risk view uses
them too."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Z95 = 1.96


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: sound at 0 and at n successes too,
    where the normal approximation collapses to a point."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True, slots=True)
class PairedDifference:
    """How one model's refusals differ from another's on the same prompts."""

    n: int
    both: int
    """Prompts both refused."""
    only_first: int
    """Prompts the first model refused and the second answered (discordant)."""
    only_second: int
    """Prompts the second model refused and the first answered (discordant)."""
    difference: float
    """second rate - first rate, in [-1, 1]."""
    ci95: tuple[float, float]
    """Newcombe's hybrid score interval for paired data (1998, method 10)."""
    mcnemar_p: float
    """Exact (binomial) two-sided McNemar p-value: 1.0 when no prompt is discordant."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "both": self.both, "only_first": self.only_first,
            "only_second": self.only_second, "difference": self.difference,
            "ci95": list(self.ci95), "mcnemar_p": self.mcnemar_p,
        }  # fmt: skip


def mcnemar_exact_p(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar test: under "no difference" each discordant prompt goes either
    way with probability 1/2, so the smaller count is Binomial(b + c, 1/2)'s lower tail x 2."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_difference(
    first: Sequence[bool], second: Sequence[bool], z: float = Z95
) -> PairedDifference:
    """The refusal-rate difference (second - first) of two models that answered the same
    prompts, in the same order: ``first[i]`` and ``second[i]`` judge prompt i.

    The interval combines each rate's Wilson interval with the correlation of the pairs
    (Newcombe 1998, method 10), so it is narrower than two independent intervals when the
    models mostly agree, and stays inside [-1, 1]."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} first verdicts but {len(second)} second ones")
    n = len(first)
    if n == 0:
        raise ValueError("no prompts to compare")
    a = sum(1 for x, y in zip(first, second, strict=True) if x and y)
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    # Newcombe's correlation: a positive a*d - b*c is first reduced by n/2 (not below 0).
    cross: float = a * d - b * c
    if cross > 0:
        cross = max(cross - n / 2, 0.0)
    phi = cross / math.sqrt(denominator) if denominator else 0.0
    diff = p2 - p1
    low = diff - math.sqrt(
        max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    )
    high = diff + math.sqrt(
        max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2)
    )
    return PairedDifference(
        n, a, b, c, diff, (max(-1.0, low), min(1.0, high)), mcnemar_exact_p(b, c)
    )
