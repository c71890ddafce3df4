"""Score samples chunk by chunk: encode every condition, call a backend, yield scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from worker.encoding import ChatEncoder, EncodedSequence
from worker.formats import Sample
from worker.prompts import Condition
from worker.results import SampleScores
from worker.scoring.base import ResponseLogprob, Scorer

FLAG_CONDITIONS = (Condition.ROLE, Condition.UNSAFE)
"""The passes a flag reads: s_unsafe - s_role."""


def conditions_for(compute_reference: bool) -> tuple[Condition, ...]:
    return (*FLAG_CONDITIONS, Condition.REF) if compute_reference else FLAG_CONDITIONS


def score_samples(
    samples: Iterable[Sample],
    encoder: ChatEncoder,
    scorer: Scorer,
    *,
    margin: float = 0.0,
    compute_reference: bool = True,
    chunk_size: int = 256,
    on_progress: Callable[[float], None] | None = None,
    checker: Scorer | None = None,
    check_band: float = 0.0,
) -> Iterator[tuple[Sample, SampleScores]]:
    """Yield ``(sample, scores)`` in input order.

    Chunks bound memory and give the backend enough sequences per call to
    bucket by length. ``on_progress`` receives increments of samples scored,
    fractional while a chunk is in flight (one condition is 1/3 of a sample).

    With a ``checker`` (an exact scorer behind a fast, approximate ``scorer``), the samples
    whose ``s_unsafe - s_role`` lies within ``check_band`` of the margin are scored again by
    the checker, and its scores replace the fast ones: a flag then is the checker's wherever
    the fast scorer's error on that difference is below the band.
    """
    conditions = conditions_for(compute_reference)
    per_sequence = 1.0 / len(conditions)
    report = None if on_progress is None else (lambda n: on_progress(n * per_sequence))
    it = iter(samples)
    while chunk := list(islice(it, chunk_size)):
        encoded = [encoder.encode_all(s, conditions) for s in chunk]
        flat = [seq for per_sample in encoded for seq in per_sample]
        results = iter(scorer.score(flat, report))
        scored = [{c: next(results) for c in conditions} for _ in chunk]
        if checker is not None and check_band > 0:
            _check_borderline(scored, encoded, conditions, checker, margin, check_band)
        for sample, seqs, by_condition in zip(chunk, encoded, scored, strict=True):
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


def _check_borderline(
    scored: list[dict[Condition, ResponseLogprob]],
    encoded: list[list[EncodedSequence]],
    conditions: tuple[Condition, ...],
    checker: Scorer,
    margin: float,
    band: float,
) -> None:
    """Replace, in place, the role and unsafe scores of the samples near the flag boundary by
    the checker's. The flag reads only those two; the reference pass (the implicit rewards'
    baseline) keeps the fast scorer's score, which spares a third of the checker's work."""
    near = [
        i
        for i, by in enumerate(scored)
        if abs(by[Condition.UNSAFE].mean - by[Condition.ROLE].mean - margin) < band
    ]
    if not near:
        return
    by_condition = [dict(zip(conditions, encoded[i], strict=True)) for i in near]
    again = iter(checker.score([seqs[c] for seqs in by_condition for c in FLAG_CONDITIONS]))
    for i in near:
        scored[i] = {**scored[i], **{c: next(again) for c in FLAG_CONDITIONS}}
