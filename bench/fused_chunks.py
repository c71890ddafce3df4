"""Benchmark: the fused loss's chunk size, against the unfused loss, on one LM head.

    python bench/fused_chunks.py [--hidden 896] [--vocab 151936] [--rows 4] [--tokens 300] \
        [--chunk-rows 32,64,128,256] [--reps 3] [--threads N] [--json PATH]

Times one forward and backward of the loss alone (``trainer.fused_loss.fused_sarft_loss`` at
each --chunk-rows, and ``trainer.loss.sarft_loss`` on full logits) for a random head of
--vocab x --hidden (the default is Qwen2.5-0.5B's) over --rows rows of --tokens positions, the
first half of the rows flagged with the KL at every position, the last two thirds of each row
the response; LoRA's case: the head is frozen, so the gradient is the hidden states' only. Peak
memory above the inputs is read as bench/training.py reads it (VmHWM after a reset, or CUDA's
allocator counter). A chunk reads the whole head for 2 x rows FLOPs per weight, so small chunks
are memory-bound; large chunks hold more [rows, vocabulary] buffers: this table is where the
trade-off is read from.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, print_table, save_json
from bench.training import PeakMemory
from trainer.fused_loss import Head, fused_sarft_loss
from trainer.loss import sarft_loss

MIB = 2**20


def make_inputs(args: argparse.Namespace) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    b, t, h, v = args.rows, args.tokens, args.hidden, args.vocab
    weight = torch.randn(v, h, generator=generator) * h**-0.5
    labels = torch.randint(0, v, (b, t), generator=generator)
    labels[:, : t // 3] = -100
    flags = torch.zeros(b, dtype=torch.long)
    flags[: b // 2] = 1
    return {
        "hidden": torch.randn(b, t, h, generator=generator),
        "ref_hidden": torch.randn(b // 2, t, h, generator=generator),
        "weight": weight,
        "labels": labels,
        "attention": torch.ones(b, t, dtype=torch.long),
        "flags": flags,
    }


def run_once(inputs: dict[str, Any], chunk_rows: int | None) -> None:
    hidden = inputs["hidden"].clone().requires_grad_(True)
    head = Head(inputs["weight"])
    if chunk_rows is None:
        logits = hidden @ head.weight.t()
        with torch.no_grad():
            ref_logits = inputs["ref_hidden"] @ head.weight.t()
        parts = sarft_loss(
            logits, ref_logits, inputs["labels"], inputs["attention"], inputs["flags"], lam=0.5
        )
    else:
        parts = fused_sarft_loss(
            hidden,
            head,
            inputs["ref_hidden"],
            head,
            inputs["labels"],
            inputs["attention"],
            inputs["flags"],
            lam=0.5,
            chunk_rows=chunk_rows,
        )
    parts.total.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--chunk-rows", default="32,64,128,256")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args)
    cells: list[int | None] = [None, *(int(c) for c in args.chunk_rows.split(","))]
    for cell in cells:  # warm-up: first-touch allocations and kernel selection
        run_once(inputs, cell)
    times: dict[int | None, list[float]] = {c: [] for c in cells}
    peaks: dict[int | None, float] = dict.fromkeys(cells, 0.0)
    memory = PeakMemory(torch.device("cpu"))
    for rep in range(args.reps):  # the cells take turns, the order reversed every round
        for cell in cells if rep % 2 == 0 else cells[::-1]:
            memory.start()
            start = time.perf_counter()
            run_once(inputs, cell)
            times[cell].append(time.perf_counter() - start)
            peaks[cell] = max(peaks[cell], memory.peak_mib())
    base = statistics.median(times[None])
    rows = []
    for cell in cells:
        t = statistics.median(times[cell])
        label = "unfused" if cell is None else f"fused, {cell} rows"
        chunk_mib = None if cell is None else cell * args.vocab * 4 / MIB
        rows.append([label, chunk_mib, t, t / base, peaks[cell], peaks[cell] / peaks[None]])
    print_table(
        ["loss", "MiB per [rows, V] buffer", "s", "time x unfused", "peak MiB", "memory x unfused"],
        rows,
    )
    save_json(
        args.json,
        {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "rows": rows},
    )


if __name__ == "__main__":
    main()
