"""Experiment: the SaRFT paper's main table at a size that can decide, cell by cell, resumable.

    python bench/paper.py [--model qwen2.5-coder-0.5b-instruct]
        [--roles "John Doe" "Andrew Detmer" "John Keating" "Jack Sparrow"]
        [--max-train 106] [--epochs 2] [--lr 1e-3] [--lambda-kl 0.5]
        [--seeds 3] [--seed-role "John Doe"] [--lambdas 0 0.1 0.5 1 2] [--lambda-role "John Doe"]
        [--advbench 100] [--beavertails 140] [--jailbreak-goals 50] [--max-new-tokens 64]
        [--threads N] [--out out/paper] [--only CELL ...] [--report] [--json FILE]

Cells, each saved to ``bench/paper_cells/<id>.json.gz`` as it finishes and committed (a rerun
skips finished cells, so a run can span sessions and checkouts; ``--report`` only reads them):

1. per role, RoleBench's role-generalization rows (the first --max-train) scored by the RDS
   engine under SaRFT's own prompts for the role; 10 rows held out (seed 0) for ROUGE-L;
2. per role, the base model and each method (SFT; the controls random, as many random rows as
   flagged, and flip, the unflagged rows; SaRFT), trained from a fresh base on the same rows:
   LoRA r=32 (the trainer's defaults: the authors' protocol), --epochs epochs of batches of 8 at
   --lr, bfloat16 autocast; the erosion setting: strong enough that SFT loses safety;
3. the seed spread: SFT and SaRFT on --seed-role with training seeds 1..--seeds-1 too;
4. lambda: SaRFT on --lambda-role at each of --lambdas.

Every model answers greedily (bfloat16 copy, batches of 64, --max-new-tokens) in the default
chat and in character: the first --advbench AdvBench goals, the first --beavertails BeaverTails
prompts (10 per harm category at 140), --jailbreak-goals goals under each jailbreak set, and the
held-out questions. Every answer is kept in the cell, so the tables can be judged again by
another judge (:mod:`bench.paper_stats`).

Run it alone, or pinned (``taskset -c 1 python bench/paper.py --threads 1``) beside other work.
On two cores, two pinned one-thread processes split the cells by role (each role's scores
live in its own directory under --out)::

    taskset -c 0 python bench/paper.py --threads 1 --roles "John Doe"
    taskset -c 1 python bench/paper.py --threads 1 --roles "Andrew Detmer" "John Keating" \
        "Jack Sparrow" --seeds 1 --lambdas

The model's bfloat16 logits and greedy answers were bitwise the same at one and two threads,
so cells from either layout compare as equals.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, machine
from trainer.config import EVAL_SETTINGS, Method, TrainConfig
from trainer.eval_sets import PromptSet, load_prompts, question_and_reference, split_validation
from trainer.evaluate import evaluate_settings
from trainer.jailbreaks import JAILBREAK_SETS, jailbreak_set
from trainer.refusal import PhraseJudge
from trainer.train import fine_tune
from worker.formats import DatasetFormat, Sample, iter_samples
from worker.model_loader import load_model
from worker.prompts import RolePrompts
from worker.score_file import score_file
from worker.scoring.backends import ScoreConfig

ROLEBENCH = SHARED_DATA / "rolebench" / "role_generalization_role_specific.jsonl"
ROLE_PROMPTS = SHARED_DATA / "sarft" / "role_prompts_v2.json"
CELLS = Path(__file__).resolve().parent / "paper_cells"
"""Finished cells, gzipped JSON, committed: a run spans sessions and checkouts."""
ROLES = ("John Doe", "Andrew Detmer", "John Keating", "Jack Sparrow")
METHODS: tuple[Method, ...] = ("sft", "random", "flip", "sarft")
VALIDATION_SEED = 0
HELD_OUT = 10


@dataclass(frozen=True)
class Cell:
    role: str
    method: str  # "base" or a training method
    seed: int = 0
    lambda_kl: float | None = None

    @property
    def id(self) -> str:
        name = self.role.replace(" ", "_") + "/" + self.method
        if self.method != "base":
            name += f"-seed{self.seed}-lambda{self.lambda_kl:g}"
        return name


def plan(args: argparse.Namespace) -> list[Cell]:
    """Every cell of the experiment, the main table's first (role by role)."""
    cells: list[Cell] = []
    for role in args.roles:
        cells.append(Cell(role, "base"))
        cells += [Cell(role, m, 0, args.lambda_kl) for m in METHODS]
    for seed in range(1, args.seeds):
        cells += [Cell(args.seed_role, m, seed, args.lambda_kl) for m in ("sft", "sarft")]
    cells += [Cell(args.lambda_role, "sarft", 0, lam) for lam in args.lambdas]
    return list(dict.fromkeys(cells))


def write_role_rows(role: str, max_rows: int, path: Path) -> None:
    """The role's first ``max_rows`` RoleBench rows, copied to ``path``."""
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
    if kept < max_rows:
        raise SystemExit(f"{role!r} has {kept} RoleBench rows, fewer than --max-train {max_rows}")


@dataclass
class RoleData:
    prompts: RolePrompts
    train: list[Sample]
    flags: list[bool]
    fidelity: list[tuple[str, str]]
    flagged: int


