"""``sarft train``: submit a fine-tuning job to a sarft API and follow it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sarft.client_cli import ApiKey, ApiUrl, api_client, console, echo_json, follow


def _prompt_file(path: Path) -> dict[str, Any]:
    """An inline safety set from a file: JSONL of {"prompt"} or one prompt per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from exc
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as exc:
                raise typer.BadParameter(f'{path}:{number}: expected {{"prompt": ...}}') from exc
            prompts.append(str(prompt))
        else:
            prompts.append(line.strip())
    if not prompts:
        raise typer.BadParameter(f"{path}: no prompts")
    return {"name": path.stem, "prompts": prompts}


def train(
    dataset_id: Annotated[str, typer.Argument(help="The dataset to fine-tune on.")],
    scoring_job: Annotated[
        str, typer.Option("--scoring-job", help="A succeeded scoring job of that dataset.")
    ],
    method: Annotated[str, typer.Option("--method", help="sarft | sft | random")] = "sarft",
    epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Samples per optimizer step.")
    ] = None,
    micro_batch_size: Annotated[int | None, typer.Option("--micro-batch-size", min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    lambda_kl: Annotated[
        float | None, typer.Option("--lambda", help="Weight of the KL term (default 0.5).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1)] = None,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")] = False,
    lora_r: Annotated[int | None, typer.Option("--lora-r", min=1)] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", min=1)] = None,
    target_modules: Annotated[
        str | None, typer.Option("--target-modules", help="Comma-separated, e.g. q_proj,v_proj.")
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 | bfloat16")] = None,
    eval_set: Annotated[
        list[str] | None,
        typer.Option("--eval-set", help="A safety set the server has (repeatable)."),
    ] = None,
    eval_file: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval-file",
            help="Harmful prompts sent inline: JSONL of {prompt} or one per line (repeatable).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    max_prompts: Annotated[int | None, typer.Option("--max-prompts", min=1)] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip evaluation.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the job with a progress bar.")
    ] = True,
    poll: Annotated[float, typer.Option("--poll", min=0.1)] = 2.0,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Fine-tune on a scored dataset with the SaRFT loss; follow it until it finishes.

    Prints the final job (with the evaluation before and after) and exits 0 if it succeeded.
    """
    hyper: dict[str, Any] = {
        k: v
        for k, v in {
            "n_epochs": epochs,
            "batch_size": batch_size,
            "micro_batch_size": micro_batch_size,
            "learning_rate": learning_rate,
            "lambda": lambda_kl,
            "max_steps": max_steps,
            "dtype": dtype,
        }.items()
        if v is not None
    }
    lora = {
        k: v
        for k, v in {
            "r": lora_r,
            "alpha": lora_alpha,
            "target_modules": target_modules.split(",") if target_modules else None,
        }.items()
        if v is not None
    }
    if full and lora:
        raise typer.BadParameter("--full takes no LoRA options")
    if full:
        hyper["lora"] = None
    elif lora:
        hyper["lora"] = lora
    evaluation: dict[str, Any] | None = None
    given = (eval_set, eval_file, max_prompts, max_new_tokens)
    if no_eval and any(g is not None for g in given):
        raise typer.BadParameter("--no-eval takes no evaluation options")
    if not no_eval:
        sets = [{"name": n} for n in eval_set or []] + [_prompt_file(p) for p in eval_file or []]
        evaluation = {
            k: v
            for k, v in {
                "safety_sets": sets or None,
                "max_prompts": max_prompts,
                "max_new_tokens": max_new_tokens,
            }.items()
            if v is not None
        }
    with api_client(api_url, api_key) as client:
        job = client.create_fine_tuning_job(
            dataset_id,
            scoring_job,
            method=method,
            hyperparameters=hyper,
            evaluation=evaluation,
            skip_evaluation=no_eval,
        )
        if not wait:
            echo_json(job)
            return
        console.print(f"fine-tuning job {job['id']} created")
        follow(client, job["id"], poll)
