"""The scorer interface: token sequences in, response log-probability sums out."""

from __future__ import annotations

from collections.abc import Sequence
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

    def score(self, sequences: Sequence[EncodedSequence]) -> list[ResponseLogprob]:
        """One result per sequence, in the order given."""
        ...
