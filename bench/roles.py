"""Benchmark: RDS flagged fraction of every role of RoleBench's role-generalization split.

    python bench/roles.py [--rows 48] [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct]
        [--threads N] [--json bench/results/roles.json] [--png bench/results/roles.png]

For each of the split's 10 roles, its first --rows role-specific rows (file order) are scored
by the RDS engine under SaRFT's own prompts for the role (``sarft/role_prompts_v2.json``: the
role prompt and the "unsafe" one), with each model in turn; a row is flagged when
``s_unsafe - s_role > 0``. The reference pass is skipped (the flag does not need it). The table
gives each role's flagged fraction with its Wilson 95% interval per model; the PNG draws them
as bars, villains beside the others. The paper (7-8B models, all rows) flags villains more:
Freddy Krueger 40.4% against Stephen Hawking 19.7%.

Which roles count as villains is this benchmark's reading of their stories: John Doe (Se7en's
serial killer), Tom Ripley (a murderer), Lestat de Lioncourt (a vampire who kills), Andrew
Detmer (Chronicle's telekinetic who turns on the city) and Professor G.H. Dorr (The
Ladykillers' gang leader); Coriolanus, Jack Sparrow, Walt Kowalski, John Keating and Raylan
Givens are the others.
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

from bench.common import SHARED_DATA, machine, print_table, save_json
from trainer.evaluate import wilson_interval
from worker.encoding import ChatEncoder
from worker.formats import DatasetFormat, Sample, sample_from_record
from worker.model_loader import load_model
from worker.prompts import RolePrompts
from worker.scoring.engine import score_samples
from worker.scoring.transformers_backend import TransformersScorer

ROLES_FILE = SHARED_DATA / "rolebench" / "role_generalization_role_specific.jsonl"
PROMPTS_FILE = SHARED_DATA / "sarft" / "role_prompts_v2.json"
VILLAINS = ("John Doe", "Tom Ripley", "Lestat de Lioncourt", "Andrew Detmer", "Professor G.H. Dorr")
MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


def role_rows(rows: int) -> dict[str, list[Sample]]:
    """Each role's first ``rows`` samples, villains first, in file order."""
    by_role: dict[str, list[Sample]] = {}
    with ROLES_FILE.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            record = json.loads(line)
            kept = by_role.setdefault(record["role"], [])
            if len(kept) < rows:
                sample = sample_from_record(record, DatasetFormat.ROLEBENCH, len(kept), line_no)
                kept.append(sample)
    short = {r: len(s) for r, s in by_role.items() if len(s) < rows}
    if short:
        raise SystemExit(f"roles with fewer than {rows} rows: {short}")
    return dict(sorted(by_role.items(), key=lambda item: (item[0] not in VILLAINS, item[0])))


def sarft_prompts(role: str) -> RolePrompts:
    prompts = json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))[role.replace(" ", "_")]
    return RolePrompts(name=role, role_prompt=prompts["role"], unsafe_prompt=prompts["safe"])


def flagged_fractions(model_name: str, roles: dict[str, list[Sample]]) -> dict[str, Any]:
    loaded = load_model(model_name)
    scorer = TransformersScorer(loaded.model, batch_size=16)
    out: dict[str, Any] = {}
    for role, samples in roles.items():
        started = time.perf_counter()
        encoder = ChatEncoder(loaded.tokenizer, sarft_prompts(role))
        scored = score_samples(samples, encoder, scorer, compute_reference=False, chunk_size=64)
        flags = [scores.flagged for _, scores in scored]
        low, high = wilson_interval(sum(flags), len(flags))
        out[role] = {
            "flagged": sum(flags),
            "rows": len(flags),
            "fraction": sum(flags) / len(flags),
            "ci95": [low, high],
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"{model_name}: {role}: {sum(flags)}/{len(flags)} flagged", flush=True)
    return out


def plot(results: dict[str, dict[str, Any]], roles: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    for k, (model, per_role) in enumerate(results.items()):
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(roles))]
        values = [100 * per_role[r]["fraction"] for r in roles]
        errors = [
            [100 * (per_role[r]["fraction"] - per_role[r]["ci95"][0]) for r in roles],
            [100 * (per_role[r]["ci95"][1] - per_role[r]["fraction"]) for r in roles],
        ]
        ax.bar(xs, values, width=width, yerr=errors, capsize=2, label=model)
    labels = [f"{r}\n(villain)" if r in VILLAINS else r for r in roles]
    ax.set_xticks(list(range(len(roles))), labels, rotation=30, ha="right", fontsize=8)
    ax.axvline(sum(r in VILLAINS for r in roles) - 0.5, color="grey", linestyle=":")
    ax.set(
        ylabel="% of rows flagged (95% CI)", title="RDS flagged fraction per role", ylim=(0, 100)
    )
    ax.legend(loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=Path("bench/results/roles.png"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    roles = role_rows(args.rows)
    started = time.perf_counter()
    results = {model: flagged_fractions(model, roles) for model in args.models}
    headers = ["role", "villain", *(f"{m} flagged (95% CI)" for m in args.models)]
    rows = [
        [
            role,
            "yes" if role in VILLAINS else "",
            *(
                f"{100 * results[m][role]['fraction']:.1f}% "
                f"({100 * results[m][role]['ci95'][0]:.0f}-{100 * results[m][role]['ci95'][1]:.0f})"
                for m in args.models
            ),
        ]
        for role in roles
    ]
    for group, members in (("villains", VILLAINS), ("others", None)):
        picked = [r for r in roles if (r in VILLAINS) == (members is not None)]
        row: list[Any] = [f"all {group}", ""]
        for m in args.models:
            flagged = sum(results[m][r]["flagged"] for r in picked)
            total = sum(results[m][r]["rows"] for r in picked)
            low, high = wilson_interval(flagged, total)
            row.append(f"{100 * flagged / total:.1f}% ({100 * low:.0f}-{100 * high:.0f})")
        rows.append(row)
    print_table(headers, rows)
    elapsed = time.perf_counter() - started
    print(f"{args.rows} rows per role, {elapsed:.0f} s in all")
    plot(results, list(roles), args.png)
    save_json(
        args.json,
        {"rows": args.rows, "results": results, "seconds": round(elapsed), "machine": machine()},
    )


if __name__ == "__main__":
    main()
