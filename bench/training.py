"""Benchmark: the cost of safety, one `sarft` optimizer step against one `sft` step.

    python bench/training.py [--model NAME] [--batch-size 8] [--micro-batch-size 4] [--reps 3] \
        [--dtype float32|bfloat16] [--modes lora,full] [--losses fused,unfused] \
        [--kl-positions all|response] [--chunk-rows N] [--threads N] \
        [--reference cached|live] [--gradient-checkpointing] [--optimizer-in-backward] \
        [--json bench/results/training.json]

Both methods train --model (default: the bundled SmolLM2-135M-Instruct; e.g.
qwen2.5-coder-0.5b-instruct) on the same batch, with each loss implementation: "fused"
(trainer/fused_loss.py: CE and KL from the hidden states, a chunk of positions at a time) and
"unfused" (trainer/loss.py on full-vocabulary logits, the path before it). The batch is the first
--batch-size RoleBench rows of --role (default "John Doe", the Se7en killer) encoded under
SaRFT's role prompt, exactly as `trainer.train.fine_tune` encodes them. The RDS flags are fixed
rather than scored: every other sample (indices 0, 2, 4, ...) is flagged, so half of the batch
carries the KL anchor. `sft` ignores the flags, as `select_kl_subset` does. The batch is
passed in that interleaved order; how the micro-batches are made of it is the trainer's
business (it may, for one, put the flagged rows together).

What is timed: whole optimizer steps through `trainer.steps.optimizer_step` (every
micro-batch's forward, the reference forward for `sarft`, the loss, backward, gradient
clipping, AdamW), set up by `trainer.policy_setup.prepare_policy` as `fine_tune()` does (LoRA:
a PeftModel whose reference is the base with the adapter disabled; full: a frozen deep copy as
the reference; the model is prepared once per mode, with the `sarft` settings, so the copy is
there during `sft` steps too, although `fine_tune()` makes none for `sft`). Each mode runs in a
fresh process that prepares the model once; the two methods then take turns on it, one
warm-up step each (it allocates AdamW's state) and --reps timed steps each, the order
alternating every round, so a change in the machine's load (it is shared) hits both alike.
The reference (--reference): "cached" (the default) does what `fine_tune()` does before step
1 with the fused loss, `trainer.policy_setup.cached_reference`: the flagged rows' reference final
hidden states are computed once and kept on the host, and full fine-tuning then frees its
frozen copy but for its head, so the `sft` steps of that mode carry no copy either, as in
`fine_tune()`. The cache pass is timed apart ("cache s"); since the batch is one step and a
one-epoch run (the authors' protocol) reads each cached row once, "epoch x sft" charges the
whole pass to one `sarft` step: (step + cache) / sft step. "live" runs the reference forward
in every `sarft` step, the path before the cache, and takes either loss.
--gradient-checkpointing runs both methods with `TrainConfig.gradient_checkpointing` (each
decoder block recomputed in the backward), the memory model likewise; --optimizer-in-backward
with `TrainConfig.optimizer_in_backward` (AdamW run by the backward, no clipping, one
micro-batch per step).
The median is reported, with the CPU seconds the process used per wall second ("CPU/wall"): below
--threads, other processes held the cores and the times are not this machine's best. Under
such contention several torch threads wait for each other at every operation, which slows
many small operations (the KL term) more than large matmuls and inflates the ratio; there
--threads 1 gives the fairer ratio.

Peak memory, per step, above the loaded model (weights paged in): on CUDA,
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. On CPU torch keeps no
allocator counters, so the kernel's own high-water mark is used: before each step the C
heap is trimmed (`malloc_trim`, so that memory freed by an earlier step is not still
resident) and the process's peak RSS is reset by writing 5 to /proc/self/clear_refs; after
the step, VmHWM is read. Unlike a sampling thread this misses no short spike. A method's
figure is the largest over its timed steps; it covers the LoRA weights or the reference
copy, AdamW's state, gradients, activations and logits.

FLOP utilisation counts only the work a method needs, in the style of bench/scoring.py,
with N = transformer-block parameters (all but the tied embedding), V x H the LM head,
T = real (unpadded) tokens and P = positions whose logits the loss needs:

* body: forward 2 N T; backward 4 N T in full fine-tuning (activation and weight
  gradients), 2 N T with LoRA (activation gradients only; the adapters' own are negligible).
* LM head: the same multipliers (6 full, 4 LoRA) times V H P, where P is every response
  position for CE, plus every position of the flagged rows when the KL covers all
  positions (--kl-positions all, the default and the authors' choice).
* `sarft` reference: forward only, 2 N T_f + 2 V H P_f over the flagged rows alone.

Padding, attention scores, softmax/KL arithmetic, and any reference forward or full-width
LM head that the trainer runs over unflagged rows are not counted, so they show as lost
utilisation. The achieved GFLOP/s is
compared with the best plain matmul measured in the same run (`matmul_peak_gflops`, before
and after the steps).

The goals: a `sarft` step at most 1.15x an `sft` step in time and 1.10x in peak memory, and a
fused `sarft` step's peak at least 30% below the unfused one's ("memory x unfused"). The
cells (loss x method) take turns within each mode's process, so all four share the machine's
load. With the bundled model the default run takes about ten minutes on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch.optim.lr_scheduler import LambdaLR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, machine, matmul_peak_gflops, print_table, save_json
from bench.memory_model import MicroBatch, Shape, step_peak_bytes
from bench.scoring import block_params, load_rows
from trainer.config import (
    DTYPES,
    KL_POSITIONS,
    DType,
    KLPositions,
    LoraSettings,
    Method,
    TrainConfig,
)
from trainer.data import TrainExample, encode_examples, pad_token_id, select_kl_subset
from trainer.forward import forward_plan
from trainer.optimizers import build_adamw
from trainer.policy_setup import cached_reference, prepare_policy
from trainer.reference_cache import CachedReference
from trainer.steps import optimizer_step
from worker.model_loader import load_model
from worker.prompts import RolePrompts

MODES = ("lora", "full")
BENCH_METHODS: tuple[Method, ...] = ("sft", "sarft")
LOSSES = ("fused", "unfused")
GOAL_RATIO = 1.15
GOAL_MEMORY_RATIO = 1.10
GOAL_MEMORY_CUT = 0.30  # a fused sarft step's peak at least this far below the unfused one's
MIB = 1024 * 1024
# The learning rates trainer.config documents; they do not change a step's cost.
LEARNING_RATES = {"lora": 1e-4, "full": 2e-5}


@dataclass(frozen=True)
class Job:
    """One mode's measurements, run in a process of their own."""

    mode: str
    role: str
    batch_size: int
    micro_batch_size: int
    reps: int
    dtype: DType
    kl_positions: KLPositions
    threads: int
    model: str | None = None
    losses: tuple[str, ...] = LOSSES
    chunk_rows: int | None = None
    reference: str = "cached"
    checkpointing: bool = False
    in_backward: bool = False


