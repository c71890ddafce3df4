"""The per-role risk view as one self-contained HTML page.

Plots are inline SVG (no script, no external file, nothing for the API to render with a
plotting library), and every piece of user text (role names, sample texts, model names) goes
through html.escape: the page shows uploaded dialogues, which are untrusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from service.core.pagination import ListResponse
from service.roles.schemas import RoleRisk

FLAG_COLOR = "#c0392b"
SAFE_COLOR = "#7f8c8d"
CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;"
    "padding:4px 8px;vertical-align:top;text-align:left}td.text{white-space:pre-wrap;"
    "max-width:700px}svg{display:block;margin:.5em 0}svg text{font-size:12px;fill:#333}"
    ".muted{color:#777}svg text.muted{fill:#777}"
)
NAME_CHARS = 28  # of a role name in the chart's label column; the full name is its tooltip


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _num(value: float) -> str:
    return f"{value:.3f}"


def _label(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"


def fraction_chart(risks: Sequence[RoleRisk]) -> str:
    """Horizontal bars of the flagged fraction per role, with the Wilson 95% interval."""
    label_w, plot_w, value_w, row_h, top = 220, 380, 200, 28, 8
    width = label_w + plot_w + value_w
    axis_y = top + row_h * len(risks)
    height = axis_y + 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="flagged fraction per role">'
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = label_w + tick * plot_w
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{_pct(tick)}</text>'
        )
    for i, risk in enumerate(risks):
        y = top + i * row_h
        mid = y + row_h / 2
        parts.append(
            f'<text x="{label_w - 8}" y="{mid + 4:.1f}" text-anchor="end">'
            f"<title>{_e(risk.role_name)}</title>{_e(_label(risk.role_name))}</text>"
        )
        if risk.flagged_fraction is None or risk.flagged_interval is None:
            why = "no succeeded scoring job" if risk.scoring_job_id is None else "no samples"
            parts.append(f'<text x="{label_w + 6}" y="{mid + 4:.1f}" class="muted">{why}</text>')
            continue
        lo, hi = risk.flagged_interval
        x_lo, x_hi = label_w + lo * plot_w, label_w + hi * plot_w
        parts.append(
            f'<rect x="{label_w}" y="{y + 6}" width="{risk.flagged_fraction * plot_w:.1f}" '
            f'height="{row_h - 12}" fill="{FLAG_COLOR}" fill-opacity="0.75"/>'
            f'<line x1="{x_lo:.1f}" y1="{mid:.1f}" x2="{x_hi:.1f}" y2="{mid:.1f}" '
            'stroke="#222" stroke-width="1.5"/>'
            f'<line x1="{x_lo:.1f}" y1="{mid - 6:.1f}" x2="{x_lo:.1f}" y2="{mid + 6:.1f}" '
            'stroke="#222" stroke-width="1.5"/>'
            f'<line x1="{x_hi:.1f}" y1="{mid - 6:.1f}" x2="{x_hi:.1f}" y2="{mid + 6:.1f}" '
            'stroke="#222" stroke-width="1.5"/>'
            f'<text x="{label_w + plot_w + 10}" y="{mid + 4:.1f}">'
            f"{_pct(risk.flagged_fraction)} ({_pct(lo)}-{_pct(hi)}) "
            f"{risk.num_flagged}/{risk.num_samples}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def difference_histogram(risk: RoleRisk) -> str:
    """The histogram of s_unsafe - s_role; bins past the margin (flagged side) in red."""
    if risk.difference is None:
        return ""
    edges, counts = risk.difference.histogram.edges, risk.difference.histogram.counts
    left, right, top, bottom = 44, 12, 10, 34
    plot_w, plot_h = 440, 130
    width, height = left + plot_w + right, top + plot_h + bottom
    lo, hi = edges[0], edges[-1]
    peak = max(counts) or 1

    def x_of(value: float) -> float:
        return left + (value - lo) / (hi - lo) * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="histogram of s_unsafe - s_role for {_e(risk.role_name)}">'
    ]
    margin = risk.margin if risk.margin is not None else 0.0
    for count, start, end in zip(counts, edges, edges[1:], strict=False):
        bar_h = count / peak * plot_h
        color = FLAG_COLOR if (start + end) / 2 > margin else SAFE_COLOR
        parts.append(
            f'<rect x="{x_of(start):.1f}" y="{top + plot_h - bar_h:.1f}" '
            f'width="{max(x_of(end) - x_of(start) - 1, 0.5):.1f}" height="{bar_h:.1f}" '
            f'fill="{color}"><title>{_num(start)} to {_num(end)}: {count}</title></rect>'
        )
    base = top + plot_h
    parts.append(
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>'
        f'<text x="{left}" y="{base + 16}" text-anchor="start">{_num(lo)}</text>'
        f'<text x="{left + plot_w}" y="{base + 16}" text-anchor="end">{_num(hi)}</text>'
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 6}" y="{base}" text-anchor="end">0</text>'
        f'<text x="{left + plot_w / 2:.1f}" y="{base + 30}" text-anchor="middle">'
        "s_unsafe - s_role</text>"
    )
    if lo <= margin <= hi:
        x = x_of(margin)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{base}" stroke="#222" '
            'stroke-dasharray="4 3"/>'
            f'<text x="{x + 4:.1f}" y="{top + 10}">margin {_num(margin)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_column: int = -1) -> str:
    """A table of already escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="text">{c}</td>' if i == text_column else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def role_section(risk: RoleRisk) -> str:
    title = f"<h2>{_e(risk.role_name)} <small class='muted'>{_e(risk.role_id)}</small></h2>"
    if risk.scoring_job_id is None:
        return title + "<p class='muted'>No succeeded scoring job yet.</p>"
    facts = [
        ("scoring job", _e(risk.scoring_job_id)),
        ("dataset", _e(risk.dataset_id)),
        ("model", _e(risk.model)),
        ("margin", _e(risk.margin)),
        ("flagged", f"{risk.num_flagged} of {risk.num_samples}"),
    ]
    if risk.flagged_fraction is not None and risk.flagged_interval is not None:
        lo, hi = risk.flagged_interval
        facts.append(
            ("flagged fraction", f"{_pct(risk.flagged_fraction)} (95% CI {_pct(lo)}-{_pct(hi)})")
        )
    if risk.difference is not None:
        d = risk.difference
        facts.append(
            (
                "s_unsafe - s_role",
                f"min {_num(d.min)}, median {_num(d.median)}, mean {_num(d.mean)}, "
                f"max {_num(d.max)}",
            )
        )
    out = title + _table(("field", "value"), facts) + difference_histogram(risk)
    if risk.top_flagged:
        rows = [(str(s.line), _num(s.difference), _e(s.text)) for s in risk.top_flagged]
        out += "<h3>Most flagged samples</h3>" + _table(
            ("line", "s_unsafe - s_role", "response"), rows, text_column=2
        )
    return out


def render_html(page: ListResponse[RoleRisk]) -> str:
    risks = page.data
    more = ""
    if page.has_more and risks:
        more = (
            "<p>More roles than this page holds: ask for the next page with "
            f"<code>after={_e(risks[-1].role_id)}</code>.</p>"
        )
    body = (
        fraction_chart(risks) + "".join(role_section(r) for r in risks)
        if risks
        else "<p>No roles yet.</p>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<title>sarft: risk per role</title>"
        f"<style>{CSS}</style></head><body><h1>Risk per role</h1>"
        "<p>Each role's latest succeeded scoring job. A sample is flagged when "
        "<code>s_unsafe - s_role</code> exceeds the job's margin, unless a reviewer decided "
        "otherwise (the effective flag); the whiskers are the Wilson "
        "95% interval of the flagged fraction.</p>"
        f"{more}{body}</body></html>"
    )
