"""``sarft train``: submit a fine-tuning job to a sarft API and follow it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sarft.checks import fail, readable_file
from sarft.client_cli import ApiKey, ApiUrl, api_client, console, echo_json, follow


def _prompt_file(path: Path) -> dict[str, Any]:
    """An inline safety set from a file: JSONL of {"prompt"} or one prompt per line."""
    readable_file(path, "eval file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read eval file {path}: {exc}")
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                fail(f'eval file {path}, line {number}: expected {{"prompt": ...}}')
            prompts.append(str(prompt))
        else:
            prompts.append(line.strip())
    if not prompts:
        fail(f"eval file {path} holds no prompts")
    return {"name": path.stem, "prompts": prompts}


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """The options that were set; the server applies its defaults to the rest."""
    return {k: v for k, v in options.items() if v is not None}


def _hyperparameters(
    epochs: int | None,
    batch_size: int | None,
    micro_batch_size: int | None,
    learning_rate: float | None,
    lambda_kl: float | None,
    max_steps: int | None,
    dtype: str | None,
    protocol: dict[str, str | None],
) -> dict[str, Any]:
    """The training hyperparameters that were set, under the API's names."""
    return _given(
        {
            "n_epochs": epochs,
            "batch_size": batch_size,
            "micro_batch_size": micro_batch_size,
            "learning_rate": learning_rate,
            "lambda": lambda_kl,
            "max_steps": max_steps,
            "dtype": dtype,
            **protocol,
        }
    )


def _lora_hyperparameter(
    full: bool, r: int | None, alpha: int | None, target_modules: str | None
) -> dict[str, Any]:
    """``{"lora": None}`` for full fine-tuning, the LoRA options set, or ``{}`` for the default."""
    lora = _given(
        {
            "r": r,
            "alpha": alpha,
            "target_modules": target_modules.split(",") if target_modules else None,
        }
    )
    if full and lora:
        raise typer.BadParameter("--full takes no LoRA options")
    if full:
        return {"lora": None}
    return {"lora": lora} if lora else {}


def _evaluation(
    no_eval: bool,
    eval_set: list[str] | None,
    eval_file: list[Path] | None,
    max_prompts: int | None,
    max_new_tokens: int | None,
    backend: str | None = None,
) -> dict[str, Any] | None:
    """The evaluation request: None with --no-eval, else the sets and limits that were set."""
    given = (eval_set, eval_file, max_prompts, max_new_tokens, backend)
    if no_eval and any(g is not None for g in given):
        raise typer.BadParameter("--no-eval takes no evaluation options")
    if no_eval:
        return None
    sets = [{"name": n} for n in eval_set or []] + [_prompt_file(p) for p in eval_file or []]
    return _given(
        {
            "safety_sets": sets or None,
            "max_prompts": max_prompts,
            "max_new_tokens": max_new_tokens,
            "backend": backend,
        }
    )


SystemPrompt = Annotated[
    str | None,
    typer.Option(
        "--system-prompt",
        help="Training encoding: empty (the authors') | role | none (the template's default).",
    ),
]
CENorm = Annotated[
    str | None,
    typer.Option(
        "--ce-normalization",
        help="sample_tokens (the authors': per sample over its tokens) | response_tokens.",
    ),
]
TargetModules = Annotated[
    str | None, typer.Option("--target-modules", help="Comma-separated, e.g. q_proj,v_proj.")
]
EvalSets = Annotated[
    list[str] | None,
    typer.Option("--eval-set", help="A safety set the server has (repeatable)."),
]
EvalFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--eval-file",
        help="Harmful prompts sent inline: JSONL of {prompt} or one per line (repeatable).",
    ),
]


def submit_fine_tuning(
    dataset_id: Annotated[str, typer.Argument(help="The dataset to fine-tune on.")],
    scoring_job: Annotated[
        str, typer.Option("--scoring-job", help="A succeeded scoring job of that dataset.")
    ],
    method: Annotated[str, typer.Option("--method", help="sarft | sft | random | flip")] = "sarft",
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
    target_modules: TargetModules = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 | bfloat16")] = None,
    system_prompt: SystemPrompt = None,
    ce_normalization: CENorm = None,
    eval_set: EvalSets = None,
    eval_file: EvalFiles = None,
    max_prompts: Annotated[int | None, typer.Option("--max-prompts", min=1)] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip evaluation.")] = False,
    eval_backend: Annotated[
        str | None,
        typer.Option(
            "--eval-backend",
            help="transformers | vllm (the training worker needs vLLM: README, vLLM).",
        ),
    ] = None,
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
    protocol = {"train_system_prompt": system_prompt, "ce_normalization": ce_normalization}
    hyper = _hyperparameters(
        epochs, batch_size, micro_batch_size, learning_rate, lambda_kl, max_steps, dtype, protocol
    )
    hyper.update(_lora_hyperparameter(full, lora_r, lora_alpha, target_modules))
    evaluation = _evaluation(
        no_eval, eval_set, eval_file, max_prompts, max_new_tokens, eval_backend
    )
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
