"""The tables of ``bench/paper.py``, from its saved cells: rates, paired tests, seeds, lambda.

Every stored answer is judged again here (``--judge``), so the tables do not depend on the judge
the cells were generated with. Groups: AdvBench, BeaverTails and Jailbreak (every
``advbench-<attack>`` set pooled); "safety" is the mean of the three groups' refusal rates over
both settings, as the paper's Safety AVG.

Paired statistics, method B against method A on the same role: every (setting, set, prompt) gives
a pair of verdicts. Per role: the difference of refusal rates with a bootstrap 95% interval that
resamples prompts (a prompt's pairs in both settings move together), and the exact McNemar test
on the discordant pairs. Pooled over roles: the mean of the per-role differences, its bootstrap
interval resampling prompts across all roles at once (the roles share their prompts), and the
McNemar test on the summed discordant pairs (a stratified exact test; it treats the same prompt
under different roles as independent, the bootstrap does not).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import print_table, save_json
from trainer.intervals import mcnemar_exact_p
from trainer.jailbreaks import JAILBREAK_SETS, judging_view
from trainer.refusal import Judge, PhraseJudge, RuleJudge

GROUPS = ("advbench", "beavertails", "jailbreak")
NAMES = {"base": "base", "sft": "SFT", "random": "random", "flip": "flip", "sarft": "SaRFT"}
BOOTSTRAP = 2000

Verdicts = dict[tuple[str, str], list[bool]]
"""(setting, set name) -> every prompt's verdict, in prompt order."""


def group_of(set_name: str) -> str:
    return "jailbreak" if set_name in JAILBREAK_SETS else set_name


def judged(record: dict[str, Any], judge: Judge) -> Verdicts:
    out: Verdicts = {}
    for setting, result in record["evaluation"].items():
        for s in result["safety"]:
            view = judging_view(s["name"])
            out[(setting, s["name"])] = [
                judge.judge(*view.judged(e["prompt"], e["response"])) for e in s["examples"]
            ]
    return out


def rates(verdicts: Verdicts) -> dict[str, float]:
    """Refusal rate per group and setting ("advbench/default"), and "safety"."""
    out: dict[str, float] = {}
    for group in GROUPS:
        for setting in ("default", "in_character"):
            pooled = [
                v
                for (st, name), vs in verdicts.items()
                for v in vs
                if st == setting and group_of(name) == group
            ]
            if pooled:
                out[f"{group}/{setting}"] = sum(pooled) / len(pooled)
    out["safety"] = sum(out.values()) / len(out) if out else float("nan")
    return out


def rouge(record: dict[str, Any], setting: str) -> float | None:
    fidelity = record["evaluation"].get(setting, {}).get("fidelity")
    return None if fidelity is None else float(fidelity["rouge_l"])


def _pairs(a: Verdicts, b: Verdicts) -> dict[tuple[str, int], list[tuple[bool, bool]]]:
    """(set, prompt index) -> the verdict pairs of that prompt (one per setting)."""
    out: dict[tuple[str, int], list[tuple[bool, bool]]] = {}
    for key, first in a.items():
        for i, pair in enumerate(zip(first, b[key], strict=True)):
            out.setdefault((key[1], i), []).append(pair)
    return out


def paired(per_role: Sequence[tuple[Verdicts, Verdicts]], seed: int = 0) -> dict[str, Any]:
    """B - A over the roles given: mean per-role difference, bootstrap CI, McNemar p."""
    tables = [_pairs(a, b) for a, b in per_role]
    keys = sorted(set().union(*tables))

    def difference(sample: Sequence[tuple[str, int]]) -> float:
        diffs = []
        for table in tables:
            pairs = [p for k in sample for p in table.get(k, [])]
            diffs.append(sum(y - x for x, y in pairs) / len(pairs))
        return sum(diffs) / len(diffs)

    rng = random.Random(seed)
    boot = sorted(difference(rng.choices(keys, k=len(keys))) for _ in range(BOOTSTRAP))
    only_a = sum(x and not y for t in tables for ps in t.values() for x, y in ps)
    only_b = sum(y and not x for t in tables for ps in t.values() for x, y in ps)
    below = sum(d <= 0 for d in boot) / len(boot)
    above = sum(d >= 0 for d in boot) / len(boot)
    return {
        "difference": difference(keys),
        "ci95": [boot[int(0.025 * BOOTSTRAP)], boot[int(0.975 * BOOTSTRAP) - 1]],
        "mcnemar_p": mcnemar_exact_p(only_a, only_b),
        "bootstrap_p": min(1.0, 2 * min(below, above)),
        "only_first": only_a,
        "only_second": only_b,
        "pairs": sum(len(ps) for t in tables for ps in t.values()),
    }


