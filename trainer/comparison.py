"""The tuned model against the base, prompt by prompt, from their stored evaluations.

Both models answer the same prompts of each safety set, so each prompt gives a pair of verdicts;
:func:`trainer.intervals.paired_difference` turns the pairs into the refusal difference (tuned -
base) with a paired 95% interval and an exact McNemar p-value. Reads the ``EvalResult.to_dict()``
form that ``report.json`` holds, so it applies to stored reports too; sets without per-prompt
verdicts (reports written before they were kept) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.intervals import paired_difference


def compare_results(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> dict[str, Any]:
    """By safety set name: the paired difference of one setting's two ``EvalResult`` dicts."""
    base_sets = {s["name"]: s for s in base.get("safety") or []}
    out: dict[str, Any] = {}
    for result in tuned.get("safety") or []:
        before = base_sets.get(result["name"])
        first = (before or {}).get("verdicts") or []
        second = result.get("verdicts") or []
        if first and len(first) == len(second):
            out[result["name"]] = paired_difference(first, second).to_dict()
    return out


def compare_evaluations(evaluation: Mapping[str, Any] | None) -> dict[str, Any]:
    """By setting, then safety set: tuned - base, paired. Empty until both were evaluated."""
    base = (evaluation or {}).get("base") or {}
    tuned = (evaluation or {}).get("tuned") or {}
    return {
        setting: compare_results(base[setting], tuned[setting])
        for setting in tuned
        if setting in base
    }


def describe_difference(paired: Mapping[str, Any]) -> str:
    """ "-12.0 points [-20.1, -4.3], McNemar p=0.004 (3 vs 15 discordant)"."""
    low, high = paired["ci95"]
    return (
        f"{100 * paired['difference']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}], "
        f"McNemar p={paired['mcnemar_p']:.3g} ({paired['only_second']} refused only after, "
        f"{paired['only_first']} only before)"
    )
