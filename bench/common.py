"""Shared helpers for the benchmarks: data location, matmul peak, tables, JSON."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Shapes of the bundled model's linear layers at a realistic token count, plus
# square ones: the peak is the best of them, so "share of peak" is conservative.
PEAK_SHAPES = ((2048, 576, 1536), (2048, 1536, 576), (1024, 1024, 1024), (2048, 2048, 2048))


def matmul_peak_gflops(dtype: torch.dtype, seconds_per_shape: float = 1.0) -> float:
    """Best measured GFLOP/s of a plain torch matmul on this machine, now."""
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds_per_shape or reps < 3:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / elapsed / 1e9)
    return best


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.2f}"
    return str(v)


def save_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"saved {path}")
