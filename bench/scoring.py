"""Benchmark: naive SaRFT-style scoring against the engine, fp32 and bf16.

    python bench/scoring.py --samples 48 --json bench/results/scoring.json
    python bench/scoring.py --model qwen2.5-coder-0.5b-instruct --role "John Doe" --samples 96
    .venv-vllm/bin/python bench/scoring.py --backend vllm --samples 48   # adds the vLLM rows

The bf16 engine runs twice: with the vocabulary projection and log-softmax in fp32 (an fp32
copy of the output embedding) and all in bf16. A third bf16 row is the worker's bf16 mode:
the all-bf16 run, then the role and unsafe passes of the samples whose s_unsafe - s_role is
within --check-band of 0 scored again by the fp32 engine (its time included). Flag agreement
is given against the naive fp32 method and against the fp32 engine; "max err on d" is the
error on s_unsafe - s_role against the fp32 engine, the one that can flip a flag, and the
band line says how many samples each band would check and how many flags differ outside it.

Naive = what the reference code does per sample: one full forward per sample
and condition, logits over the whole vocabulary at every position, fp32. The
engine = prefix KV reuse, length-bucketed batches, projection at response
positions only, and on CPU the fused Llama forward (worker/scoring/fused_llama.py).
Both compute all three conditions on the same token ids. The engine's one-time
start-up checks (once per loaded model, as in a worker) fall in its warm-up;
its prefix computations are timed.

With ``--backend vllm`` (in the environment of ``make install-vllm``) three rows follow, from
one vLLM engine in bfloat16 (bench/scoring_vllm.py): vLLM as the backend ran before prefix
reuse, vLLM reading the shared system prompt from its prefix cache, and the latter with the
float32 check of the samples within the vLLM band of the margin. vLLM projects onto the whole
vocabulary at every position it runs, so its FLOPs are the naive ones less the cached
positions.

FLOPs count only the work a method needs: 2 x transformer-block parameters x
tokens it runs, plus 2 x vocabulary x hidden size x positions it projects.
Attention scores and padding are not counted, so they show as lost utilisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, machine, matmul_peak_gflops, print_table, save_json
from worker.encoding import ChatEncoder, EncodedSequence
from worker.formats import Message, Sample
from worker.model_loader import load_model
from worker.prompts import Condition, RolePrompts
from worker.scoring.backends import ScoreConfig
from worker.scoring.transformers_backend import TransformersScorer, _needed_len


def load_rows(role: str, n: int) -> list[Sample]:
    path = SHARED_DATA / "rolebench" / "role_generalization_role_specific.jsonl"
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            if row["role"] != role:
                continue
            messages = (Message("user", row["question"]), Message("assistant", row["generated"][0]))
            samples.append(Sample(len(samples), line_no, messages, row))
            if len(samples) == n:
                break
    return samples


def block_params(model: Any) -> int:
    """Parameters applied once per token: everything but the embedding tables."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@torch.inference_mode()
def naive_means(model: Any, sequences: list[EncodedSequence]) -> list[float]:
    means = []
    for seq in sequences:
        ids = torch.tensor([seq.token_ids])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        total = sum(
            logprobs[p - 1, seq.token_ids[p]].item()
            for start, end in seq.response_spans
            for p in range(start, end)
        )
        means.append(total / seq.num_response_tokens)
    return means


def naive_flops(sequences: list[EncodedSequence], params: int, vocab: int, hidden: int) -> float:
    tokens = sum(len(s.token_ids) for s in sequences)
    return 2.0 * params * tokens + 2.0 * vocab * hidden * tokens


def engine_flops(sequences: list[EncodedSequence], params: int, vocab: int, hidden: int) -> float:
    prefixes = {s.prefix.key: len(s.prefix.token_ids) for s in sequences}
    tokens = sum(_needed_len(s) - s.shared_len for s in sequences) + sum(prefixes.values())
    projected = sum(s.num_response_tokens for s in sequences)
    return 2.0 * params * tokens + 2.0 * vocab * hidden * projected


def differences(means: list[float]) -> list[float]:
    """s_unsafe - s_role per sample: what the flag compares with the margin (0).

    Sequences come as (role, unsafe, ref) per sample."""
    return [means[i + 1] - means[i] for i in range(0, len(means), 3)]


def flags(means: list[float]) -> list[bool]:
    return [d > 0 for d in differences(means)]


def run_engine(
    model: Any, sequences: list[EncodedSequence], batch_size: int, fp32_head: bool = False
) -> tuple[list[float], float]:
    TransformersScorer(model, batch_size=batch_size, fp32_head=fp32_head).score(sequences[:6])
    start = time.perf_counter()
    # Fresh: prefixes are timed.
    scorer = TransformersScorer(model, batch_size=batch_size, fp32_head=fp32_head)
    results = scorer.score(sequences)
    return [r.mean for r in results], time.perf_counter() - start


