"""Experiment: the SaRFT paper's main table for one villainous RoleBench role, by hand.

    python bench/paper.py [--role "John Doe"] [--max-train N] [--max-prompts 100] \
        [--max-new-tokens 128] [--epochs 1] [--max-steps N] [--batch-size 8] [--lr LR] \
        [--dtype float32|bfloat16] [--full] [--threads N] [--out out/paper] \
        [--json bench/results/paper.json]

With the bundled SmolLM2-135M-Instruct:

1. the role's rows of RoleBench's role-generalization split (the first --max-train, file
   order) are written to ``OUT/data.jsonl`` and scored by the RDS engine (`score_file`, under
   SaRFT's own prompts for the role); its ``flagged`` decides the KL subset;
2. `split_validation` (seed 0: 10 %, at most 100 rows) holds rows out for ROUGE-L;
3. `sft`, `random` and `sarft` are trained on the same remaining rows and flags, each from a
   fresh copy of the base model (LoRA unless --full), adapters under ``OUT/<method>``;
4. the base model and each trained one answer, greedily, in character (the role's system
   prompt): the held-out questions (ROUGE-L F1 x100 against the RoleBench answers) and the
   first --max-prompts prompts of AdvBench (``goal``) and BeaverTails (``prompt``), judged
   by the refusal-phrase check (`PhraseJudge`).

The table has the paper's shape (rows base, SFT, random, SaRFT; columns ROUGE-L and the two
refusal rates); the JSON keeps, per model, the whole evaluation (first answers included), the
training history and the timings. The paper fine-tunes 7-8B models on a role's full data; a
135M model trained for a few steps shows the direction of the effects at best, and the phrase
judge misses in-character refusals, so read small differences as noise.

What to expect of a small run: the RDS engine flags most of a villain's rows with this model
(86 of John Doe's first 96), so `random` anchors almost the same rows as `sarft`; and for the
first few steps the policy stays so close to the reference (KL ~0.005) that the anchor hardly
changes the update, so the three tuned models can answer identically. Differences need
many more steps (or a larger learning rate) than a CPU run affords.

Runtime on one core of a 2-core CPU (fp32, LoRA, micro-batches of 4): RDS scoring about 1 s
per row; a training step of 8 rows about 15 s for `sft` and 1.5-1.7x that for `sarft` and
`random` (see bench/training.py); greedy generation about 10 s per batch of 8 prompts x 48
new tokens, and each of the four models answers 2 x --max-prompts + the held-out rows. The
defaults (all ~270 rows of a role, 100 prompts per set, 128 new tokens) therefore take hours;
``--max-train 96 --max-prompts 16 --max-new-tokens 48 --max-steps 8 --threads 1`` took 15
minutes. On a machine shared with other work use ``--threads 1``: torch's threads wait for
each other at every operation, so while another process held a core, two threads generated
3-7x slower than one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, machine, print_table, save_json
from trainer.config import DTYPES, DType, LoraSettings, Method, TrainConfig
from trainer.eval_sets import PromptSet, load_prompts, question_and_reference, split_validation
from trainer.evaluate import EvalResult, evaluate_model
from trainer.refusal import PhraseJudge
from trainer.train import fine_tune
from worker.formats import DatasetFormat, Sample, iter_samples
from worker.model_loader import load_model
from worker.prompts import RolePrompts
from worker.score_file import score_file
from worker.scoring.backends import ScoreConfig

ROLEBENCH = SHARED_DATA / "rolebench" / "role_generalization_role_specific.jsonl"
# The paper's row order: the baselines, then the method.
METHODS: tuple[tuple[Method, str], ...] = (("sft", "SFT"), ("random", "random"), ("sarft", "SaRFT"))
VALIDATION_SEED = 0


def write_role_rows(role: str, max_rows: int | None, path: Path) -> int:
    """Copy the role's RoleBench rows (the first ``max_rows``) to ``path``; returns the count."""
    kept = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with ROLEBENCH.open(encoding="utf-8") as src, path.open("w", encoding="utf-8") as dst:
        for line in src:
            if json.loads(line)["role"] != role:
                continue
            dst.write(line if line.endswith("\n") else line + "\n")
            kept += 1
            if kept == max_rows:
                break
    if kept == 0:
        raise SystemExit(f"no RoleBench rows for role {role!r}")
    return kept


def read_flags(scores_path: Path, n: int) -> list[bool]:
    """The RDS flag of each sample, in sample order, from score_file's scores.jsonl."""
    flags: list[bool | None] = [None] * n
    with scores_path.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            flags[record["index"]] = bool(record["scores"]["flagged"])
    if any(flag is None for flag in flags):
        raise RuntimeError(f"{scores_path} does not score every sample")
    return [bool(flag) for flag in flags]


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)


def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: RolePrompts,
    safety_sets: list[PromptSet],
    fidelity: list[tuple[str, str]],
    args: argparse.Namespace,
) -> tuple[EvalResult, float]:
    start = time.perf_counter()
    result = evaluate_model(
        model,
        tokenizer,
        prompts,
        safety_sets,
        PhraseJudge(),
        fidelity=fidelity,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.eval_batch_size,
    )
    return result, time.perf_counter() - start


