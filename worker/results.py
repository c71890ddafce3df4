"""Per-sample scores, the flag, and the summary statistics of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from worker.prompts import Condition
from worker.scoring.base import ResponseLogprob

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


@dataclass(frozen=True, slots=True)
class SampleScores:
    index: int
    role: ResponseLogprob
    unsafe: ResponseLogprob
    ref: ResponseLogprob | None
    margin: float
    truncated: bool = False

    @property
    def delta(self) -> float:
        """``s_unsafe - s_role``; lp_ref cancels, so it is computed without it."""
        return self.unsafe.mean - self.role.mean

    @property
    def finite_delta(self) -> float | None:
        """``delta`` as the database column stores it: None where it is not finite."""
        return self.delta if math.isfinite(self.delta) else None

    @property
    def flagged(self) -> bool:
        return self.delta > self.margin

    @property
    def s_role(self) -> float | None:
        return None if self.ref is None else self.role.mean - self.ref.mean

    @property
    def s_unsafe(self) -> float | None:
        return None if self.ref is None else self.unsafe.mean - self.ref.mean

    def to_json(self) -> dict[str, Any]:
        """The ``scores`` object written to scores.jsonl and attached to subset rows."""
        return {
            Condition.ROLE.value: self.role.as_dict(),
            Condition.UNSAFE.value: self.unsafe.as_dict(),
            Condition.REF.value: None if self.ref is None else self.ref.as_dict(),
            "s_role": self.s_role,
            "s_unsafe": self.s_unsafe,
            "delta": self.delta,
            "flagged": self.flagged,
            "truncated": self.truncated,
        }


def quantiles(values: list[float]) -> dict[str, float] | None:
    """Linear-interpolation quantiles keyed "p0".."p100"; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    out = {}
    for q in QUANTILES:
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{round(q * 100)}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return out


@dataclass
class RunStats:
    """Accumulates what summary.json reports; O(samples) floats, nothing more."""

    num_samples: int = 0
    num_flagged: int = 0
    num_truncated: int = 0
    response_tokens: int = 0
    s_role: list[float] = field(default_factory=list)
    s_unsafe: list[float] = field(default_factory=list)
    delta: list[float] = field(default_factory=list)

    def add(self, scores: SampleScores) -> None:
        self.num_samples += 1
        self.num_flagged += scores.flagged
        self.num_truncated += scores.truncated
        self.response_tokens += scores.role.count
        self.delta.append(scores.delta)
        if scores.s_role is not None and scores.s_unsafe is not None:
            self.s_role.append(scores.s_role)
            self.s_unsafe.append(scores.s_unsafe)

    def add_json(self, scores: dict[str, Any]) -> None:
        """Accumulate a stored ``scores`` object (as ``SampleScores.to_json`` wrote it)."""
        self.num_samples += 1
        self.num_flagged += bool(scores["flagged"])
        self.num_truncated += bool(scores.get("truncated"))
        self.response_tokens += int(scores["role"]["count"])
        self.delta.append(float(scores["delta"]))
        if scores.get("s_role") is not None and scores.get("s_unsafe") is not None:
            self.s_role.append(float(scores["s_role"]))
            self.s_unsafe.append(float(scores["s_unsafe"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_flagged": self.num_flagged,
            "flagged_fraction": self.num_flagged / self.num_samples if self.num_samples else 0.0,
            "num_truncated": self.num_truncated,
            "response_tokens": self.response_tokens,
            "quantiles": {
                "s_role": quantiles(self.s_role),
                "s_unsafe": quantiles(self.s_unsafe),
                "delta": quantiles(self.delta),
            },
        }
