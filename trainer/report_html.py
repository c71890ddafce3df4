"""``report.html``: the report of a fine-tuning job as one self-contained page.

The HTML embeds its plots as base64 PNGs (matplotlib's Agg canvas, no pyplot state) and
escapes every piece of text, since prompts and generations are untrusted. Any section may be
missing or None; the page then says "not run" for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trainer.html_parts import NOT_RUN, num, png, table
from trainer.report_evaluation import evaluation_html

# --- plots ---------------------------------------------------------------------------------------


_GROUPS = ((False, "tab:blue", "kept"), (True, "tab:red", "flagged"))


def _point(p: Sequence[Any]) -> tuple[float | None, float | None, bool, float | None]:
    """(s_role, s_unsafe, flagged, delta) with delta derived when it is not stored."""
    role, unsafe = num(p[0]), num(p[1])
    delta = num(p[3]) if len(p) > 3 else None
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
    return png(fig)


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
        values = [(float(r.get("step", n + 1)), num(r.get(key))) for n, r in enumerate(history)]
        xy = [(x, y) for x, y in values if y is not None]
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="." if len(xy) < 50 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="step", title="cross-entropy" if key == "ce" else "KL (flagged samples)")
    return png(fig)


# --- HTML ----------------------------------------------------------------------------------------


def _scoring_html(scoring: Mapping[str, Any] | None) -> str:
    if not scoring:
        return f"<p>Scoring: {NOT_RUN}.</p>"
    points, margin = scoring.get("points") or [], num(scoring.get("margin")) or 0.0
    flagged = sum(bool(p[2]) for p in points)
    # The stated fraction is authoritative: the points may be a sample of a large data set.
    fraction = num(scoring.get("flagged_fraction"))
    if fraction is None:
        fraction = flagged / len(points) if points else 0.0
    text = f"<p>Flagged fraction: {100 * fraction:.1f}% (flag when s_unsafe - s_role &gt; "
    text += f"{margin:g}). Plotted: {len(points)} samples, {flagged} flagged.</p>"
    text += _curation_html(scoring.get("curation"))
    return text + (_scoring_plot(points, margin) if points else "<p>No scores.</p>")


def _curation_html(curation: Mapping[str, Any] | None) -> str:
    if not curation or not curation.get("reviewed"):
        return ""
    to_flag, to_keep = len(curation.get("to_flag") or ()), len(curation.get("to_keep") or ())
    return (
        f"<p>Reviewed: {int(curation['reviewed'])} samples; reviewers flagged {to_flag} that "
        f"RDS did not and kept {to_keep} that RDS flagged (the flags above include them).</p>"
    )


def _training_html(training: Mapping[str, Any] | None) -> str:
    if not training:
        return f"<p>Training: {NOT_RUN}.</p>"
    history = training.get("history") or []
    out = _training_plot(history) if history else "<p>No training steps recorded.</p>"
    config = training.get("config") or {}
    if config:
        out += table(("setting", "value"), sorted(config.items()))
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
        # The job's evaluation summary is the evaluation section's tables, further down.
        table(("field", "value"), sorted((k, v) for k, v in job.items() if k != "evaluation"))
        if job
        else "",
        "<h2>Data selection (RDS)</h2>",
        _scoring_html(report.get("scoring")),
        "<h2>Training (RBO)</h2>",
        _training_html(report.get("training")),
        "<h2>Evaluation</h2>",
        evaluation_html(report.get("evaluation")),
        "</body></html>",
    ]
    return "\n".join(parts)
