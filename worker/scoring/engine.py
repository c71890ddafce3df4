"""Score samples chunk by chunk: encode every condition, call a backend, yield scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from worker.encoding import ChatEncoder
from worker.formats import Sample
from worker.prompts import Condition
from worker.results import SampleScores
from worker.scoring.base import Scorer


def conditions_for(compute_reference: bool) -> tuple[Condition, ...]:
    base = (Condition.ROLE, Condition.UNSAFE)
    return (*base, Condition.REF) if compute_reference else base


def score_samples(
    samples: Iterable[Sample],
    encoder: ChatEncoder,
    scorer: Scorer,
    *,
    margin: float = 0.0,
    compute_reference: bool = True,
    chunk_size: int = 256,
    on_progress: Callable[[float], None] | None = None,
) -> Iterator[tuple[Sample, SampleScores]]:
    """Yield ``(sample, scores)`` in input order.

    Chunks bound memory and give the backend enough sequences per call to
    bucket by length. ``on_progress`` receives increments of samples scored,
    fractional while a chunk is in flight (one condition is 1/3 of a sample).
    """
    conditions = conditions_for(compute_reference)
    per_sequence = 1.0 / len(conditions)
    report = None if on_progress is None else (lambda n: on_progress(n * per_sequence))
    it = iter(samples)
    while chunk := list(islice(it, chunk_size)):
        encoded = [encoder.encode_all(s, conditions) for s in chunk]
        flat = [seq for per_sample in encoded for seq in per_sample]
        results = iter(scorer.score(flat, report))
        for sample, seqs in zip(chunk, encoded, strict=True):
            by_condition = {c: next(results) for c in conditions}
            yield (
                sample,
                SampleScores(
                    index=sample.index,
                    role=by_condition[Condition.ROLE],
                    unsafe=by_condition[Condition.UNSAFE],
                    ref=by_condition.get(Condition.REF),
                    margin=margin,
                    truncated=any(s.truncated for s in seqs),
                ),
            )
