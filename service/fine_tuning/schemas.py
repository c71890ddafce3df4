"""Request and response bodies of the fine-tuning API.

Every default is read from the trainer's dataclasses (:class:`trainer.config.TrainConfig`,
:class:`~trainer.config.LoraSettings`, :class:`~trainer.config.EvalConfig`,
:class:`~trainer.config.JudgeSettings`): the SaRFT authors' choices, written once.

The bodies are strict (``true`` is no number, ``"7"`` no integer), and their integers are
:data:`~service.core.json_types.JSONInt`: ``100.0`` is the integer 100, as in JSON Schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.json_types import JSONInt, JSONIntOrNone
from service.roles.schemas import NOT_BLANK
from trainer.config import (
    EVAL_SETTINGS,
    FULL_FT_LEARNING_RATE,
    LORA_LEARNING_RATE,
    CENormalization,
    DType,
    EvalBackend,
    EvalConfig,
    EvalDType,
    EvalSetting,
    JudgeKind,
    JudgeSettings,
    KLDirection,
    KLPositions,
    LoraSettings,
    Method,
    Scheduler,
    TrainConfig,
    TrainSystemPrompt,
)
from trainer.run_spec import Phase

_SCORING_TRUNCATION = "the scoring job's (its flags were computed on that encoding)."
_TRAIN, _LORA, _EVAL, _JUDGE = TrainConfig(), LoraSettings(), EvalConfig(), JudgeSettings()


class LoraIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    r: JSONInt = Field(default=_LORA.r, ge=1, le=1024, description="Adapter rank.")
    alpha: JSONInt = Field(
        default=_LORA.alpha, ge=1, le=4096, description="Scaling numerator (alpha / r)."
    )
    dropout: float = Field(default=_LORA.dropout, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: list(_LORA.target_modules), min_length=1, max_length=64
    )


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    n_epochs: JSONInt = Field(default=_TRAIN.n_epochs, ge=1, le=100)
    batch_size: JSONInt = Field(
        default=_TRAIN.batch_size, ge=1, le=4096, description="Samples per optimizer step."
    )
    micro_batch_size: JSONIntOrNone = Field(
        default=None,
        ge=1,
        le=4096,
        description=f"Samples per forward; default min({_TRAIN.micro_batch_size}, batch).",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=f"Default: {LORA_LEARNING_RATE:g} with LoRA, {FULL_FT_LEARNING_RATE:g} full "
        "fine-tuning.",
    )
    lambda_kl: float = Field(
        default=_TRAIN.lambda_kl,
        ge=0,
        le=1000,
        alias="lambda",
        description="Weight of the KL term.",
    )
    max_steps: JSONIntOrNone = Field(
        default=_TRAIN.max_steps, ge=1, description="Cap on optimizer steps."
    )
    kl_direction: KLDirection = _TRAIN.kl_direction
    kl_positions: KLPositions = _TRAIN.kl_positions
    lr_scheduler: Scheduler = _TRAIN.lr_scheduler
    warmup_ratio: float = Field(default=_TRAIN.warmup_ratio, ge=0, lt=1)
    weight_decay: float = Field(default=_TRAIN.weight_decay, ge=0)
    max_grad_norm: float | None = Field(
        default=_TRAIN.max_grad_norm,
        gt=0,
        description="Clip the gradients to this global L2 norm; null: no clipping.",
    )
    max_prompt_tokens: JSONIntOrNone = Field(
        default=None, ge=1, le=32768, description=f"Default and only value: {_SCORING_TRUNCATION}"
    )
    max_response_tokens: JSONIntOrNone = Field(
        default=None, ge=1, le=32768, description=f"Default and only value: {_SCORING_TRUNCATION}"
    )
    train_system_prompt: TrainSystemPrompt = Field(
        default=_TRAIN.train_system_prompt,
        description="The system message training samples are encoded with: empty (the "
        "authors'), role (the role prompt) or none (the template's default).",
    )
    ce_normalization: CENormalization = Field(
        default=_TRAIN.ce_normalization,
        description="sample_tokens: each sample's response CE over its non-pad tokens, then the "
        "batch mean (the authors'); response_tokens: the mean over response tokens.",
    )
    seed: JSONInt = _TRAIN.seed
    dtype: DType = _TRAIN.dtype
    gradient_checkpointing: bool = Field(
        default=_TRAIN.gradient_checkpointing,
        description="Recompute each decoder block in the backward instead of keeping its "
        "activations: the same result, less memory, about one more forward per step.",
    )
    optimizer_in_backward: bool = Field(
        default=_TRAIN.optimizer_in_backward,
        description="Update each parameter in the backward as soon as its gradient is "
        "complete, and free it: less memory for full fine-tuning. Needs max_grad_norm null and "
        "one micro-batch per step (micro_batch_size, by default, the batch).",
    )
    lora: LoraIn | None = Field(
        default_factory=LoraIn, description="LoRA settings; null for full fine-tuning."
    )


class SafetySetIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    prompts: list[Annotated[str, Field(pattern=NOT_BLANK)]] | None = Field(
        default=None,
        min_length=1,
        max_length=10_000,
        description="Inline harmful prompts; omit to use the server's set of this name.",
    )


def _llm_needs_endpoint_schema(schema: dict[str, Any]) -> None:
    # The validator's rule, in the schema: an llm judge names its endpoint and model.
    schema["if"] = {"properties": {"kind": {"const": "llm"}}, "required": ["kind"]}
    schema["then"] = {
        "required": ["url", "model"],
        "properties": {
            "url": {"type": "string", "minLength": 1},
            "model": {"type": "string", "minLength": 1},
        },
    }


class JudgeIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra=_llm_needs_endpoint_schema
    )

    kind: JudgeKind = Field(
        default=_JUDGE.kind,
        description="rules: refusal phrases, refusals in other words and echoes (default); "
        "phrases: the refusal-phrase list alone; llm: an OpenAI-compatible guard model.",
    )
    url: str | None = Field(
        default=_JUDGE.url, description="llm: the endpoint, e.g. http://guard:8000"
    )
    model: str | None = Field(default=_JUDGE.model, description="llm: the served model name.")

    @model_validator(mode="after")
    def _llm_needs_endpoint(self) -> JudgeIn:
        if self.kind == "llm" and not (self.url and self.model):
            raise ValueError("an llm judge needs url and model")
        return self


class EvaluationIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    safety_sets: list[SafetySetIn] | None = Field(
        default=None, max_length=16, description="Default: the server's default sets."
    )
    max_prompts: JSONInt = Field(
        default=_EVAL.max_prompts, ge=1, le=10_000, description="Per safety set."
    )
    max_new_tokens: JSONInt = Field(default=_EVAL.max_new_tokens, ge=1, le=4096)
    batch_size: JSONInt = Field(
        default=_EVAL.batch_size, ge=1, le=512, description="Prompts per generation batch."
    )
    validation_fraction: float = Field(
        default=_EVAL.validation_fraction,
        ge=0,
        lt=1,
        description="Held out of training for ROUGE-L (fixed seed).",
    )
    max_validation: JSONInt = Field(default=_EVAL.max_validation, ge=0, le=10_000)
    judge: JudgeIn = Field(default_factory=JudgeIn)
    settings: list[EvalSetting] = Field(
        default_factory=lambda: list(_EVAL.settings),
        min_length=1,
        max_length=len(EVAL_SETTINGS),
        description="default: the model's own chat with no system message (the authors'); "
        "in_character: under the role prompt. Each is run before and after training.",
    )
    backend: EvalBackend = Field(
        default=_EVAL.backend,
        description="transformers: the training process's model generates the answers; vllm: "
        "vLLM's engine, after training, for the base and the tuned model (the training worker "
        "needs vLLM installed, or the job fails saying what is missing).",
    )
    dtype: EvalDType = Field(
        default=_EVAL.dtype,
        description="transformers backend: auto answers with a bfloat16 copy of a float32 model "
        "on CPU (about 2x faster, same verdicts measured), else in the model's dtype.",
    )


MetadataKey = Annotated[str, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset_id: str
    scoring_job_id: str = Field(description="A succeeded scoring job of the same dataset.")
    validation_dataset_id: str | None = Field(
        default=None,
        description="A dataset of the same role to validate on (loss, CE and KL at each "
        "checkpoint; ROUGE-L when evaluating); it needs a succeeded scoring job with the same "
        "model, whose flags its KL uses. Default: a held-out fraction of the training dataset "
        "when evaluating, else no validation.",
    )
    method: Method = _TRAIN.method
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: EvaluationIn | None = Field(
        default_factory=EvaluationIn, description="null skips evaluation."
    )
    seed: JSONIntOrNone = Field(
        default=None,
        ge=0,
        le=2**31 - 1,
        description="Seeds the adapter's initialisation, dropout and the data order (the same "
        "as hyperparameters.seed, which it must not contradict).",
    )
    suffix: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Part of fine_tuned_model's name: ft:<base>:<suffix>:<job id>.",
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        default=None, max_length=16, description="Up to 16 key-value pairs of your own."
    )


class FineTuningProgress(BaseModel):
    phase: str = Field(description=", ".join(Phase))
    step: int
    total_steps: int | None


class JobError(BaseModel):
    code: str = Field(
        description="invalid_inputs, training_error, worker_lost (after every attempt), "
        "internal_error."
    )
    message: str
    param: str | None = None


class FineTuningJobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    dataset_id: str
    scoring_job_id: str
    validation_dataset_id: str | None = None
    validation_scoring_job_id: str | None = None
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"] = (
        Field(description="validating_files: a worker is checking the job's rows.")
    )
    fine_tuned_model: str | None = Field(
        default=None, description="Once succeeded: ft:<base>:<suffix>:<job id>."
    )
    trained_tokens: int = Field(
        default=0, description="Tokens in the optimizer steps taken (prompt and response)."
    )
    estimated_finish: int | None = Field(
        default=None, description="While training: when training should end (unix seconds)."
    )
    seed: int
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    model: str | None
    method: str
    hyperparameters: dict[str, Any]
    evaluation: dict[str, Any] | None
    progress: FineTuningProgress
    started_at: int | None
    finished_at: int | None
    error: JobError | None
    result: dict[str, Any] | None
    curation: dict[str, Any] | None = Field(
        default=None,
        description="The effective flags it trains on, fixed at creation: counts (rds_flagged, "
        "flagged, reviewed, decided_flag, decided_keep) and the reviewers' overrules of RDS's "
        "flags as sample indices (to_flag, to_keep); validation: the same for a separate "
        "validation set's scoring job.",
    )