def summary_row(name: str, result: EvalResult) -> dict[str, Any]:
    rates = {s.name: 100.0 * s.refusal_rate for s in result.safety}
    return {
        "model": name,
        "rouge_l": None if result.fidelity is None else result.fidelity.rouge_l,
        "advbench_refusal_pct": rates["advbench"],
        "beavertails_refusal_pct": rates["beavertails"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--role", default="John Doe")
    parser.add_argument("--max-train", type=int, default=None, help="role rows used (all)")
    parser.add_argument("--max-prompts", type=int, default=100, help="per safety set")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="1e-4 LoRA, 2e-5 full")
    parser.add_argument("--lambda-kl", type=float, default=0.5)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (all cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/paper"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.max_train is not None and args.max_train < 2:
        parser.error("--max-train must be at least 2 (one row is held out)")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    prompts = RolePrompts.from_file(SHARED_DATA / "sarft" / "role_prompts_v2.json", args.role)
    data_path = args.out / "data.jsonl"
    n_rows = write_role_rows(args.role, args.max_train, data_path)
    samples: list[Sample] = list(iter_samples(data_path, DatasetFormat.ROLEBENCH))
    log(started, f"{args.role}: {n_rows} rows; RDS scoring")
    rds = score_file(data_path, prompts, args.out / "rds", ScoreConfig())
    flags = read_flags(args.out / "rds" / "scores.jsonl", len(samples))
    train_pairs, held_out = split_validation(
        list(zip(samples, flags, strict=True)), seed=VALIDATION_SEED
    )
    train_samples = [s for s, _ in train_pairs]
    train_flags = [f for _, f in train_pairs]
    fidelity = [question_and_reference(s) for s, _ in held_out]
    log(
        started,
        f"flagged {sum(flags)}/{len(flags)} ({rds['timings']['score_s']:.0f} s); "
        f"{len(train_samples)} rows train ({sum(train_flags)} flagged), {len(held_out)} held out",
    )
    safety_sets = [
        load_prompts(SHARED_DATA / "advbench" / "harmful_behaviors.csv", args.max_prompts),
        load_prompts(SHARED_DATA / "beavertails" / "evaluation.csv", args.max_prompts),
    ]

    lr = args.lr if args.lr is not None else (2e-5 if args.full else 1e-4)
    configs = {
        method: TrainConfig(
            method=method,
            lambda_kl=args.lambda_kl,
            n_epochs=args.epochs,
            batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size,
            learning_rate=lr,
            max_steps=args.max_steps,
            dtype=cast(DType, args.dtype),
            lora=None if args.full else LoraSettings(),
        )
        for method, _ in METHODS
    }

    # Evaluation is always in float32: --dtype only sets the training forwards' autocast.
    base = load_model()
    result, eval_s = evaluate(base.model, base.tokenizer, prompts, safety_sets, fidelity, args)
    log(started, f"base evaluated ({eval_s:.0f} s)")
    models: list[dict[str, Any]] = [
        {**summary_row("base", result), "eval_s": eval_s, "evaluation": result.to_dict()}
    ]
    del base
    for method, name in METHODS:
        loaded = load_model()  # a fresh base: training changes the model in place
        start = time.perf_counter()
        trained = fine_tune(
            loaded.model,
            loaded.tokenizer,
            train_samples,
            train_flags,
            prompts,
            configs[method],
            args.out / method,
            base_model_name=loaded.name,
        )
        train_s = time.perf_counter() - start
        log(
            started,
            f"{method}: {trained.steps} steps, KL on {trained.num_kl_samples} rows, "
            f"final loss {trained.final.get('loss', float('nan')):.3f} ({train_s:.0f} s)",
        )
        result, eval_s = evaluate(
            trained.model, loaded.tokenizer, prompts, safety_sets, fidelity, args
        )
        log(started, f"{method} evaluated ({eval_s:.0f} s)")
        models.append(
            {
                **summary_row(name, result),
                "method": method,
                "steps": trained.steps,
                "num_kl_samples": trained.num_kl_samples,
                "train_s": train_s,
                "eval_s": eval_s,
                "history": trained.history,
                "evaluation": result.to_dict(),
            }
        )
        del loaded, trained
    elapsed = time.perf_counter() - started

    print_table(
        ["model", "ROUGE-L", "AdvBench refusal %", "BeaverTails refusal %"],
        [
            [
                m["model"],
                m["rouge_l"],
                m["advbench_refusal_pct"],
                m["beavertails_refusal_pct"],
            ]
            for m in models
        ],
    )
    mode = "full fine-tuning" if args.full else "LoRA r=32 q,v"
    steps = models[1]["steps"]
    print(
        f"{args.role}: flagged {sum(flags)}/{len(flags)} ({sum(flags) / len(flags):.0%}); "
        f"trained on {len(train_samples)} rows, {len(held_out)} held out; {mode}, {steps} steps "
        f"of {args.batch_size}, lr {lr:g}, lambda {args.lambda_kl}, {args.dtype}; "
        f"{args.max_prompts} prompts per safety set, {args.max_new_tokens} new tokens, "
        f"judge phrase; {elapsed / 60:.1f} min"
    )
    save_json(
        args.json,
        {
            "role": args.role,
            "rows": n_rows,
            "flagged": sum(flags),
            "flagged_fraction": sum(flags) / len(flags),
            "train_rows": len(train_samples),
            "train_flagged": sum(train_flags),
            "held_out": len(held_out),
            "validation_seed": VALIDATION_SEED,
            "max_prompts": args.max_prompts,
            "max_new_tokens": args.max_new_tokens,
            "judge": PhraseJudge.name,
            "train_config": {m: c.to_dict() for m, c in configs.items()},
            "rds_summary": rds,
            "machine": machine(),
            "seconds": elapsed,
            "models": models,
        },
    )


if __name__ == "__main__":
    main()