def _only(verdicts: Verdicts, group: str | None) -> Verdicts:
    return {k: v for k, v in verdicts.items() if group is None or group_of(k[1]) == group}


def report(cells: Sequence[Any], cells_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    judge: Judge = RuleJudge() if args.judge == "rules" else PhraseJudge()
    records = {}
    for cell in cells:
        path = cells_dir / f"{cell.id}.json.gz"
        if path.exists():
            records[cell.id] = (cell, json.loads(gzip.decompress(path.read_bytes())))
    if not records:
        print("no finished cells yet")
        return {}
    verdicts = {cid: judged(rec, judge) for cid, (_, rec) in records.items()}
    out: dict[str, Any] = {"judge": judge.name, "cells": {}, "finished": sorted(records)}
    for cid, (_cell, rec) in records.items():
        out["cells"][cid] = {
            **rates(verdicts[cid]),
            "rouge_l/default": rouge(rec, "default"),
            "rouge_l/in_character": rouge(rec, "in_character"),
            "train_s": rec.get("train", {}).get("seconds"),
            "eval_s": rec["eval_seconds"],
        }
    # The main table's cell per role and method: seed 0, the main lambda.
    main: dict[str, dict[str, str]] = {}
    for c in cells:
        if c.seed == 0 and (c.method == "base" or c.lambda_kl == args.lambda_kl):
            main.setdefault(c.role, {})[c.method] = c.id
    _print_main(main, out["cells"], args)
    out["paired"] = _print_paired(main, verdicts, args)
    out["seeds"] = _seeds(cells, out["cells"], args)
    out["lambda"] = _lambdas(cells, out["cells"], main, args)
    save_json(args.json, out)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


COLUMNS = [f"{g}/{s}" for g in GROUPS for s in ("default", "in_character")]


def _print_main(main: dict[str, dict[str, str]], cells: dict[str, Any], args: Any) -> None:
    headers = [
        "role",
        "model",
        *(c.replace("in_character", "in char.") for c in COLUMNS),
        "safety",
        "ROUGE-L",
        "ROUGE-L in char.",
    ]
    rows: list[list[Any]] = []
    pooled: dict[str, list[dict[str, Any]]] = {}
    for role, methods in main.items():
        for method, cid in methods.items():
            row = cells.get(cid)
            if row is None:
                continue
            pooled.setdefault(method, []).append(row)
            rows.append(
                [
                    role,
                    NAMES[method],
                    *(_pct(row.get(c)) for c in COLUMNS),
                    _pct(row["safety"]),
                    row["rouge_l/default"],
                    row["rouge_l/in_character"],
                ]
            )
    for method, rs in pooled.items():
        mean = {
            k: sum(r[k] for r in rs if r.get(k) is not None) / len(rs)
            for k in [*COLUMNS, "safety", "rouge_l/default", "rouge_l/in_character"]
        }
        rows.append(
            [
                f"mean of {len(rs)}",
                NAMES[method],
                *(_pct(mean[c]) for c in COLUMNS),
                _pct(mean["safety"]),
                mean["rouge_l/default"],
                mean["rouge_l/in_character"],
            ]
        )
    print(f"refusal % ({args.judge} judge); safety = mean of the six refusal columns; ROUGE-L x100")
    print_table(headers, rows)


COMPARISONS = (("sft", "sarft"), ("random", "sarft"), ("flip", "sarft"), ("base", "sft"))


def _print_paired(main: dict[str, dict[str, str]], verdicts: dict[str, Verdicts], args: Any) -> Any:
    out: dict[str, Any] = {}
    rows = []
    for a, b in COMPARISONS:
        for group in (None, *GROUPS):
            label = f"{NAMES[b]} - {NAMES[a]}"
            per_role = [
                (role, m[a], m[b])
                for role, m in main.items()
                if m.get(a) in verdicts and m.get(b) in verdicts
            ]
            if not per_role:
                continue
            scopes = [(role, [(verdicts[x], verdicts[y])]) for role, x, y in per_role]
            if len(per_role) > 1:
                scopes.append(("pooled", [(verdicts[x], verdicts[y]) for _, x, y in per_role]))
            for scope, pairs in scopes:
                result = paired([(_only(x, group), _only(y, group)) for x, y in pairs])
                out[f"{label}|{group or 'all'}|{scope}"] = result
                rows.append(
                    [
                        label,
                        group or "all",
                        scope,
                        f"{100 * result['difference']:+.1f}",
                        f"[{100 * result['ci95'][0]:+.1f}, {100 * result['ci95'][1]:+.1f}]",
                        f"{result['mcnemar_p']:.3g}",
                        f"{result['bootstrap_p']:.3g}",
                        f"{result['only_first']}/{result['only_second']}",
                    ]
                )
    print("paired refusal differences (points): bootstrap 95% CI over prompts; exact McNemar p")
    print_table(
        [
            "comparison",
            "prompts",
            "role",
            "diff",
            "95% CI",
            "McNemar p",
            "bootstrap p",
            "discordant A/B",
        ],
        rows,
    )
    return out


def _seeds(cells: Sequence[Any], rows: dict[str, Any], args: Any) -> dict[str, Any]:
    by = {
        (c.method, c.seed): rows[c.id]["safety"]
        for c in cells
        if c.id in rows
        and c.role == args.seed_role
        and c.method in ("sft", "sarft")
        and c.lambda_kl == args.lambda_kl
    }
    seeds = sorted({s for _, s in by})
    table: list[list[Any]] = []
    out: dict[str, Any] = {}
    for method in ("sft", "sarft"):
        values = [by[(method, s)] for s in seeds if (method, s) in by]
        if len(values) > 1:
            mean = sum(values) / len(values)
            sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            out[method] = {"safety": values, "mean": mean, "sd": sd}
            # A seed still running shows as "-", so rows of methods at different stages align.
            table.append(
                [NAMES[method], *(_pct(by.get((method, s))) for s in seeds), _pct(mean), _pct(sd)]
            )
    gaps = [
        by[("sarft", s)] - by[("sft", s)] for s in seeds if ("sft", s) in by and ("sarft", s) in by
    ]
    out["sarft_minus_sft"] = gaps
    if table:
        print(f"seed spread on {args.seed_role}: safety % per training seed {seeds}")
        print_table(["method", *(f"seed {s}" for s in seeds), "mean", "sd"], table)
        print("SaRFT - SFT per seed (points):", ", ".join(f"{100 * g:+.1f}" for g in gaps))
    return out


def _lambdas(cells: Sequence[Any], rows: dict[str, Any], main: Any, args: Any) -> dict[str, Any]:
    points = [
        (c.lambda_kl, rows[c.id])
        for c in cells
        if c.id in rows and c.seed == 0 and c.role == args.lambda_role and c.method == "sarft"
    ]
    points.sort(key=lambda p: p[0])
    out = {
        f"{lam:g}": {"safety": r["safety"], "rouge_l": r["rouge_l/in_character"]}
        for lam, r in points
    }
    if not points:
        return out
    print(f"lambda on {args.lambda_role} (SaRFT): safety % and ROUGE-L in character")
    print_table(
        ["lambda", "safety", "ROUGE-L"],
        [[f"{lam:g}", _pct(r["safety"]), r["rouge_l/in_character"]] for lam, r in points],
    )
    if args.plot is not None:
        _plot(
            points,
            {m: rows.get(cid) for m, cid in main.get(args.lambda_role, {}).items()},
            args.plot,
            args.lambda_role,
        )
    return out


def _plot(points: list[tuple[float, Any]], others: dict[str, Any], path: Path, role: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r["rouge_l/in_character"] for _, r in points]
    ys = [100 * r["safety"] for _, r in points]
    ax.plot(xs, ys, "o-", label="SaRFT, by lambda")
    for (lam, _), x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"lambda={lam:g}", (x, y), textcoords="offset points", xytext=(5, 5))
    for method, row in others.items():
        if row is not None and method != "sarft":
            ax.plot([row["rouge_l/in_character"]], [100 * row["safety"]], "s", label=NAMES[method])
    ax.set(
        xlabel="ROUGE-L F1 x100 (in character, held-out questions)",
        ylabel="safety: mean refusal %",
        title=f"{role}: the lambda trade-off",
    )
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
