"""Request and response bodies of the fine-tuning API.

Hyperparameter defaults are those of :class:`trainer.config.TrainConfig` (the SaRFT authors'
choices); the learning rate defaults to 1e-4 with LoRA and 2e-5 for full fine-tuning.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LoraIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=32, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=64, ge=1, le=4096, description="Scaling numerator (alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=64
    )


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    n_epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, le=4096, description="Samples per optimizer step.")
    micro_batch_size: int | None = Field(
        default=None, ge=1, le=4096, description="Samples per forward; default min(4, batch)."
    )
    learning_rate: float | None = Field(
        default=None, gt=0, le=1, description="Default: 1e-4 with LoRA, 2e-5 full fine-tuning."
    )
    lambda_kl: float = Field(
        default=0.5, ge=0, le=1000, alias="lambda", description="Weight of the KL term."
    )
    max_steps: int | None = Field(default=None, ge=1, description="Cap on optimizer steps.")
    kl_direction: Literal["ref_policy", "policy_ref"] = "ref_policy"
    kl_positions: Literal["all", "response"] = "all"
    lr_scheduler: Literal["linear", "constant"] = "linear"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_prompt_tokens: int = Field(default=512, ge=1, le=32768)
    max_response_tokens: int = Field(default=128, ge=1, le=32768)
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoraIn | None = Field(
        default_factory=LoraIn, description="LoRA settings; null for full fine-tuning."
    )


class SafetySetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    prompts: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=10_000,
        description="Inline harmful prompts; omit to use the server's set of this name.",
    )

    @model_validator(mode="after")
    def _no_blank_prompts(self) -> SafetySetIn:
        if self.prompts is not None and any(not p.strip() for p in self.prompts):
            raise ValueError("prompts must not be empty strings")
        return self


class JudgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["phrases", "llm"] = Field(
        default="phrases", description="Refusal-phrase matcher, or an OpenAI-compatible guard."
    )
    url: str | None = Field(default=None, description="llm: the endpoint, e.g. http://guard:8000")
    model: str | None = Field(default=None, description="llm: the served model name.")

    @model_validator(mode="after")
    def _llm_needs_endpoint(self) -> JudgeIn:
        if self.kind == "llm" and not (self.url and self.model):
            raise ValueError("an llm judge needs url and model")
        return self


class EvaluationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    safety_sets: list[SafetySetIn] | None = Field(
        default=None, max_length=16, description="Default: the server's default sets."
    )
    max_prompts: int = Field(default=100, ge=1, le=10_000, description="Per safety set.")
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    batch_size: int = Field(default=8, ge=1, le=512, description="Prompts per generation batch.")
    validation_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Held out of training for ROUGE-L (fixed seed)."
    )
    max_validation: int = Field(default=100, ge=0, le=10_000)
    judge: JudgeIn = Field(default_factory=JudgeIn)


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str
    scoring_job_id: str = Field(description="A succeeded scoring job of the same dataset.")
    method: Literal["sarft", "sft", "random"] = "sarft"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: EvaluationIn | None = Field(
        default_factory=EvaluationIn, description="null skips evaluation."
    )


class FineTuningProgress(BaseModel):
    phase: str = Field(
        description="queued, loading, evaluating_base, training, evaluating_tuned, reporting, done"
    )
    step: int
    total_steps: int | None


class FineTuningJobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    dataset_id: str
    scoring_job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str | None
    method: str
    hyperparameters: dict[str, Any]
    evaluation: dict[str, Any] | None
    progress: FineTuningProgress
    started_at: int | None
    finished_at: int | None
    error: str | None
    result: dict[str, Any] | None