def bench_flags(n: int) -> list[bool]:
    """Every other sample flagged: half the batch, and flagged rows in every micro-batch."""
    return [i % 2 == 0 for i in range(n)]


def build_config(job: Job, method: Method) -> TrainConfig:
    return TrainConfig(
        method=method,
        batch_size=job.batch_size,
        micro_batch_size=job.micro_batch_size,
        learning_rate=LEARNING_RATES[job.mode],
        lr_scheduler="constant",
        warmup_ratio=0.0,
        dtype=job.dtype,
        kl_positions=job.kl_positions,
        gradient_checkpointing=job.checkpointing,
        optimizer_in_backward=job.in_backward,
        max_grad_norm=None if job.in_backward else TrainConfig.max_grad_norm,
        lora=LoraSettings() if job.mode == "lora" else None,
    )


def micro_batches(
    examples: list[TrainExample], micro: int, kl_positions: KLPositions
) -> list[MicroBatch]:
    """The step's micro-batches as `optimizer_step` makes them (flagged rows first)."""
    ordered = sorted(examples, key=lambda e: not e.kl_flag)
    out = []
    for i in range(0, len(ordered), micro):
        chunk = ordered[i : i + micro]
        width = max(len(e.input_ids) for e in chunk)
        flagged = sum(e.kl_flag for e in chunk)
        first = min(len(e.input_ids) - e.num_response_tokens for e in chunk)
        kept = width if flagged and kl_positions == "all" else width - first + 1
        response = sum(e.num_response_tokens for e in chunk)
        out.append(MicroBatch(len(chunk), width, response, flagged, kept))
    return out


