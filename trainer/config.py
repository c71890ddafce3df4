"""The settings of one fine-tuning run: its hyperparameters (``TrainConfig``, saved as
``train_config.json`` next to its checkpoint) and its evaluation (``EvalConfig``).

The API's request schemas take their defaults from these dataclasses, so each default is
written once, here.

Defaults follow the SaRFT authors' released code (yulinlp/SaRFT, commit 7d123f4) where it has
one: samples encoded with an explicit empty system message, CE per sample over its non-pad
tokens, lambda 0.5, KL(ref || policy) at every non-pad position, effective batch 32, one epoch,
a constant learning rate without warmup, prompt 512 / response 128 tokens, LoRA r=32, alpha=64,
dropout 0 on q_proj and v_proj). The product delivers a LoRA adapter, so LoRA is the
default; its learning rate is 1e-4. For full fine-tuning set ``lora=None`` and use the authors'
2e-5.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Method = Literal["sarft", "sft", "random", "flip"]
KLDirection = Literal["ref_policy", "policy_ref"]
KLPositions = Literal["all", "response"]
Scheduler = Literal["linear", "constant"]
DType = Literal["float32", "bfloat16"]

METHODS = ("sarft", "sft", "random", "flip")
KL_DIRECTIONS = ("ref_policy", "policy_ref")
KL_POSITIONS = ("all", "response")
SCHEDULERS = ("linear", "constant")
DTYPES = ("float32", "bfloat16")
TrainSystemPrompt = Literal["empty", "role", "none"]
TRAIN_SYSTEM_PROMPTS = ("empty", "role", "none")
CENormalization = Literal["sample_tokens", "response_tokens"]
CE_NORMALIZATIONS = ("sample_tokens", "response_tokens")
JudgeKind = Literal["rules", "phrases", "llm"]
JUDGE_KINDS = ("rules", "phrases", "llm")
EvalSetting = Literal["default", "in_character"]
EVAL_SETTINGS: tuple[EvalSetting, ...] = ("default", "in_character")
EvalBackend = Literal["transformers", "vllm"]
EVAL_BACKENDS = ("transformers", "vllm")
EvalDType = Literal["auto", "float32", "bfloat16"]
EVAL_DTYPES = ("auto", "float32", "bfloat16")

LORA_LEARNING_RATE = 1e-4
FULL_FT_LEARNING_RATE = 2e-5  # the authors' rate for full fine-tuning


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (peft LoRA) on the base model; the base weights stay frozen."""

    r: int = 32
    """Rank of the adapter matrices (the authors' default)."""
    alpha: int = 64
    """LoRA scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (the authors' 0)."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the linear layers that get adapters (the authors' default)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError("LoRA r must be >= 1 and alpha > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("LoRA dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the outcome of a run, apart from the data and the base model."""

    method: Method = "sarft"
    """"sarft": CE on every sample plus the KL anchor on the RDS-flagged samples; "sft": CE only
    (no reference forward at all); "random": the KL anchor on a random subset of the same size as
    the flagged one; "flip": the KL anchor on the unflagged samples instead (the paper's two
    controls)."""
    train_system_prompt: TrainSystemPrompt = "empty"
    """The system message training samples are encoded with: "empty", an explicit empty one (the
    authors' collator; it also keeps a template's default system prompt out); "role", the role
    prompt the flags were computed under; "none", no system message (a template's default
    applies). The role prompt always feeds the flags."""
    ce_normalization: CENormalization = "sample_tokens"
    """"sample_tokens": each sample's summed response CE divided by all its non-pad tokens
    (prompt included), then the mean over the batch's samples (the authors' code);
    "response_tokens": the mean over every response token of the batch."""
    lambda_kl: float = 0.5
    """Weight of the KL term: ``loss = CE + lambda_kl * KL`` (0.5 in the authors' example)."""
    kl_direction: KLDirection = "ref_policy"
    """"ref_policy": KL(ref || policy), the authors' code; "policy_ref": KL(policy || ref), the
    paper's notation."""
    kl_positions: KLPositions = "all"
    """"all": every non-pad position, prompt included (the authors' code); "response": only the
    positions that predict response tokens (cheaper: no vocabulary projection over the prompt)."""
    n_epochs: int = 1
    """Passes over the training samples (the authors use 1)."""
    batch_size: int = 32
    """Effective batch: samples per optimizer step (the authors use 32)."""
    micro_batch_size: int = 4
    """Samples per forward/backward; ``batch_size / micro_batch_size`` micro-batches are
    accumulated per optimizer step. Changes memory use, not the result."""
    learning_rate: float = LORA_LEARNING_RATE
    """Peak AdamW learning rate. 1e-4 suits LoRA (the default); use 2e-5 for full fine-tuning,
    as the authors do."""
    lr_scheduler: Scheduler = "constant"
    """"linear": linear warmup over ``warmup_ratio`` of the steps, then linear decay towards 0;
    "constant": the same warmup, then constant (the authors' schedule, with no warmup)."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming up (rounded up to whole steps)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to every trainable parameter."""
    max_grad_norm: float | None = 1.0
    """Gradients are clipped to this global L2 norm before each optimizer step; None: no
    clipping (the norm is still reported)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps even if epochs remain; None runs every epoch."""
    max_prompt_tokens: int = 512
    """Prompt tokens kept per sample, the first ones (the authors' 512)."""
    max_response_tokens: int = 128
    """Response tokens (answer + EOS) kept per assistant turn, the first ones (the authors' 128)."""
    seed: int = 0
    """Seeds adapter initialisation, dropout and the per-epoch shuffle."""
    random_seed: int = 0
    """Seeds the choice of the KL subset of the "random" method (independent of ``seed`` so the
    subset stays fixed while training seeds vary)."""
    dtype: DType = "float32"
    """Compute dtype of the forward passes: "bfloat16" runs them under autocast (weights and
    optimizer state stay in the model's dtype); losses are always computed in float32."""
    fused_loss: bool = True
    """Compute the CE and KL from the final hidden states a chunk of positions at a time
    (:mod:`trainer.fused_loss`), never holding full-vocabulary logits for the whole micro-batch;
    the same loss and gradients as the unfused path up to float rounding. Models whose head is
    not a plain projection (LoRA on ``lm_head``, logit scaling or soft-capping) use the unfused
    path whatever this says."""
    cache_reference: bool = True
    """Run the reference forward over the KL rows once, before the first step, and keep its
    final hidden states (:mod:`trainer.reference_cache`): the step loop then runs no reference
    forward, and full fine-tuning drops its frozen copy but for the head. Host memory: 4 x
    hidden bytes per token of the flagged rows. Applies to one process with the fused loss;
    elsewhere the reference runs in each step, as with False."""
    gradient_checkpointing: bool = False
    """Keep only each decoder block's input in the forward and recompute the block in the
    backward (non-reentrant :func:`torch.utils.checkpoint.checkpoint`, through transformers'
    ``activation_checkpointing_enable``): the same loss and gradients for about one more forward
    of the body per step, and most of the activations off the peak. Off by default, as the
    authors train; on where activations, not weights, bound the batch."""
    optimizer_in_backward: bool = False
    """Run AdamW inside the backward, each parameter updated as soon as its gradient is complete
    and that gradient freed (:class:`trainer.optimizers.AdamWInBackward`): the whole model's
    gradients never exist at once, 4 bytes per trainable parameter off the peak of full
    fine-tuning. The update is AdamW's without clipping, so it needs ``max_grad_norm`` None, one
    backward per step (``micro_batch_size`` equal to ``batch_size``) and one process. Off by
    default: the authors clip to 1.0."""
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    """LoRA settings, or None for full fine-tuning (which keeps a frozen copy of the model as the
    KL reference, doubling weight memory; with LoRA the reference is the same model with the
    adapter disabled)."""

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("kl_direction", self.kl_direction, KL_DIRECTIONS)
        _check_choice("kl_positions", self.kl_positions, KL_POSITIONS)
        _check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_choice("train_system_prompt", self.train_system_prompt, TRAIN_SYSTEM_PROMPTS)
        _check_choice("ce_normalization", self.ce_normalization, CE_NORMALIZATIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.lambda_kl < 0:
            raise ValueError("lambda_kl must be >= 0")
        if self.n_epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("n_epochs, batch_size and micro_batch_size must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0, weight_decay >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0 (or None: no clipping)")
        if self.optimizer_in_backward:
            if self.max_grad_norm is not None:
                raise ValueError(
                    "optimizer_in_backward cannot clip (the global gradient norm is known only "
                    "after the backward has stepped): set max_grad_norm to None"
                )
            if self.micro_batch_size != self.batch_size:
                raise ValueError(
                    "optimizer_in_backward steps in the one backward of a step: set "
                    f"micro_batch_size to batch_size ({self.batch_size})"
                )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1 (or None)")
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise ValueError("max_prompt_tokens and max_response_tokens must be >= 1")

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.lora is not None:
            data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        values = dict(data)
        lora = values.get("lora")
        if isinstance(lora, dict):
            values["lora"] = LoraSettings(**lora)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a training config must be a JSON object")
        return cls.from_dict(data)


def default_learning_rate(lora: bool) -> float:
    """The learning rate a run gets when it names none: LoRA's, or the authors' full-FT rate."""
    return LORA_LEARNING_RATE if lora else FULL_FT_LEARNING_RATE


@dataclass(frozen=True)
class SafetySet:
    """A harmful-prompt set to measure refusal on."""

    name: str
    """Shown in results; names the host's configured set when ``prompts`` is None."""
    prompts: tuple[str, ...] | None = None
    """Inline prompts; None takes the host's set of this name."""


@dataclass(frozen=True)
class JudgeSettings:
    """Who decides whether a response refused."""

    kind: JudgeKind = "rules"
    """"rules": the refusal phrases plus refusals in other words and echoes of the request
    (:class:`trainer.refusal.RuleJudge`, 95% agreement with 382 hand-labelled answers); "phrases":
    the refusal-phrase list alone; "llm": a guard model behind an OpenAI-compatible endpoint
    (``url`` and ``model`` required)."""
    url: str | None = None
    """llm: the endpoint, e.g. http://guard:8000."""
    model: str | None = None
    """llm: the served model name."""

    def __post_init__(self) -> None:
        _check_choice("judge kind", self.kind, JUDGE_KINDS)
        if self.kind == "llm" and not (self.url and self.model):
            raise ValueError("an llm judge needs url and model")


@dataclass(frozen=True)
class EvalConfig:
    """The safety and role-fidelity evaluation run on the base model and on the tuned one."""

    safety_sets: tuple[SafetySet, ...] = ()
    """The harmful-prompt sets, each measured for its refusal rate."""
    max_prompts: int = 100
    """Prompts kept per safety set, the first ones."""
    max_new_tokens: int = 128
    """Generation length per answer (the authors' 128)."""
    batch_size: int = 32
    """Prompts per generation batch: 32 answered 5.3x faster per prompt than 8 did in float32
    on CPU (bfloat16 copy, ``bench/evaluation.py``), and a cancel still lands between batches."""
    validation_fraction: float = 0.1
    """Share of the samples held out of training for ROUGE-L (fixed seed)."""
    max_validation: int = 100
    """Cap on the held-out samples."""
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    """How refusals are judged."""
    settings: tuple[EvalSetting, ...] = EVAL_SETTINGS
    """How the questions are asked: "default", the model's own chat with no system message (the
    authors' evaluation); "in_character", under the role prompt. Each is run on the base model
    and on the tuned one."""
    backend: EvalBackend = "transformers"
    """What generates the answers: "transformers", the training process's own model (the base
    before training, the tuned one after); "vllm", vLLM's offline engine, started once training
    has ended and its model is freed, in which the base and the tuned model are both evaluated
    (a LoRA adapter served beside its base in one engine). It needs vLLM where the run trains
    (README, "vLLM"); greedy answers agree with "transformers" up to bf16 rounding."""
    dtype: EvalDType = "auto"
    """What the transformers backend answers in: "auto" is a bfloat16 copy of a float32 model
    on CPU (README, "Evaluation": its verdicts agree with float32's), else the model's own
    dtype."""

    def __post_init__(self) -> None:
        _check_choice("evaluation backend", self.backend, EVAL_BACKENDS)
        _check_choice("evaluation dtype", self.dtype, EVAL_DTYPES)
        object.__setattr__(self, "settings", tuple(self.settings))
        if not self.settings or len(set(self.settings)) != len(self.settings):
            raise ValueError("settings must name at least one setting, each once")
        for setting in self.settings:
            _check_choice("evaluation setting", setting, EVAL_SETTINGS)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")
        if min(self.max_prompts, self.max_new_tokens, self.batch_size) < 1:
            raise ValueError("max_prompts, max_new_tokens and batch_size must be >= 1")
        if self.max_validation < 0:
            raise ValueError("max_validation must be >= 0")
        names = [s.name for s in self.safety_sets]
        if len(set(names)) != len(names):
            raise ValueError("safety set names must be unique")

    def to_dict(self) -> dict[str, Any]:
        """JSON as stored with a job: a set without inline prompts has no ``prompts`` key."""
        data = asdict(self)
        data["settings"] = list(self.settings)
        data["safety_sets"] = [
            {"name": s.name} if s.prompts is None else {"name": s.name, "prompts": list(s.prompts)}
            for s in self.safety_sets
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        values = dict(data)
        values["safety_sets"] = tuple(
            SafetySet(s["name"], None if s.get("prompts") is None else tuple(s["prompts"]))
            for s in values.get("safety_sets", ())
        )
        values["judge"] = JudgeSettings(**values.get("judge", {}))
        # Jobs stored before there were settings evaluated in character only.
        values["settings"] = tuple(values.get("settings", ("in_character",)))
        return cls(**values)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