def role_data(role: str, args: argparse.Namespace) -> RoleData:
    """The role's rows, their RDS flags (scored once, kept in OUT) and the held-out split."""
    out = args.out / role.replace(" ", "_")
    prompts = RolePrompts.from_file(ROLE_PROMPTS, role)
    data_path = out / "data.jsonl"
    scores = out / "rds" / "scores.jsonl"
    if not scores.exists():
        write_role_rows(role, args.max_train, data_path)
        score_file(data_path, prompts, out / "rds", ScoreConfig(model=args.model))
    samples = list(iter_samples(data_path, DatasetFormat.ROLEBENCH))
    flags: list[bool] = [False] * len(samples)
    for line in scores.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        flags[record["index"]] = bool(record["scores"]["flagged"])
    fraction = HELD_OUT / len(samples)
    pairs, held = split_validation(
        list(zip(samples, flags, strict=True)), fraction, HELD_OUT, VALIDATION_SEED
    )
    return RoleData(
        prompts, [s for s, _ in pairs], [f for _, f in pairs],
        [question_and_reference(s) for s, _ in held], sum(flags),
    )  # fmt: skip


def safety_sets(args: argparse.Namespace) -> list[PromptSet]:
    advbench = SHARED_DATA / "advbench" / "harmful_behaviors.csv"
    goals = load_prompts(advbench, args.jailbreak_goals)
    return [
        load_prompts(advbench, args.advbench),
        load_prompts(SHARED_DATA / "beavertails" / "evaluation.csv", args.beavertails),
        *(jailbreak_set(name, goals) for name in JAILBREAK_SETS),
    ]


def train_config(cell: Cell, args: argparse.Namespace) -> TrainConfig:
    assert cell.method != "base" and cell.lambda_kl is not None
    return TrainConfig(
        method=cell.method,  # type: ignore[arg-type]
        lambda_kl=cell.lambda_kl,
        n_epochs=args.epochs,
        batch_size=8,
        micro_batch_size=4,
        learning_rate=args.lr,
        seed=cell.seed,
        random_seed=cell.seed,
        dtype="bfloat16",
    )


def run_cell(
    cell: Cell, data: RoleData, sets: list[PromptSet], args: argparse.Namespace
) -> dict[str, Any]:
    loaded = load_model(args.model)  # a fresh base: training changes the model in place
    model = loaded.model
    record: dict[str, Any] = {"cell": cell.__dict__ | {"id": cell.id}}
    if cell.method != "base":
        config = train_config(cell, args)
        start = time.perf_counter()
        trained = fine_tune(
            model, loaded.tokenizer, data.train, data.flags, data.prompts, config,
            args.out / "runs" / cell.id, base_model_name=loaded.name,
        )  # fmt: skip
        model = trained.model
        record["train"] = {
            "seconds": time.perf_counter() - start, "steps": trained.steps,
            "num_kl_samples": trained.num_kl_samples, "history": trained.history,
            "config": config.to_dict(),
        }  # fmt: skip
    start = time.perf_counter()
    results = evaluate_settings(
        model, loaded.tokenizer, data.prompts, EVAL_SETTINGS, sets, PhraseJudge(),
        data.fidelity, args.max_new_tokens, 64, n_examples=10_000,
    )  # fmt: skip
    record["eval_seconds"] = time.perf_counter() - start
    record["evaluation"] = {setting: r.to_dict() for setting, r in results.items()}
    record["role_data"] = {
        "train_rows": len(data.train), "flagged_in_train": sum(data.flags),
        "held_out": len(data.fidelity), "flagged": data.flagged,
    }  # fmt: skip
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--roles", nargs="+", default=list(ROLES))
    parser.add_argument("--max-train", type=int, default=106, help="rows per role (10 held out)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lambda-kl", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-role", default="John Doe")
    parser.add_argument("--lambdas", type=float, nargs="*", default=[0.0, 0.1, 0.5, 1.0, 2.0])
    parser.add_argument("--lambda-role", default="John Doe")
    parser.add_argument("--advbench", type=int, default=100)
    parser.add_argument("--beavertails", type=int, default=140)
    parser.add_argument("--jailbreak-goals", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("out/paper"), help="scores, adapters")
    parser.add_argument(
        "--cells", type=Path, default=CELLS, help="finished cells (kept in the repository)"
    )
    parser.add_argument("--only", nargs="+", default=None, help="cell ids to run (default: all)")
    parser.add_argument("--report", action="store_true", help="only print the tables")
    parser.add_argument("--judge", choices=("phrases", "rules"), default="rules")
    parser.add_argument("--json", type=Path, default=None, help="write the tables' numbers")
    parser.add_argument("--plot", type=Path, default=None, help="the lambda plot (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = plan(args)
    cells_dir = args.cells
    if not args.report:
        sets = safety_sets(args)
        data: dict[str, RoleData] = {}
        started = time.perf_counter()
        for cell in cells:
            path = cells_dir / f"{cell.id}.json.gz"
            if path.exists() or (args.only and cell.id not in args.only):
                continue
            if cell.role not in data:
                data[cell.role] = role_data(cell.role, args)
            record = run_cell(cell, data[cell.role], sets, args)
            record["settings"] = {k: str(v) for k, v in vars(args).items()}
            record["machine"] = machine()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(gzip.compress(json.dumps(record).encode("utf-8"), mtime=0))
            tmp.replace(path)
            elapsed = (time.perf_counter() - started) / 60
            print(f"[{elapsed:6.1f} min] {cell.id} done", flush=True)
    from bench.paper_stats import report

    report(cells, cells_dir, args)


if __name__ == "__main__":
    main()
