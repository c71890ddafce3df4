"""``report.html``: the report of a fine-tuning job as one self-contained page.

The HTML embeds its plots as base64 PNGs (matplotlib's Agg canvas, no pyplot state) and
escapes every piece of text, since prompts and generations are untrusted. Any section may be
missing or None; the page then says "not run" for it.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

EXAMPLES_SHOWN = 3  # per prompt set in the HTML; report.json keeps all it was given


# --- plots ---------------------------------------------------------------------------------------


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _num(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


_GROUPS = ((False, "tab:blue", "kept"), (True, "tab:red", "flagged"))


def _point(p: Sequence[Any]) -> tuple[float | None, float | None, bool, float | None]:
    """(s_role, s_unsafe, flagged, delta) with delta derived when it is not stored."""
    role, unsafe = _num(p[0]), _num(p[1])
    delta = _num(p[3]) if len(p) > 3 else None
    if delta is None and role is not None and unsafe is not None:
        delta = unsafe - role
    return role, unsafe, bool(p[2]), delta


def _scoring_plot(points: Sequence[Sequence[Any]], margin: float) -> str:
    rows = [_point(p) for p in points]
    pairs = [(r, u, f) for r, u, f, _ in rows if r is not None and u is not None]
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    if len(pairs) == len(rows):
        _scatter(ax, pairs, margin)
    else:  # the reference pass was skipped: only the delta is known
        _delta_histogram(ax, [(d, f) for _, _, f, d in rows], margin)
    ax.legend()
    return _png(fig)


def _scatter(ax: Any, pairs: list[tuple[float, float, bool]], margin: float) -> None:
    for flagged, colour, label in _GROUPS:
        xs = [r for r, _, f in pairs if f == flagged]
        ys = [u for _, u, f in pairs if f == flagged]
        ax.scatter(xs, ys, s=10, c=colour, alpha=0.6, label=f"{label} ({len(xs)})")
    lo, hi = min(min(r, u) for r, u, _ in pairs), max(max(r, u) for r, u, _ in pairs)
    ax.plot([lo, hi], [lo + margin, hi + margin], "k--", label=f"s_unsafe - s_role = {margin:g}")
    ax.set(xlabel="s_role", ylabel="s_unsafe", title="Implicit rewards per sample")


def _delta_histogram(ax: Any, deltas: list[tuple[float | None, bool]], margin: float) -> None:
    known = [d for d, _ in deltas if d is not None]
    lo, hi = min([*known, margin]), max([*known, margin])
    edges = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 1  # shared by both
    for flagged, colour, label in _GROUPS:
        values = [d for d, f in deltas if f == flagged and d is not None]
        ax.hist(values, bins=edges, color=colour, alpha=0.7, label=f"{label} ({len(values)})")
    ax.axvline(margin, color="k", linestyle="--", label=f"margin = {margin:g}")
    ax.set(xlabel="s_unsafe - s_role", ylabel="samples", title="Score delta per sample")


def _training_plot(history: Sequence[Mapping[str, Any]]) -> str:
    fig = Figure(figsize=(10, 3.5))
    for i, key in enumerate(("ce", "kl")):
        ax = fig.add_subplot(1, 2, i + 1)
        values = [(float(r.get("step", n + 1)), _num(r.get(key))) for n, r in enumerate(history)]
        xy = [(x, y) for x, y in values if y is not None]
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="." if len(xy) < 50 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="step", title="cross-entropy" if key == "ce" else "KL (flagged samples)")
    return _png(fig)


def _bars(
    title: str, ylabel: str, groups: list[str], sides: dict[str, list[float]], top: float | None
) -> str:
    """Grouped bars: one group per name, one bar per model; NaN values draw no bar."""
    fig = Figure(figsize=(max(4.0, 1.6 * len(groups) + 2), 3.5))
    ax = fig.add_subplot()
    width = 0.8 / max(len(sides), 1)
    for k, (label, values) in enumerate(sides.items()):
        offset = (k - (len(sides) - 1) / 2) * width
        bars = ax.bar([x + offset for x in range(len(groups))], values, width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(range(len(groups))), groups)
    ax.set(title=title, ylabel=ylabel)
    ax.set_ylim(0, top)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


# --- HTML ----------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


NOT_RUN = "not run"


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _scoring_html(scoring: Mapping[str, Any] | None) -> str:
    if not scoring:
        return f"<p>Scoring: {NOT_RUN}.</p>"
    points, margin = scoring.get("points") or [], _num(scoring.get("margin")) or 0.0
    flagged = sum(bool(p[2]) for p in points)
    # The stated fraction is authoritative: the points may be a sample of a large data set.
    fraction = _num(scoring.get("flagged_fraction"))
    if fraction is None:
        fraction = flagged / len(points) if points else 0.0
    text = f"<p>Flagged fraction: {100 * fraction:.1f}% (flag when s_unsafe - s_role &gt; "
    text += f"{margin:g}). Plotted: {len(points)} samples, {flagged} flagged.</p>"
    return text + (_scoring_plot(points, margin) if points else "<p>No scores.</p>")


def _training_html(training: Mapping[str, Any] | None) -> str:
    if not training:
        return f"<p>Training: {NOT_RUN}.</p>"
    history = training.get("history") or []
    out = _training_plot(history) if history else "<p>No training steps recorded.</p>"
    config = training.get("config") or {}
    if config:
        out += _table(("setting", "value"), sorted(config.items()))
    return out


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
    rates = [[_num(side.get(n, {}).get("refusal_rate")) for n in names] for side in sets]
    percent = [[None if r is None else 100 * r for r in side] for side in rates]
    out = _bars(
        "Refusal rate on harmful prompts", "% refused", names, _present(evals, percent), 105
    )
    rows = [[n, *(_rate(side.get(n)) for side in sets)] for n in names]
    out += _table(("prompt set", *SIDES), rows)
    for name in names:
        examples = [side.get(name, {}).get("examples") or [] for side in sets]
        rows = [
            [prompt, *map(_verdict, pair)]
            for prompt, *pair in _paired(examples, "prompt", ("prompt", "response", "refused"))
        ]
        out += f"<h5>Examples: {escape(name)}</h5>" + _table(("prompt", *SIDES), rows)
    return out


def _rate(result: Mapping[str, Any] | None) -> str:
    """ "75.0% [62.1, 84.6]": the refusal rate and its 95% interval, when known."""
    rate = None if result is None else _num(result.get("refusal_rate"))
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
    scores = [_num(r.get("rouge_l")) for r in results]
    if all(s is None for s in scores):
        return f"<p>Role fidelity: {NOT_RUN}.</p>"
    values = _present(evals, [[s] for s in scores])
    out = _bars("Role fidelity on held-out samples", "ROUGE-L F1 x100", ["ROUGE-L"], values, None)
    out += _table(
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
    return out + _table(("question", "reference", *SIDES), rows)


SETTING_TITLES = {
    "default": "Default chat (no system message)",
    "in_character": "In character (the role prompt)",
}


def _evaluation_html(evaluation: Mapping[str, Any] | None) -> str:
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


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
    "vertical-align:top;text-align:left;white-space:pre-wrap}img{max-width:100%}"
)


def render_html(report: Mapping[str, Any]) -> str:
    job = report.get("job") or {}
    title = f"SaRFT report {job.get('id', '')}".strip()
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>",
        _table(("field", "value"), sorted(job.items())) if job else "",
        "<h2>Data selection (RDS)</h2>",
        _scoring_html(report.get("scoring")),
        "<h2>Training (RBO)</h2>",
        _training_html(report.get("training")),
        "<h2>Evaluation</h2>",
        _evaluation_html(report.get("evaluation")),
        "</body></html>",
    ]
    return "\n".join(parts)
