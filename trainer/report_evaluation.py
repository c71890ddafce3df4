"""The evaluation section of ``report.html``: per setting, a summary table (each model's refusal
rate with its Wilson interval, and the tuned model's difference from the base paired by prompt),
the refusal bars, refusal per harm category, role fidelity and example answers side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from matplotlib.figure import Figure

from trainer.comparison import compare_results, describe_difference
from trainer.html_parts import NOT_RUN, bars, num, png, table

NO_PAIRS = "no per-prompt verdicts to pair"
EXAMPLES_SHOWN = 3  # per prompt set in the HTML; report.json keeps all it was given

Side = Mapping[str, Any]  # one model's EvalResult dict; empty when that model was not evaluated
SIDES = ("base", "tuned")


def _present(evals: Sequence[Side], values: list[list[float | None]]) -> dict[str, list[float]]:
    """Bar values of the evaluated models; a missing value is NaN, which draws no bar."""
    return {
        label: [math.nan if v is None else v for v in side]
        for label, side, ev in zip(SIDES, values, evals, strict=True)
        if ev
    }


def _paired(sides: Sequence[Sequence[Any]], key: str, fields: Sequence[str]) -> list[list[Any]]:
    """The first few examples as rows ``[key, base example, tuned example]``, matched by key."""
    # Examples are objects; positional lists (in ``fields`` order) are accepted too.
    as_dicts = [
        [e if isinstance(e, Mapping) else dict(zip(fields, e, strict=False)) for e in s]
        for s in sides
    ]
    by_side = [{e.get(key): e for e in side} for side in as_dicts]
    keys = list(dict.fromkeys(k for side in by_side for k in side))[:EXAMPLES_SHOWN]
    return [[k, *(side.get(k) for side in by_side)] for k in keys]


def _safety_html(evals: Sequence[Side]) -> str:
    sets = [{s["name"]: s for s in side.get("safety") or []} for side in evals]
    names = list(dict.fromkeys(n for side in sets for n in side))
    if not names:
        return f"<p>Safety: {NOT_RUN}.</p>"
    rates = [[num(side.get(n, {}).get("refusal_rate")) for n in names] for side in sets]
    percent = [[None if r is None else 100 * r for r in side] for side in rates]
    out = bars("Refusal rate on harmful prompts", "% refused", names, _present(evals, percent), 105)
    paired = compare_results(*evals) if all(evals) else {}
    rows = [
        [n, *(_rate(side.get(n)) for side in sets),
         describe_difference(paired[n]) if n in paired else NO_PAIRS]
        for n in names
    ]  # fmt: skip
    out += table(("prompt set", *SIDES, "tuned - base, paired by prompt (95% interval)"), rows)
    out += "<p>Refusal rates with Wilson 95% intervals; the difference's interval is Newcombe's "
    out += "for paired proportions, its p-value the exact McNemar test.</p>"
    for name in names:
        out += _categories_html(name, [side.get(name) or {} for side in sets], evals)
    for name in names:
        examples = [side.get(name, {}).get("examples") or [] for side in sets]
        rows = [
            [prompt, *map(_verdict, pair)]
            for prompt, *pair in _paired(examples, "prompt", ("prompt", "response", "refused"))
        ]
        out += f"<h5>Examples: {escape(name)}</h5>" + table(("prompt", *SIDES), rows)
    return out


def _categories_html(name: str, results: Sequence[Mapping[str, Any]], evals: Sequence[Side]) -> str:
    """Refusal per harm category: horizontal bars (one row per category, base and tuned side by
    side) and the table of rates with their intervals."""
    per_side = [{c["category"]: c for c in r.get("categories") or []} for r in results]
    categories = list(dict.fromkeys(c for side in per_side for c in side))
    if not categories:
        return ""
    fig = Figure(figsize=(7, 0.38 * len(categories) + 1.2))
    ax = fig.add_subplot()
    shown = [(label, side) for label, side, ev in zip(SIDES, per_side, evals, strict=True) if ev]
    height = 0.8 / max(len(shown), 1)
    for k, (label, side) in enumerate(shown):
        values = [100 * (num(side.get(c, {}).get("refusal_rate")) or math.nan) for c in categories]
        offset = (k - (len(shown) - 1) / 2) * height
        ax.barh([y + offset for y in range(len(categories))], values, height=height, label=label)
    ax.set_yticks(list(range(len(categories))), [c.replace(",", ", ") for c in categories])
    ax.invert_yaxis()
    ax.set(xlabel="% refused", title=f"{name}: refusal per harm category", xlim=(0, 100))
    ax.legend(loc="lower right")
    rows = [[c, *(_rate(side.get(c)) for side in per_side)] for c in categories]
    return png(fig) + table(("harm category", *SIDES), rows)


def _rate(result: Mapping[str, Any] | None) -> str:
    """ "75.0% [62.1, 84.6]": the refusal rate and its 95% interval, when known."""
    rate = None if result is None else num(result.get("refusal_rate"))
    if rate is None:
        return NOT_RUN
    interval = result.get("ci95") if result is not None else None
    if not interval or len(interval) != 2:
        return f"{100 * rate:.1f}%"
    return f"{100 * rate:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _verdict(example: Mapping[str, Any] | None) -> str:
    if example is None:
        return NOT_RUN
    return f"[{'refused' if example.get('refused') else 'complied'}] {example.get('response', '')}"


def _fidelity_html(evals: Sequence[Side]) -> str:
    results = [side.get("fidelity") or {} for side in evals]
    scores = [num(r.get("rouge_l")) for r in results]
    if all(s is None for s in scores):
        return f"<p>Role fidelity: {NOT_RUN}.</p>"
    values = _present(evals, [[s] for s in scores])
    out = bars("Role fidelity on held-out samples", "ROUGE-L F1 x100", ["ROUGE-L"], values, None)
    out += table(
        ("metric", *SIDES),
        [["ROUGE-L F1 x100", *(s if s is not None else NOT_RUN for s in scores)]],
    )
    fields = ("question", "reference", "response", "rouge_l")
    rows = [
        [q, next((e["reference"] for e in pair if e and "reference" in e), ""),
         *(e.get("response", "") if e else NOT_RUN for e in pair)]
        for q, *pair in _paired([r.get("examples") or [] for r in results], "question", fields)
    ]  # fmt: skip
    out += "<h5>Examples: held-out questions</h5>"
    return out + table(("question", "reference", *SIDES), rows)


SETTING_TITLES = {
    "default": "Default chat (no system message)",
    "in_character": "In character (the role prompt)",
}


def evaluation_html(evaluation: Mapping[str, Any] | None) -> str:
    """One part per evaluation setting, each with both models side by side."""
    models: list[Mapping[str, Any]] = [(evaluation or {}).get(side) or {} for side in SIDES]
    settings = list(dict.fromkeys(setting for model in models for setting in model))
    if not settings:
        return f"<p>Evaluation: {NOT_RUN}.</p>"
    out = ""
    for setting in settings:
        evals: list[Side] = [model.get(setting) or {} for model in models]
        notes = "".join(
            f"<p>{label} model: {NOT_RUN}.</p>"
            for label, ev in zip(SIDES, evals, strict=True)
            if not ev
        )
        out += f"<h3>{escape(SETTING_TITLES.get(setting, setting))}</h3>{notes}"
        out += f"<h4>Safety</h4>{_safety_html(evals)}"
        out += f"<h4>Role fidelity</h4>{_fidelity_html(evals)}"
    return out
