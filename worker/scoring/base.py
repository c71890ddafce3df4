"""The scorer interface: token sequences in, response log-probability sums out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.encoding import EncodedSequence


@dataclass(frozen=True, slots=True)
class ResponseLogprob:
    """Sum and count of the response tokens' log-probabilities of one sequence."""

    sum: float
    count: int

    @property
    def mean(self) -> float:
        return self.sum / self.count

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "sum": self.sum, "count": self.count}


class Scorer(Protocol):
    """A backend that computes log p(response | prompt) for many sequences."""

    name: str

    def score(
        self,
        sequences: Sequence[EncodedSequence],
        on_scored: Callable[[int], None] | None = None,
    ) -> list[ResponseLogprob]:
        """One result per sequence, in the order given.

        ``on_scored(n)`` is called as work completes, n sequences at a time.
        """
        ...