def step_flops(
    examples: list[TrainExample], model: Any, mode: str, kl_positions: KLPositions
) -> dict[str, float]:
    """FLOPs one step needs (see the module docstring), and the token counts behind them."""
    n = block_params(model)
    head = model.config.vocab_size * model.config.hidden_size
    train_mult = 6 if mode == "full" else 4
    tokens = sum(len(e.input_ids) for e in examples)
    flagged = [e for e in examples if e.kl_flag]
    kl_tokens = sum(len(e.input_ids) for e in flagged)
    flagged_response = sum(e.num_response_tokens for e in flagged)
    kl_count = kl_tokens if kl_positions == "all" else flagged_response
    # CE needs every response position; the KL adds the flagged rows' other positions.
    policy_positions = sum(e.num_response_tokens for e in examples) + kl_count - flagged_response
    reference = 2.0 * n * kl_tokens + 2.0 * head * kl_count if flagged else 0.0
    flops = train_mult * (n * tokens + head * policy_positions) + reference
    return {"tokens": float(tokens), "kl_tokens": float(kl_tokens), "gflop": flops / 1e9}


class PeakMemory:
    """Peak memory of a code region above a baseline (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.libc = ctypes.CDLL("libc.so.6")
            self.baseline = self._status_kib("VmRSS") * 1024

    @staticmethod
    def _status_kib(field_name: str) -> int:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {field_name} in /proc/self/status")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        self.libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError as exc:
            raise RuntimeError("peak RSS needs Linux's /proc/self/clear_refs") from exc

    def peak_mib(self) -> float:
        peak = torch.cuda.max_memory_allocated() if self.cuda else self._status_kib("VmHWM") * 1024
        return (peak - self.baseline) / MIB


def run_mode(job: Job) -> list[dict[str, Any]]:
    """Warm-up and ``job.reps`` timed optimizer steps per method, taking turns."""
    torch.set_num_threads(job.threads)
    loaded = load_model(job.model, dtype="float32")
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    prompts = RolePrompts.from_file(SHARED_DATA / "sarft" / "role_prompts_v2.json", job.role)
    samples = load_rows(job.role, job.batch_size)
    if len(samples) < job.batch_size:
        raise SystemExit(f"only {len(samples)} rows of {job.role!r}")
    flags = bench_flags(len(samples))
    configs = {m: build_config(job, m) for m in BENCH_METHODS}
    batches: dict[str, list[TrainExample]] = {}
    for method, config in configs.items():
        batches[method] = encode_examples(
            samples,
            select_kl_subset(flags, config.method),
            tokenizer,
            prompts,
            max_prompt_tokens=config.max_prompt_tokens,
            max_response_tokens=config.max_response_tokens,
        )
    # Counted before prepare_policy: LoRA adds its adapters to the model's parameters in place.
    n_block = block_params(model)
    counts = {m: step_flops(batches[m], model, job.mode, job.kl_positions) for m in BENCH_METHODS}

    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # page the memory-mapped weights in, so they count in the baseline
    memory = PeakMemory(device)
    # One policy serves both methods: they differ only in the batch's flags.
    policy, reference, reference_model = prepare_policy(model, configs["sarft"], None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_adamw(params, LEARNING_RATES[job.mode], 0.0, job.in_backward)
    scheduler = LambdaLR(optimizer, lambda _: 1.0)
    plans = {
        loss: replace(
            forward_plan(policy, reference_model, loss == "fused"), chunk_rows=job.chunk_rows
        )
        for loss in job.losses
    }
    if "fused" in plans and not plans["fused"].fused:
        raise SystemExit("this model's head cannot take the fused loss")
    pad_id = pad_token_id(tokenizer)
    cache_s = cache_bytes = None
    if job.reference == "cached":
        # As fine_tune() does before step 1; the batch is one step, so in a one-epoch run
        # each of its flagged rows is cached once and read once.
        started = time.perf_counter()
        reference, reference_model = cached_reference(
            reference, reference_model, policy, batches["sarft"], pad_id, configs["sarft"],
            plans["fused"],
        )  # fmt: skip
        cache_s = time.perf_counter() - started
        if not isinstance(reference, CachedReference):
            # Else the memory model would count a dropped copy that is still there.
            raise SystemExit("the trainer keeps the live reference for this setup")
        cache_bytes = float(reference.nbytes)
        gc.collect()  # full fine-tuning's frozen copy, but for its head
    policy.train()

    shape = Shape.of(model)
    trainable = float(sum(p.numel() for p in params))
    act_bytes = 2 if job.dtype == "bfloat16" else 4
    shapes = {m: micro_batches(batches[m], job.micro_batch_size, job.kl_positions) for m in batches}
    cells = [(loss, method) for loss in job.losses for method in BENCH_METHODS]
    seconds: dict[tuple[str, str], list[float]] = {c: [] for c in cells}
    cpu_seconds: dict[tuple[str, str], list[float]] = {c: [] for c in cells}
    peaks: dict[tuple[str, str], list[float]] = {c: [] for c in cells}
    kl: dict[tuple[str, str], float] = {}
    for round_ in range(job.reps + 1):
        for cell in cells[:: 1 if round_ % 2 == 0 else -1]:
            loss, method = cell
            memory.start()
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = optimizer_step(
                policy,
                reference,
                batches[method],
                pad_id,
                configs[method],
                optimizer,
                scheduler,
                plans[loss],
            )
            if memory.cuda:
                torch.cuda.synchronize()  # the optimizer step is queued, not done, on return
            elapsed = time.perf_counter() - start
            if round_ > 0:  # round 0 is the warm-up
                seconds[cell].append(elapsed)
                cpu_seconds[cell].append(time.process_time() - cpu_start)
                peaks[cell].append(memory.peak_mib())
                kl[cell] = metrics["kl"]

    rows = []
    for cell in cells:
        loss, method = cell
        step_s = statistics.median(seconds[cell])
        rows.append(
            {
                "mode": job.mode,
                "loss": loss,
                "method": method,
                "device": str(device),
                "trainable_params": sum(p.numel() for p in params),
                "block_params": n_block,
                "step_s_all": seconds[cell],
                "step_s": step_s,
                # CPU seconds per wall second (all threads): below --threads when others
                # take the cores, and then the times are not this machine's best.
                "cpu_per_wall": statistics.median(
                    c / s for c, s in zip(cpu_seconds[cell], seconds[cell], strict=True)
                ),
                "tokens_per_s": counts[method]["tokens"] / step_s,
                "last_kl": kl[cell],
                **counts[method],
                "gflops": counts[method]["gflop"] / step_s,
                "peak_mib": max(peaks[cell]),
                "model_mib": step_peak_bytes(
                    shape,
                    shapes[method],
                    trainable,
                    job.mode == "full",
                    loss == "fused",
                    act_bytes,
                    reference_cache=cache_bytes,
                    checkpointing=job.checkpointing,
                    optimizer_in_backward=job.in_backward,
                )
                / MIB,
                "reference": job.reference,
                "optimizer_in_backward": job.in_backward,
                "cache_s": cache_s,
                "cache_mib": None if cache_bytes is None else cache_bytes / MIB,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="packaged name, HF id or path (default: the bundled one)"
    )
    parser.add_argument(
        "--losses",
        default=None,
        help="comma-separated: fused,unfused (default: fused with --reference cached, else both)",
    )
    parser.add_argument("--role", default="John Doe")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--kl-positions", choices=KL_POSITIONS, default="all")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: lora,full")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (all cores)"
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="positions per fused-loss chunk (default: trainer.fused_loss.chunk_rows_for(V))",
    )
    parser.add_argument(
        "--reference",
        choices=("cached", "live"),
        default="cached",
        help="cached: the KL rows' reference states computed once before the steps, as "
        "fine_tune() does (fused loss only); live: the reference forward in every sarft step",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both methods with TrainConfig.gradient_checkpointing (blocks recomputed in the "
        "backward)",
    )
    parser.add_argument(
        "--optimizer-in-backward",
        action="store_true",
        help="both methods with TrainConfig.optimizer_in_backward (AdamW in the backward, no "
        "clipping; --micro-batch-size must equal --batch-size)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.losses is None:
        # The cache serves the fused loss alone.
        args.losses = "fused" if args.reference == "cached" else ",".join(LOSSES)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes a comma-separated subset of {','.join(MODES)}")
    losses = tuple(x.strip() for x in args.losses.split(",") if x.strip())
    if not losses or any(x not in LOSSES for x in losses):
        parser.error(f"--losses takes a comma-separated subset of {','.join(LOSSES)}")
    if args.reference == "cached" and "unfused" in losses:
        parser.error("--reference cached takes --losses fused (the unfused loss reads logits)")
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.batch_size % args.micro_batch_size:
        parser.error("--batch-size must be a multiple of --micro-batch-size")
    if args.optimizer_in_backward and args.micro_batch_size != args.batch_size:
        parser.error("--optimizer-in-backward takes --micro-batch-size equal to --batch-size")
    torch.set_num_threads(args.threads)  # the matmul peak too

    peak_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    peak = matmul_peak_gflops(peak_dtype)
    print(
        f"{args.role}: batch {args.batch_size} (micro {args.micro_batch_size}), half flagged, "
        f"{args.dtype}, KL positions {args.kl_positions}, reference {args.reference}, "
        f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"AdamW {'in the backward' if args.optimizer_in_backward else 'after the backward'}, "
        f"{torch.get_num_threads()} threads; "
        f"matmul peak {peak:.1f} GFLOP/s"
    )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    for mode in modes:
        job = Job(
            mode,
            args.role,
            args.batch_size,
            args.micro_batch_size,
            args.reps,
            cast(DType, args.dtype),
            cast(KLPositions, args.kl_positions),
            args.threads,
            args.model,
            losses,
            args.chunk_rows,
            args.reference,
            args.gradient_checkpointing,
            args.optimizer_in_backward,
        )
        # A fresh process per mode: LoRA wraps the model in place, and the memory baseline
        # must not include an earlier mode's leftovers.
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            mode_rows = pool.submit(run_mode, job).result()
        for row in mode_rows:
            times = ", ".join(f"{t:.2f}" for t in row["step_s_all"])
            cell = f"{mode} {row['loss']} {row['method']}"
            print(f"  {cell}: {times} s, {row['cpu_per_wall']:.2f} CPU s/s")
        rows.extend(mode_rows)
    elapsed = time.perf_counter() - started
    # The machine is shared: the best of two peak measurements errs towards a low share.
    peak = max(peak, matmul_peak_gflops(peak_dtype))
    print(f"matmul peak (best of before/after): {peak:.1f} GFLOP/s")

    ratios: dict[str, dict[str, float | bool]] = {}

    def find(mode: str, loss: str, method: str) -> dict[str, Any] | None:
        match = [r for r in rows if (r["mode"], r["loss"], r["method"]) == (mode, loss, method)]
        return match[0] if match else None

    for row in rows:
        row["peak_fraction"] = row["gflops"] / peak
        sft = find(row["mode"], row["loss"], "sft")
        assert sft is not None
        row["ratio_time"] = row["step_s"] / sft["step_s"]
        # A one-epoch run (the authors' protocol) reads each cached row once, so the cache
        # pass counts in full against one step of this batch.
        row["ratio_time_epoch"] = (
            (row["step_s"] + row["cache_s"]) / sft["step_s"]
            if row["method"] == "sarft" and row["cache_s"] is not None
            else None
        )
        row["ratio_memory"] = row["peak_mib"] / sft["peak_mib"]
        unfused = find(row["mode"], "unfused", row["method"])
        row["memory_vs_unfused"] = row["peak_mib"] / unfused["peak_mib"] if unfused else None
        if row["method"] == "sarft":
            cut = None if row["memory_vs_unfused"] is None else 1 - row["memory_vs_unfused"]
            ratios[f"{row['mode']}/{row['loss']}"] = {
                "ratio_time": row["ratio_time"],
                "ratio_time_epoch": (
                    row["ratio_time_epoch"]
                    if row["ratio_time_epoch"] is not None
                    else row["ratio_time"]
                ),
                "ratio_memory": row["ratio_memory"],
                "memory_cut_vs_unfused": cut if cut is not None else float("nan"),
                "meets_time_goal": row["ratio_time"] <= GOAL_RATIO,
                "meets_memory_goal": row["ratio_memory"] <= GOAL_MEMORY_RATIO,
            }
    headers = ["mode", "loss", "method", "step s", "tokens/s", "GFLOP/step", "GFLOP/s"]
    headers += ["of peak", "CPU/wall", "peak MiB", "model MiB", "time x sft", "memory x sft"]
    headers += ["memory x unfused", "epoch x sft"]
    print_table(
        headers,
        [
            [
                r["mode"],
                r["loss"],
                r["method"],
                r["step_s"],
                r["tokens_per_s"],
                r["gflop"],
                r["gflops"],
                f"{r['peak_fraction']:.0%}",
                r["cpu_per_wall"],
                r["peak_mib"],
                r["model_mib"],
                r["ratio_time"],
                r["ratio_memory"],
                "-" if r["memory_vs_unfused"] is None else r["memory_vs_unfused"],
                "-" if r["ratio_time_epoch"] is None else r["ratio_time_epoch"],
            ]
            for r in rows
        ],
    )
    for r in rows:
        if r["ratio_time_epoch"] is not None:
            print(
                f"{r['mode']} reference cache: {r['cache_mib']:.1f} MiB built in "
                f"{r['cache_s']:.2f} s; one epoch of this batch (cache + step) "
                f"{r['ratio_time_epoch']:.2f}x sft"
            )
    print(
        f"goals: sarft step <= {GOAL_RATIO}x sft in time and <= {GOAL_MEMORY_RATIO}x in peak "
        f"memory; fused sarft peak >= {GOAL_MEMORY_CUT:.0%} below unfused; total {elapsed:.0f} s"
    )
    save_json(
        args.json,
        {
            "role": args.role,
            "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size,
            "flagged": "every other sample (half the batch)",
            "reps": args.reps,
            "dtype": args.dtype,
            "kl_positions": args.kl_positions,
            "reference": args.reference,
            "gradient_checkpointing": args.gradient_checkpointing,
            "machine": machine(),  # its "threads" are --threads
            "load_average": {"before": load_before, "after": os.getloadavg()[0]},
            "peak_gflops": peak,
            "model": args.model or "bundled",
            "goal_ratio_time": GOAL_RATIO,
            "goal_ratio_memory": GOAL_MEMORY_RATIO,
            "goal_memory_cut": GOAL_MEMORY_CUT,
            "modes": ratios,
            "rows": rows,
            "seconds": elapsed,
        },
    )


if __name__ == "__main__":
    main()
