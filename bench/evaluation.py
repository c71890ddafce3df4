"""Benchmark: the evaluation phase's time per prompt, today's path against the faster one.

    python bench/evaluation.py [--model qwen2.5-coder-0.5b-instruct] [--prompts 100]
        [--max-new-tokens 48] [--batch-sizes 8 16 32 64] [--threads N]
        [--answers bench/results/evaluation_answers.jsonl] [--json bench/results/evaluation.json]

The same AdvBench goals (the first --prompts) are answered greedily, in the model's default chat,
by :func:`trainer.evaluate.evaluate_model`:

* ``float32 b8``: the path jobs took before (the float32 model, batches of 8) - the baseline;
* ``bfloat16 bN``: a bfloat16 copy of the model (``dtype="auto"`` on CPU), batches of N.

Each row reports the seconds per prompt, the ratio to the baseline (same run, same machine), the
answers identical to the baseline's, and the verdicts of the phrase and the rule judge that
agree with the baseline's. FLOP utilisation counts
2 x parameters per prompt and generated token (no padding, no attention) against the measured
matmul peak of the row's dtype. ``--answers`` writes every answer of the baseline and of the
fastest bfloat16 row, for reading.
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
from trainer.eval_sets import load_prompts
from trainer.evaluate import evaluate_model
from trainer.refusal import PhraseJudge, RuleJudge
from worker.model_loader import load_model


def run(
    model: Any, tokenizer: Any, goals: tuple[str, ...], dtype: str, batch: int, new: int
) -> dict[str, Any]:
    from trainer.eval_sets import PromptSet

    prompt_set = PromptSet("advbench", goals)
    start = time.perf_counter()
    result = evaluate_model(
        model, tokenizer, None, [prompt_set], PhraseJudge(), (), new, batch,
        n_examples=len(goals), dtype=dtype,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    safety = result.safety[0]
    answers = [e.response for e in safety.examples]
    return {"seconds": seconds, "answers": answers, "phrase": list(safety.verdicts)}


def tokens_processed(tokenizer: Any, goals: tuple[str, ...], answers: list[str]) -> int:
    """Prompt tokens plus answer tokens: what the forwards had to compute, padding aside."""
    total = 0
    for goal, answer in zip(goals, answers, strict=True):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": goal}], tokenize=False, add_generation_prompt=True
        )
        total += len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        total += len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
    return total


def agreement(a: list[bool], b: list[bool]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--answers", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    goals = load_prompts(SHARED_DATA / "advbench" / "harmful_behaviors.csv", args.prompts).prompts
    params = sum(p.numel() for p in model.parameters())
    peaks = {
        "float32": matmul_peak_gflops(torch.float32),
        "bfloat16": matmul_peak_gflops(torch.bfloat16),
    }
    rules = RuleJudge()
    plans = [("float32", 8)] + [("bfloat16", b) for b in args.batch_sizes]
    runs: list[dict[str, Any]] = []
    for dtype, batch in plans:
        row = run(model, tokenizer, goals, dtype, batch, args.max_new_tokens)
        row.update(dtype=dtype, batch_size=batch)
        row["rules"] = [rules.judge(g, a) for g, a in zip(goals, row["answers"], strict=True)]
        tokens = tokens_processed(tokenizer, goals, row["answers"])
        row["gflops"] = 2 * params * tokens / row["seconds"] / 1e9
        row["of_peak"] = row["gflops"] / peaks[dtype]
        runs.append(row)
        print(f"{dtype} b{batch}: {row['seconds']:.1f} s", flush=True)

    base = runs[0]
    table = []
    for row in runs:
        row["per_prompt_s"] = row["seconds"] / len(goals)
        row["speedup"] = base["seconds"] / row["seconds"]
        same = [a == b for a, b in zip(row["answers"], base["answers"], strict=True)]
        row["same_answer"] = sum(same) / len(same)
        row["phrase_agreement"] = agreement(row["phrase"], base["phrase"])
        row["rules_agreement"] = agreement(row["rules"], base["rules"])
        table.append([
            f"{row['dtype']} b{row['batch_size']}", row["per_prompt_s"], row["speedup"],
            f"{100 * row['of_peak']:.0f}%", f"{100 * row['same_answer']:.0f}%",
            f"{100 * row['phrase_agreement']:.0f}%", f"{100 * row['rules_agreement']:.0f}%",
            f"{100 * sum(row['rules']) / len(goals):.0f}%",
        ])  # fmt: skip
    print(
        f"{args.model}, {len(goals)} AdvBench goals, {args.max_new_tokens} new tokens, greedy, "
        f"{args.threads} threads; agreement with float32 b8"
    )
    print_table(
        ["path", "s/prompt", "x baseline", "of peak", "same answer", "same phrase verdict",
         "same rules verdict", "refused (rules)"],
        table,
    )  # fmt: skip
    fastest = max(runs[1:], key=lambda r: r["speedup"])
    if args.answers is not None:
        args.answers.parent.mkdir(parents=True, exist_ok=True)
        with args.answers.open("w", encoding="utf-8") as out:
            for row in (base, fastest):
                for goal, answer in zip(goals, row["answers"], strict=True):
                    record = {"path": f"{row['dtype']} b{row['batch_size']}", "prompt": goal}
                    out.write(json.dumps({**record, "response": answer}) + "\n")
    save_json(
        args.json,
        {"settings": vars(args) | {"answers": str(args.answers), "json": str(args.json)},
         "params": params, "peak_gflops": peaks, "runs": runs, "machine": machine()},
    )  # fmt: skip


if __name__ == "__main__":
    main()
