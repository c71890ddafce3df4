"""Pieces every section of ``report.html`` is built from: PNG plots, bar charts and tables.

Plots are matplotlib figures on the Agg canvas (no pyplot state) embedded as base64 PNGs; every
piece of text is escaped, since prompts and generations are untrusted.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from html import escape
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

NOT_RUN = "not run"


def png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def num(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def bars(
    title: str, ylabel: str, groups: list[str], sides: dict[str, list[float]], top: float | None
) -> str:
    """Grouped bars: one group per name, one bar per model; NaN values draw no bar."""
    fig = Figure(figsize=(max(4.0, 1.6 * len(groups) + 2), 3.5))
    ax = fig.add_subplot()
    width = 0.8 / max(len(sides), 1)
    for k, (label, values) in enumerate(sides.items()):
        offset = (k - (len(sides) - 1) / 2) * width
        drawn = ax.bar([x + offset for x in range(len(groups))], values, width=width, label=label)
        ax.bar_label(drawn, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(range(len(groups))), groups)
    ax.set(title=title, ylabel=ylabel)
    ax.set_ylim(0, top)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return png(fig)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def cell(value: Any) -> str:
    """A value as table text: objects as "key: value" lines, lists comma-separated."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "\n".join(f"{k}: {cell(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value)
    return str(value)