def run_check(
    model: Any, sequences: list[EncodedSequence], means: list[float], batch_size: int, band: float
) -> tuple[list[float], float, int]:
    """The worker's check: the role and unsafe passes of the samples near the flag boundary
    scored again in fp32 (the reference pass keeps its bf16 score, as in the worker)."""
    near = [3 * k for k, d in enumerate(differences(means)) if abs(d) < band]
    merged = list(means)
    start = time.perf_counter()
    if near:
        again = TransformersScorer(model, batch_size=batch_size).score(
            [seq for i in near for seq in sequences[i : i + 2]]
        )
        for k, i in enumerate(near):
            merged[i : i + 2] = [r.mean for r in again[2 * k : 2 * k + 2]]
    return merged, time.perf_counter() - start, len(near)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--role", default="Jack Sparrow")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--check-band", type=float, default=ScoreConfig().band)
    parser.add_argument(
        "--backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="vllm: add the vLLM rows (needs the environment of make install-vllm)",
    )
    parser.add_argument(
        "--model", default=None, help="packaged name, HF id or path (default: the bundled one)"
    )
    args = parser.parse_args()

    prompts = RolePrompts.from_file(SHARED_DATA / "sarft" / "role_prompts_v2.json", args.role)
    samples = load_rows(args.role, args.samples)
    fp32 = load_model(args.model, dtype="float32")
    encoder = ChatEncoder(fp32.tokenizer, prompts)
    sequences = [encoder.encode(s, c) for s in samples for c in Condition]
    model = fp32.model
    params, vocab, hidden = block_params(model), model.config.vocab_size, model.config.hidden_size
    n = len(samples)
    print(
        f"{fp32.name}: {n} samples of {args.role}, {len(sequences)} sequences, "
        f"{torch.get_num_threads()} threads"
    )

    peak32, peak16 = matmul_peak_gflops(torch.float32), matmul_peak_gflops(torch.bfloat16)
    print(f"matmul peak: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s")

    naive_means(model, sequences[:3])  # warm-up
    start = time.perf_counter()
    naive = naive_means(model, sequences)
    naive_s = time.perf_counter() - start

    eng32, eng32_s = run_engine(model, sequences, args.batch_size)
    bf16_model = load_model(args.model, dtype="bfloat16").model
    eng16, eng16_s = run_engine(bf16_model, sequences, args.batch_size, fp32_head=True)
    eng16h, eng16h_s = run_engine(bf16_model, sequences, args.batch_size)
    band = args.check_band
    checked, check_s, rechecked = run_check(model, sequences, eng16h, args.batch_size, band)
    checked_s = eng16h_s + check_s

    # The machine is shared: take the best of two peak measurements (before and
    # after), so "share of peak" errs low rather than high.
    peak32 = max(peak32, matmul_peak_gflops(torch.float32))
    peak16 = max(peak16, matmul_peak_gflops(torch.bfloat16))
    print(f"matmul peak (best of before/after): fp32 {peak32:.1f}, bf16 {peak16:.1f} GFLOP/s")

    nf = naive_flops(sequences, params, vocab, hidden)
    ef = engine_flops(sequences, params, vocab, hidden)
    ref_flags = flags(naive)
    engine_flags = flags(eng32)

    def row(
        name: str, means: list[float], seconds: float, flops: float, peak: float
    ) -> dict[str, Any]:
        agree = sum(a == b for a, b in zip(flags(means), ref_flags, strict=True)) / n
        agree_engine = sum(a == b for a, b in zip(flags(means), engine_flags, strict=True)) / n
        gflops = flops / seconds / 1e9
        return {
            "method": name,
            "seconds": seconds,
            "samples_per_s": n / seconds,
            "speedup": naive_s / seconds,
            "gflop_per_sample": flops / n / 1e9,
            "gflops": gflops,
            "peak_fraction": gflops / peak,
            "max_abs_diff": max(abs(a - b) for a, b in zip(means, naive, strict=True)),
            # The error that decides a flag: on s_unsafe - s_role, against the fp32 engine.
            "max_flag_diff_error": max(
                abs(a - b) for a, b in zip(differences(means), differences(eng32), strict=True)
            ),
            "flag_agreement": agree,
            "flag_agreement_engine_fp32": agree_engine,
            "speedup_vs_engine_fp32": eng32_s / seconds,
        }

    rows = [
        row("naive fp32", naive, naive_s, nf, peak32),
        row("engine fp32", eng32, eng32_s, ef, peak32),
        row("engine bf16, fp32 head", eng16, eng16_s, ef, peak16),
        row("engine bf16, bf16 head", eng16h, eng16h_s, ef, peak16),
        row("engine bf16 + fp32 check", checked, checked_s, ef, peak16),
    ]
    vllm: dict[str, Any] = {}
    if args.backend == "vllm":
        from bench.scoring_vllm import run_vllm, vllm_flops

        vllm_band = ScoreConfig(backend="vllm").band
        runs, startup_s = run_vllm(fp32.path, sequences)
        for run in runs:
            flops = vllm_flops(nf, run.cached_tokens, params, vocab, hidden)
            rows.append(row(run.name, run.means, run.seconds, flops, peak16))
        reused = runs[-1]
        merged, check_s, vllm_checked = run_check(
            model, sequences, reused.means, args.batch_size, vllm_band
        )
        flops = vllm_flops(nf, reused.cached_tokens, params, vocab, hidden)
        seconds = reused.seconds + check_s
        rows.append(row("vllm bf16, prefix reuse + fp32 check", merged, seconds, flops, peak16))
        vllm = {
            "startup_s": startup_s,
            "check_band": vllm_band,
            "rechecked_samples": vllm_checked,
            "cached_tokens": reused.cached_tokens,
            "tokens": sum(len(s.token_ids) for s in sequences),
            "rescored_sequences": reused.rescored,
            "speedup_reuse_vs_no_reuse": runs[0].seconds / reused.seconds,
        }
        print(
            f"vLLM: engine start {startup_s:.0f} s; prefix reuse read {reused.cached_tokens} of "
            f"{vllm['tokens']} prompt tokens from the cache ({reused.rescored} sequences "
            f"rescored); its check sent {vllm_checked} of {n} samples within {vllm_band}"
        )
    print(
        f"bf16 + fp32 check: {rechecked} of {n} samples within {args.check_band} of the "
        "boundary were scored again in fp32"
    )
    # How many samples each band would send to the check (d from the all-bf16 run), and
    # whether a flag could change outside it (bf16's error on d at least the distance).
    d16, flags16 = differences(eng16h), flags(eng16h)
    bands = {}
    for b in (0.005, 0.01, 0.015, 0.02, 0.03):
        outside = [i for i in range(n) if abs(d16[i]) >= b]
        bands[str(b)] = {
            "rechecked": n - len(outside),
            "flips_outside": sum(flags16[i] != engine_flags[i] for i in outside),
        }
    print("band: samples checked, flags that differ outside it:", bands)
    headers = [
        "method",
        "samples/s",
        "speed-up",
        "GFLOP/sample",
        "GFLOP/s",
        "of peak",
        "max |diff|",
        "max err on d",
        "flags = naive",
        "flags = fp32 engine",
        "x fp32 engine",
    ]
    print_table(
        headers,
        [
            [
                r["method"],
                r["samples_per_s"],
                r["speedup"],
                r["gflop_per_sample"],
                r["gflops"],
                f"{r['peak_fraction']:.0%}",
                r["max_abs_diff"],
                r["max_flag_diff_error"],
                f"{r['flag_agreement']:.1%}",
                f"{r['flag_agreement_engine_fp32']:.1%}",
                r["speedup_vs_engine_fp32"],
            ]
            for r in rows
        ],
    )
    save_json(
        args.json,
        {
            "samples": n,
            "model": fp32.name,
            "role": args.role,
            "batch_size": args.batch_size,
            "machine": machine(),
            "peak_gflops": {"float32": peak32, "bfloat16": peak16},
            "rows": rows,
            "speedup_fp32": rows[1]["speedup"],
            "speedup_bf16": rows[2]["speedup"],
            "peak_fraction_fp32": rows[1]["peak_fraction"],
            "peak_fraction_naive": rows[0]["peak_fraction"],
            "max_abs_diff_fp32": rows[1]["max_abs_diff"],
            "max_abs_diff_bf16": rows[2]["max_abs_diff"],
            "flag_agreement_fp32": rows[1]["flag_agreement"],
            "flag_agreement_bf16": rows[2]["flag_agreement"],
            "flag_agreement_bf16_vs_engine_fp32": rows[2]["flag_agreement_engine_fp32"],
            "flag_agreement_bf16_head_vs_engine_fp32": rows[3]["flag_agreement_engine_fp32"],
            "speedup_bf16_vs_engine_fp32": rows[2]["speedup_vs_engine_fp32"],
            "check_band": args.check_band,
            "bands": bands,
            "bf16_max_flag_diff_error": rows[3]["max_flag_diff_error"],
            "rechecked_samples": rechecked,
            "flag_agreement_checked_vs_engine_fp32": rows[4]["flag_agreement_engine_fp32"],
            "speedup_checked_vs_engine_fp32": rows[4]["speedup_vs_engine_fp32"],
            "vllm": vllm,
        },
    )


if __name__ == "__main__":
    main()
