"""Experiment: the SaRFT paper's main table in miniature, for a villain and a benign role.

    python bench/paper.py [--model qwen2.5-coder-0.5b-instruct] [--roles "John Doe" "John Keating"]
        [--methods sft random flip sarft] [--max-train 96] [--max-prompts 24]
        [--max-new-tokens 40] [--epochs 1] [--max-steps N] [--batch-size 8] [--lr 1e-4]
        [--lambda-kl 0.5] [--threads N] [--out out/paper] [--json bench/results/paper.json]

For each role, with the given model (a packaged name, an HF id or a directory):

1. the role's first --max-train rows of RoleBench's role-generalization split are written to
   ``OUT/<role>/data.jsonl`` and scored by the RDS engine (`score_file`, under SaRFT's own
   prompts for the role); its ``flagged`` decides the KL subset;
2. `split_validation` (seed 0: 10 %, at most 100 rows) holds rows out for ROUGE-L;
3. each method (`sft`; the controls `random`, as many random rows as flagged, and `flip`, the
   unflagged rows; `sarft`) is trained on the same remaining rows and flags from a fresh copy
   of the base model, with the trainer's defaults (the authors' protocol: empty system
   message, per-sample CE, constant learning rate, LoRA r=32 alpha=64 dropout 0 on q,v);
4. the base model and each trained one answer greedily, in the default chat (no system
   message, as the authors evaluate) and in character (the role prompt): the held-out
   questions (ROUGE-L F1 x100 against RoleBench's answers) and the first --max-prompts prompts
   of AdvBench (``goal``) and BeaverTails (``prompt``), judged by the refusal phrases.

The table has the paper's rows (base, SFT, random, flip, SaRFT) per role, with each refusal
rate's Wilson 95% interval; the JSON keeps every evaluation (first answers included), the
training histories and the timings. The paper fine-tunes 7-8B models on a role's full data
and judges with a classifier; a 0.5B model, a few hundred rows and a phrase judge show the
direction of the effects at best: read differences inside the intervals as noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, machine, print_table, save_json
from trainer.config import EVAL_SETTINGS, METHODS, Method, TrainConfig
from trainer.eval_sets import PromptSet, load_prompts, question_and_reference, split_validation
from trainer.evaluate import EvalResult, evaluate_settings
from trainer.refusal import PhraseJudge
from trainer.train import fine_tune
from worker.formats import DatasetFormat, Sample, iter_samples
from worker.model_loader import load_model
from worker.prompts import RolePrompts
from worker.score_file import score_file
from worker.scoring.backends import ScoreConfig

ROLEBENCH = SHARED_DATA / "rolebench" / "role_generalization_role_specific.jsonl"
NAMES = {"sft": "SFT", "random": "random", "flip": "flip", "sarft": "SaRFT"}
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
) -> dict[str, EvalResult]:
    """Every evaluation setting: the default chat (no system message) and in character."""
    return evaluate_settings(
        model, tokenizer, prompts, EVAL_SETTINGS, safety_sets, PhraseJudge(), fidelity,
        args.max_new_tokens, args.eval_batch_size,
    )  # fmt: skip


def summary(name: str, results: dict[str, EvalResult]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    for setting, result in results.items():
        row[f"rouge_l_{setting}"] = None if result.fidelity is None else result.fidelity.rouge_l
        for s in result.safety:
            row[f"{s.name}_{setting}"] = {"rate": s.refusal_rate, "ci95": list(s.ci95)}
    return row


def run_role(
    role: str, args: argparse.Namespace, started: float, saved: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """One role's rows; ``saved`` gets the role's result after every row, so a long run that
    stops part-way keeps (and prints) what it finished."""
    out = args.out / role.replace(" ", "_")
    prompts = RolePrompts.from_file(SHARED_DATA / "sarft" / "role_prompts_v2.json", role)
    data_path = out / "data.jsonl"
    n_rows = write_role_rows(role, args.max_train, data_path)
    samples: list[Sample] = list(iter_samples(data_path, DatasetFormat.ROLEBENCH))
    rds = score_file(data_path, prompts, out / "rds", ScoreConfig(model=args.model))
    flags = read_flags(out / "rds" / "scores.jsonl", len(samples))
    pairs, held_out = split_validation(list(zip(samples, flags, strict=True)), seed=VALIDATION_SEED)
    train_samples, train_flags = [s for s, _ in pairs], [f for _, f in pairs]
    fidelity = [question_and_reference(s) for s, _ in held_out]
    log(
        started,
        f"{role}: flagged {sum(flags)}/{len(flags)}; {len(pairs)} train, {len(held_out)} held out",
    )
    sets = [
        load_prompts(SHARED_DATA / "advbench" / "harmful_behaviors.csv", args.max_prompts),
        load_prompts(SHARED_DATA / "beavertails" / "evaluation.csv", args.max_prompts),
    ]
    models: list[dict[str, Any]] = []
    result = {
        "role": role,
        "rows": n_rows,
        "flagged": sum(flags),
        "flagged_fraction": sum(flags) / len(flags),
        "train_rows": len(train_samples),
        "held_out": len(held_out),
        "rds_summary": rds,
        "models": models,
    }
    base = load_model(args.model)
    models.append(
        summary("base", evaluate(base.model, base.tokenizer, prompts, sets, fidelity, args))
    )
    log(started, f"{role}: base evaluated")
    saved(result)
    del base
    for method in args.methods:
        loaded = load_model(args.model)  # a fresh base: training changes the model in place
        config = train_config(method, args)
        start = time.perf_counter()
        trained = fine_tune(
            loaded.model, loaded.tokenizer, train_samples, train_flags, prompts, config,
            out / method, base_model_name=loaded.name,
        )  # fmt: skip
        train_s = time.perf_counter() - start
        results = evaluate(trained.model, loaded.tokenizer, prompts, sets, fidelity, args)
        log(started, f"{role}: {method}: {trained.steps} steps ({train_s:.0f} s), evaluated")
        row = summary(NAMES[method], results)
        row.update(steps=trained.steps, num_kl_samples=trained.num_kl_samples, train_s=train_s)
        row["history"] = trained.history
        row["config"] = config.to_dict()
        models.append(row)
        saved(result)
        del loaded, trained
    return result


def train_config(method: Method, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        method=method,
        lambda_kl=args.lambda_kl,
        n_epochs=args.epochs,
        batch_size=args.batch_size,
        micro_batch_size=min(4, args.batch_size),
        learning_rate=args.lr,
        max_steps=args.max_steps,
    )


def _rate(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    low, high = cell["ci95"]
    return f"{100 * cell['rate']:.0f} ({100 * low:.0f}-{100 * high:.0f})"


def print_results(roles: list[dict[str, Any]]) -> None:
    headers = ["role", "model", "flagged %", "ROUGE-L", "AdvBench", "AdvBench in char.",
               "BeaverTails", "BeaverTails in char."]  # fmt: skip
    rows = []
    for role in roles:
        for m in role["models"]:
            rows.append([
                role["role"], m["model"], f"{100 * role['flagged_fraction']:.0f}",
                m["rouge_l_default"], _rate(m.get("advbench_default")),
                _rate(m.get("advbench_in_character")), _rate(m.get("beavertails_default")),
                _rate(m.get("beavertails_in_character")),
            ])  # fmt: skip
    print("refusal % (Wilson 95% interval); default chat unless 'in char.'; ROUGE-L F1 x100")
    print_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--roles", nargs="+", default=["John Doe", "John Keating"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(NAMES))
    parser.add_argument("--max-train", type=int, default=96, help="role rows used")
    parser.add_argument("--max-prompts", type=int, default=24, help="per safety set")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lambda-kl", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("out/paper"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--table", type=Path, nargs="+", metavar="JSON",
        help="print one table from earlier runs' JSON files (e.g. one run per role) and exit",
    )  # fmt: skip
    args = parser.parse_args()
    if args.table:
        print_results([r for path in args.table for r in json.loads(path.read_text())["roles"]])
        return
    if args.max_train < 2:
        parser.error("--max-train must be at least 2 (one row is held out)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "json", "table")}
    roles: list[dict[str, Any]] = []

    def save(done: bool) -> None:
        elapsed = time.perf_counter() - started
        document = {"settings": settings, "roles": roles, "seconds": elapsed, "complete": done}
        save_json(args.json, {**document, "machine": machine()})

    def saved(result: dict[str, Any]) -> None:
        roles[-1] = result
        save(done=False)

    for role in args.roles:
        roles.append({"role": role, "models": []})
        roles[-1] = run_role(role, args, started, saved)
        print_results(roles[-1:])
    elapsed = time.perf_counter() - started
    if len(roles) > 1:
        print_results(roles)
    print(
        f"{args.model}; {args.max_train} rows per role, LoRA (trainer defaults), "
        f"{args.epochs} epoch(s) of batches of {args.batch_size}, lr {args.lr:g}, lambda "
        f"{args.lambda_kl}; {args.max_prompts} prompts per set, {args.max_new_tokens} new "
        f"tokens, phrase judge; {elapsed / 60:.1f} min"
    )
    save(done=True)


if __name__ == "__main__":
    main()
