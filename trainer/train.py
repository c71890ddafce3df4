"""Fine-tune a causal LM with the RBO loss: setup, then one explicit loop over optimizer steps.

``sarft``, ``sft`` and ``random`` share this code path; they differ only in which samples carry
a KL flag (:func:`trainer.data.select_kl_subset`). The reference forward runs only for
micro-batches that have a flagged row and only when ``lambda_kl > 0``, so ``sft`` costs exactly
one forward and one backward per micro-batch.

Vocabulary projection: the loss needs next-token distributions at the response positions (CE)
and, for flagged rows with ``kl_positions="all"``, at every position. When the micro-batch needs
no full-sequence KL, both forwards pass ``logits_to_keep`` so that the LM head only runs from the
first position that predicts a response token onwards; the prompt (most of a role-play sequence)
is never projected onto the vocabulary.
"""

from __future__ import annotations

import copy
import functools
import gc
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.optim.lr_scheduler import LambdaLR

from trainer import checkpoints
from trainer.checkpoints import Checkpoint, CheckpointPolicy
from trainer.config import TrainConfig
from trainer.data import (
    Batch,
    TrainExample,
    collate,
    encode_examples,
    pad_token_id,
    plan_steps,
    select_kl_subset,
    step_batches,
)
from trainer.forward import ForwardPlan, forward_plan, outputs, sparse_tied_embedding_gradient
from trainer.fused_loss import fused_sarft_loss
from trainer.loss import IGNORE_INDEX, LossParts, sarft_loss
from trainer.optimizers import AdamWInBackward, build_adamw
from trainer.ranks import Ranks
from trainer.reference_cache import CachedReference
from worker.formats import Sample
from worker.prompts import RolePrompts

StepMetrics = dict[str, float]
ReferenceLogits = Callable[[Batch, int, bool], torch.Tensor]
"""The reference's ``outputs(batch, keep, hidden)`` (see :func:`trainer.forward.outputs`)."""
OnCheckpoint = Callable[[Checkpoint, list[Checkpoint]], None]
"""Called with each checkpoint written and the older ones that were deleted."""


@dataclass
class TrainResult:
    model: Any  # the trained model in eval mode (a PeftModel with LoRA)
    steps: int  # optimizer steps taken
    total_steps: int  # optimizer steps planned
    stopped: bool  # should_stop ended the run early; nothing was saved
    num_kl_samples: int  # samples the KL term applied to
    final: StepMetrics  # the last step's metrics (empty when no step ran)
    history: list[StepMetrics] = field(default_factory=list)  # as in metrics.jsonl
    resumed_from: int | None = None  # the checkpoint's step a resumed run started after
    config_path: Path | None = None
    metrics_path: Path | None = None
    adapter_dir: Path | None = None  # LoRA runs
    model_dir: Path | None = None  # full fine-tuning runs: model and tokenizer


def frozen_copy(model: Any) -> Any:
    """A deep copy in eval mode with no gradients: the KL reference of full fine-tuning."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def lr_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def enable_checkpointing(model: Any) -> None:
    """Recompute each decoder block in the backward instead of keeping its activations.

    Non-reentrant, so neither LoRA (whose frozen embedding output needs no gradient) nor the
    no-grad reference forward needs anything more: the reference runs in eval mode, where
    transformers does not checkpoint, and a frozen copy made after this inherits the setting
    harmlessly. RNG state is replayed in the recomputation, so dropout masks match.
    transformers checkpoints each block's ``forward``, so module hooks run once."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    model.activation_checkpointing_enable({"use_reentrant": False})


def _prepare(
    model: Any, config: TrainConfig, base_model_name: str | None, world: int = 1
) -> tuple[Any, ReferenceLogits, Any | None]:
    """The policy to train, a function returning the reference's outputs (under no_grad), and
    the model whose head projects them (None when there is no KL term); ``world`` processes
    will train it."""
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.lora is None:
        if world == 1:
            sparse_tied_embedding_gradient(model)
        if config.method == "sft" or config.lambda_kl == 0:
            # No KL term, so no reference forward: a frozen copy would only take memory.
            def no_reference(batch: Batch, keep: int, hidden: bool) -> torch.Tensor:
                raise AssertionError("a run without a KL term asked for reference logits")

            return model, no_reference, None
        reference = frozen_copy(model)

        def full_reference(batch: Batch, keep: int, hidden: bool) -> torch.Tensor:
            with torch.no_grad():
                return outputs(reference, batch, keep, hidden)

        return model, full_reference, reference

    lora = config.lora
    policy = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    if base_model_name is not None:
        policy.peft_config["default"].base_model_name_or_path = base_model_name

    def adapter_disabled_reference(batch: Batch, keep: int, hidden: bool) -> torch.Tensor:
        # The base model in eval mode (as the authors' frozen reference), without a second copy.
        # The policy's mode is restored: validation calls this with the policy in eval mode.
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), policy.disable_adapter():
                return outputs(policy, batch, keep, hidden)
        finally:
            policy.train(was_training)

    return policy, adapter_disabled_reference, policy


def cached_reference(
    reference: ReferenceLogits,
    reference_model: Any | None,
    policy: Any,
    examples: Sequence[TrainExample],
    pad_id: int,
    config: TrainConfig,
    plan: ForwardPlan,
    world: int = 1,
) -> tuple[ReferenceLogits, Any | None]:
    """The reference function and model the step loop should use: with
    ``config.cache_reference`` and a KL term over some of ``examples``, one process and the fused
    loss, a :class:`CachedReference` of their flagged rows and (full fine-tuning, whose frozen
    copy is then only needed for the head ``plan.ref_head`` holds) no reference model; otherwise
    the live ones, unchanged."""
    wanted = config.cache_reference and config.lambda_kl > 0 and plan.fused and world == 1
    if not (wanted and any(e.kl_flag for e in examples)):
        return reference, reference_model
    lora = reference_model is policy
    cache = CachedReference.build(
        reference,
        examples,
        pad_id,
        next(policy.parameters()).device,
        config.micro_batch_size,
        torch.bfloat16 if config.dtype == "bfloat16" else None,
        # LoRA's live reference is the policy itself, so it costs nothing to keep as a fallback.
        fallback=reference if lora else None,
    )
    return cache, reference_model if lora else None


def _first_kept_position(batch: Batch, needs_all_positions: bool, can_slice: bool) -> int:
    """The first position whose logits the loss reads."""
    if needs_all_positions or not can_slice:
        return 0
    is_label = batch.labels != IGNORE_INDEX
    first_label = torch.where(is_label.any(1), is_label.int().argmax(1), batch.labels.shape[1])
    return max(int(first_label.min()) - 1, 0)


def _micro_batch_loss(
    policy: Any,
    reference: ReferenceLogits,
    batch: Batch,
    config: TrainConfig,
    plan: ForwardPlan,
    step_tokens: int,
    step_rows: int,
    pair_reference: bool = False,
) -> LossParts:
    """The micro-batch's loss parts. ``pair_reference``: another process runs the reference
    forward at this micro-batch, so this one runs it too even without a KL row (its output
    unused), as the collectives of a ZeRO-3 reference must pair up."""
    needs_kl = config.lambda_kl > 0 and bool(batch.kl_flags.any())
    start = _first_kept_position(batch, needs_kl and config.kl_positions == "all", plan.can_slice)
    keep = batch.input_ids.shape[1] - start
    device_type = batch.input_ids.device.type
    settings = {
        "lam": config.lambda_kl,
        "direction": config.kl_direction,
        "positions": config.kl_positions,
        "num_response_tokens": step_tokens,
        "num_rows": step_rows,
        # Each row's non-pad tokens, counted over the whole row even when logits are sliced.
        "sample_tokens": (
            batch.attention_mask.sum(1) if config.ce_normalization == "sample_tokens" else None
        ),
    }
    labels, attention = batch.labels[:, start:], batch.attention_mask[:, start:]
    with torch.autocast(device_type, torch.bfloat16, enabled=config.dtype == "bfloat16"):
        policy_out = outputs(policy, batch, keep, plan.fused)
        ref_out = None
        if needs_kl:
            # Only the KL rows need the reference: an unflagged row's reference forward (and
            # its logits over the whole vocabulary) would be computed for nothing.
            flagged = batch.kl_flags.bool()
            ref_batch = batch if bool(flagged.all()) else batch.rows(flagged.nonzero()[:, 0])
            ref_out = reference(ref_batch, keep, plan.fused)
        elif pair_reference:
            # One row is enough to take part in the all-gathers; the loss has no KL term here.
            reference(batch.rows(torch.arange(1, device=batch.input_ids.device)), keep, plan.fused)
        if plan.head is not None:
            # Inside autocast: the fused head runs in its dtype, as the model's own would.
            return fused_sarft_loss(
                policy_out,
                plan.head,
                ref_out,
                plan.ref_head,
                labels,
                attention,
                batch.kl_flags,
                chunk_rows=plan.chunk_rows,
                **settings,  # type: ignore[arg-type]
            )
    return sarft_loss(
        policy_out,
        ref_out,
        labels,
        attention,
        batch.kl_flags,
        **settings,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class MicroBatchPlan:
    """A process's micro-batches of one step, and at which of them it runs the reference
    forward only to pair with another process's."""

    chunks: list[Sequence[TrainExample] | None]
    """Its micro-batches; None: a zero-weight one that only joins the collectives."""
    pair_reference: list[bool]


def plan_micro_batches(
    examples: Sequence[TrainExample],
    size: int,
    world: int,
    rank: int,
    *,
    lockstep: bool,
    pair_kl: bool,
) -> MicroBatchPlan:
    """Process ``rank``'s share of the step's (sorted) ``examples``: every ``world``-th
    micro-batch. In ``lockstep`` (:attr:`Ranks.lockstep`) every process runs the same number
    of them (padded with zero-weight ones) and, with ``pair_kl`` (a KL term whose reference
    goes through the sharded policy), runs the reference at micro-batch j when any process's
    j needs it. Each process works this out from the same examples: no communication."""
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
    shares: list[list[Sequence[TrainExample] | None]] = [
        list(chunks[r::world]) for r in range(world)
    ]
    count = max(1, math.ceil(len(chunks) / world)) if lockstep else 0
    for share in shares:
        # A process without a micro-batch (or, in lockstep, with fewer) still joins the sync.
        share.extend([None] * max(count - len(share), 0 if share else 1))
    mine = shares[rank]
    if not (lockstep and pair_kl):
        return MicroBatchPlan(mine, [False] * len(mine))

    def needs_kl(chunk: Sequence[TrainExample] | None) -> bool:
        # As the micro-batch is collated: a zero-weight one runs the step's first example.
        return any(e.kl_flag for e in (chunk or examples[:1]))

    pair = [any(needs_kl(share[j]) for share in shares) for j in range(len(mine))]
    return MicroBatchPlan(mine, pair)


def _optimizer_step(
    policy: Any,
    reference: ReferenceLogits,
    examples: Sequence[TrainExample],
    pad_id: int,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    plan: ForwardPlan,
    ranks: Ranks | None = None,
    pair_references: bool = False,
) -> StepMetrics:
    """One optimizer step; across several processes each takes every ``world``-th
    micro-batch of the step and DDP sums their gradients in one all-reduce (see
    :func:`plan_micro_batches` for ``pair_references``)."""
    ranks = ranks or Ranks()
    started = time.perf_counter()
    device = next(policy.parameters()).device
    lr = float(scheduler.get_last_lr()[0])
    # Losses are normalised by the whole step's counts, so the micro-batches add up to the
    # effective batch's mean whatever micro_batch_size is (and whichever process runs them).
    step_tokens = sum(e.num_response_tokens for e in examples)
    # KL rows first, so micro-batches are (nearly) all KL or all not: a micro-batch without a
    # KL row needs neither the reference forward nor logits over the prompt. The step's
    # gradient is a sum over its micro-batches, so their make-up does not change it.
    examples = sorted(examples, key=lambda e: not e.kl_flag)
    mine = plan_micro_batches(
        examples,
        config.micro_batch_size,
        ranks.world,
        ranks.rank,
        lockstep=ranks.lockstep,
        pair_kl=pair_references and config.lambda_kl > 0,
    )
    # DDP averages the processes' gradients; the loss parts are sums, so scale back up.
    scale = float(ranks.world)
    totals = [0.0, 0.0, 0.0]
    last = len(mine.chunks) - 1
    for j, (chunk, pair) in enumerate(zip(mine.chunks, mine.pair_reference, strict=True)):
        batch = collate(chunk or examples[:1], pad_id).to(device)
        with ranks.no_sync(policy, sync=j == last):
            parts = _micro_batch_loss(
                policy, reference, batch, config, plan, step_tokens, len(examples), pair
            )
            weight = scale if chunk is not None else 0.0
            (parts.total * weight).backward()
        if chunk is not None:
            values = (parts.total, parts.ce, parts.kl)
            totals = [t + v.item() for t, v in zip(totals, values, strict=True)]
    loss, ce, kl = ranks.sum(totals)
    if isinstance(optimizer, AdamWInBackward):
        grad_norm = optimizer.take_grad_norm()  # the backward has stepped and freed the grads
    else:
        params = [p for p in policy.parameters() if p.requires_grad]
        grad_norm = ranks.clip_grad_norm(params, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(len(e.input_ids) for e in examples)
    elapsed = max(time.perf_counter() - started, 1e-9)
    return {
        "loss": loss,
        "ce": ce,
        "kl": kl,
        "tokens": float(tokens),
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens_per_s": tokens / elapsed,
        "kl_samples": float(sum(e.kl_flag for e in examples)),
    }


def _save(
    policy: Any, tokenizer: Any, config: TrainConfig, out_dir: Path
) -> tuple[Path | None, Path | None]:
    if config.lora is not None:
        adapter_dir = out_dir / "adapter"
        # The vocabulary is never resized, so the embeddings need not be saved; "auto" would
        # look the base model up on the Hub, which a self-hosted machine may not reach.
        policy.save_pretrained(adapter_dir, save_embedding_layers=False)
        return adapter_dir, None
    model_dir = out_dir / "model"
    policy.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return None, model_dir


def _optimizer(
    policy: Any, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = build_adamw(
        params, config.learning_rate, config.weight_decay, config.optimizer_in_backward
    )
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    scheduler = LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, config.lr_scheduler)
    )
    return optimizer, scheduler


def _validation_metrics(
    policy: Any,
    reference: ReferenceLogits,
    examples: Sequence[TrainExample],
    pad_id: int,
    config: TrainConfig,
    plan: ForwardPlan,
) -> StepMetrics:
    """The loss, CE and KL over the validation examples, normalised as one step over all of
    them (so they compare with the training step's), in eval mode and without gradients.
    Every process runs all of them, so their forwards (the reference's too) are the same: the
    collectives of ZeRO-3 pair up."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    step_tokens = sum(e.num_response_tokens for e in examples)
    totals = {"valid_loss": 0.0, "valid_ce": 0.0, "valid_kl": 0.0}
    try:
        with torch.no_grad():
            for i in range(0, len(examples), config.micro_batch_size):
                batch = collate(examples[i : i + config.micro_batch_size], pad_id).to(device)
                parts = _micro_batch_loss(
                    policy, reference, batch, config, plan, step_tokens, len(examples)
                )
                totals["valid_loss"] += parts.total.item()
                totals["valid_ce"] += parts.ce.item()
                totals["valid_kl"] += parts.kl.item()
    finally:
        policy.train(was_training)
    return totals


@dataclass
class _Loop:
    """The optimizer steps of a run, with validation and checkpoints at the policy's steps."""

    policy: Any
    reference: ReferenceLogits
    reference_model: Any | None
    tokenizer: Any
    examples: Sequence[TrainExample]
    validation: Sequence[TrainExample]
    config: TrainConfig
    total_steps: int
    out_dir: Path
    checkpoint_policy: CheckpointPolicy
    on_step: Callable[[StepMetrics], None] | None = None
    on_checkpoint: OnCheckpoint | None = None
    should_stop: Callable[[], bool] | None = None
    ranks: Ranks = field(default_factory=Ranks)
    resume_from: Checkpoint | None = None
    """Continue after this checkpoint: its weights, optimizer, scheduler, RNG and step."""

    def __post_init__(self) -> None:
        state = None
        if self.resume_from is not None:
            state = checkpoints.load_trainer_state(self.resume_from)
            if state["total_steps"] != self.total_steps:
                raise RuntimeError(
                    f"checkpoint planned {state['total_steps']} steps, this run "
                    f"{self.total_steps}: the data or the settings changed"
                )
            # Before the wrap: FSDP shards the loaded weights as it would the initial ones.
            lora = self.config.lora is not None
            checkpoints.load_weights(self.policy, self.resume_from, lora=lora)
        # Training forwards go through DDP when there are several processes; the reference,
        # validation and saving use the plain policy (the same parameters). FSDP shards the
        # policy in place, so the optimizer is built after it, over the process's shards.
        self.trained = self.ranks.wrap(self.policy)
        self.pad_id = pad_token_id(self.tokenizer)
        self.optimizer, self.scheduler = _optimizer(self.policy, self.config, self.total_steps)
        self.plan = forward_plan(self.policy, self.reference_model, self.config.fused_loss)
        # After the plan: it holds the reference's head, which outlives a dropped frozen copy.
        # Only the rows the remaining steps read: a capped (max_steps) or resumed run reads
        # fewer than the whole set, and the cache would pay for the others up front.
        done = int(state["step"]) if state is not None else 0
        steps = step_batches(
            self.examples, self.config.batch_size, self.total_steps, self.config.seed
        )
        upcoming = itertools.chain.from_iterable(itertools.islice(steps, done, None))
        self.reference, self.reference_model = cached_reference(
            self.reference,
            self.reference_model,
            self.policy,
            [*upcoming, *self.validation],
            self.pad_id,
            self.config,
            self.plan,
            self.ranks.world,
        )
        gc.collect()  # a dropped frozen copy's memory goes back before AdamW allocates its own
        # The LoRA reference is the adapter-disabled policy, through its sharded units: under
        # ZeRO-3 its forwards all-gather too. Full fine-tuning's frozen copy is not sharded.
        self.pair_references = self.ranks.lockstep and self.reference_model is self.policy
        self.history: list[StepMetrics] = []
        self.step = 0
        if state is not None:
            self.ranks.load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.history = list(state["history"])
            self.step = int(state["step"])
            checkpoints.set_rng_state(state["rng"])

    def run(self, metrics_path: Path) -> bool:
        """Every remaining step, each logged to ``metrics_path``; True when stopped early."""
        steps_per_epoch = math.ceil(len(self.examples) / self.config.batch_size)
        batches = step_batches(
            self.examples, self.config.batch_size, self.total_steps, self.config.seed
        )
        self.trained.train()
        # Every process runs every step; the main one alone writes and reports.
        main = self.ranks.is_main
        with open(metrics_path if main else os.devnull, "w", encoding="utf-8") as metrics_file:
            for record in self.history:  # the steps before a resume
                metrics_file.write(json.dumps(record) + "\n")
            for step, step_examples in enumerate(
                itertools.islice(batches, self.step, None), self.step + 1
            ):
                stop = main and self.should_stop is not None and self.should_stop()
                if self.ranks.agree(stop):
                    return True
                metrics = _optimizer_step(
                    self.trained,
                    self.reference,
                    step_examples,
                    self.pad_id,
                    self.config,
                    self.optimizer,
                    self.scheduler,
                    self.plan,
                    self.ranks,
                    self.pair_references,
                )
                record = {"step": step, "total_steps": self.total_steps}
                record.update(epoch=step / steps_per_epoch, **metrics)
                before = self.history[-1]["trained_tokens"] if self.history else 0.0
                record["trained_tokens"] = before + metrics["tokens"]
                due = self.checkpoint_policy.due(step, self.total_steps)
                if due and self.validation:
                    record.update(self._validate())
                self.history.append(record)
                self.step = step
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if due:
                    self._checkpoint(record)
                if main and self.on_step is not None:
                    self.on_step(record)
        return False

    def _validate(self) -> StepMetrics:
        return _validation_metrics(
            self.policy, self.reference, self.validation, self.pad_id, self.config, self.plan
        )

    def _checkpoint(self, record: StepMetrics) -> None:
        # Under FSDP every process takes part in gathering the weights and optimizer state
        # onto the main one; otherwise the processes hold the same ones and only it reads.
        gather = self.ranks.sharded or self.ranks.is_main
        policy = self.ranks.plain(self.policy) if gather else None
        optimizer = self.ranks.optimizer_state(self.policy, self.optimizer) if gather else None
        if not self.ranks.is_main:
            self.ranks.barrier()
            return
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
        }
        metrics = {k: v for k, v in record.items() if k != "step"}
        saved = checkpoints.save_checkpoint(
            self.out_dir,
            self.step,
            policy,
            self.tokenizer,
            self.config.lora is not None,
            state,
            metrics,
        )
        deleted = checkpoints.prune(self.out_dir, self.checkpoint_policy.keep, self.total_steps)
        if self.on_checkpoint is not None:
            self.on_checkpoint(saved, deleted)
        self.ranks.barrier()  # the others may read it at a resume


def fine_tune(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    flags: Sequence[bool | int],
    prompts: RolePrompts,
    config: TrainConfig,
    out_dir: Path | str,
    *,
    base_model_name: str | None = None,
    validation: Sequence[Sample] = (),
    validation_flags: Sequence[bool | int] = (),
    checkpoint_policy: CheckpointPolicy | None = None,
    resume: bool = False,
    on_step: Callable[[StepMetrics], None] | None = None,
    on_checkpoint: OnCheckpoint | None = None,
    should_stop: Callable[[], bool] | None = None,
    accelerator: Any | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``samples`` (encoded as ``config.train_system_prompt``
    says).

    ``flags`` are the RDS flags, one per sample; ``config.method`` turns them into the KL
    subset. With LoRA the model is wrapped in a ``PeftModel`` (returned as ``result.model``) and
    the adapter is saved to ``out_dir/adapter`` with ``base_model_name`` (default: the model's
    ``name_or_path``) recorded in its adapter_config.json; without LoRA the model and tokenizer
    are saved to ``out_dir/model``. ``train_config.json`` and ``metrics.jsonl`` (one line per
    step) go to ``out_dir``.

    Checkpoints (:mod:`trainer.checkpoints`) are written under ``out_dir/checkpoints`` at the
    steps ``checkpoint_policy`` names and always at the final step; at each of them the loss,
    CE and KL over ``validation`` (with the KL on its ``validation_flags`` rows, as in
    training) join the step's metrics. With ``resume`` the run continues after the newest
    checkpoint in ``out_dir`` if there is one, and ends as the uninterrupted run would.
    ``on_step`` receives each step's metrics, ``on_checkpoint`` each checkpoint; ``should_stop``
    is asked before each step and ends the run without saving when it returns True.

    With an ``accelerate.Accelerator`` of several processes (``accelerate launch``), each
    process runs this with the same arguments: every step's micro-batches are shared out
    among them and DDP sums the gradients, so the run takes the steps one process would (the
    same batches, losses and updates, up to the order of float sums; dropout masks differ).
    With an ``fsdp_config`` in the accelerate config the policy is sharded instead (FSDP2,
    ZeRO-2 or ZeRO-3: :mod:`trainer.ranks`); checkpoints and the saved weights are gathered onto the
    main process, whose ``result.model`` is then a module of its own with the whole trained
    weights (the other processes' is their sharded policy). Only the main process writes
    files and calls the callbacks; its ``should_stop`` decides for all.
    """
    if not samples:
        raise ValueError("no training samples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    kl_flags = select_kl_subset(flags, config.method, config.random_seed)
    encode = functools.partial(
        encode_examples,
        tokenizer=tokenizer,
        prompts=prompts,
        max_prompt_tokens=config.max_prompt_tokens,
        max_response_tokens=config.max_response_tokens,
        system_prompt=config.train_system_prompt,
    )
    examples = encode(samples, kl_flags)
    # The validation KL anchors the rows training would anchor: the same method's subset.
    validation_examples = encode(
        validation, select_kl_subset(validation_flags, config.method, config.random_seed)
    )
    name = base_model_name or getattr(model, "name_or_path", None) or None
    ranks = Ranks(accelerator)
    if config.optimizer_in_backward and ranks.world > 1:
        raise ValueError(
            "optimizer_in_backward runs in one process: DDP and FSDP reduce the gradients "
            "after the backward, where it has already stepped"
        )
    if accelerator is not None:
        model.to(accelerator.device)  # before the frozen reference of full fine-tuning is copied
    policy, reference, reference_model = _prepare(model, config, name, ranks.world)
    total_steps = plan_steps(len(examples), config.batch_size, config.n_epochs, config.max_steps)
    config_path = out_dir / "train_config.json"
    config_path.write_text(config.to_json(), encoding="utf-8")
    last = checkpoints.latest_resumable(out_dir) if resume else None
    loop = _Loop(
        policy,
        reference,
        reference_model,
        tokenizer,
        examples,
        validation_examples,
        config,
        total_steps,
        out_dir,
        checkpoint_policy or CheckpointPolicy(),
        on_step=on_step,
        on_checkpoint=on_checkpoint,
        should_stop=should_stop,
        ranks=ranks,
        resume_from=last,
    )
    # The loop holds what it still needs: a frozen copy it dropped must not live on here.
    del reference, reference_model
    resumed_from = None
    if last is not None:
        resumed_from = last.step
        if on_checkpoint is not None and ranks.is_main:
            # The host may not have recorded it: the last process could die right after it.
            on_checkpoint(last, [])
    metrics_path = out_dir / "metrics.jsonl"
    try:
        stopped = loop.run(metrics_path)
    finally:
        if isinstance(loop.optimizer, AdamWInBackward):
            loop.optimizer.close()  # the returned model's later backwards update nothing
    policy.eval()
    adapter_dir = model_dir = None
    if not stopped:
        # Under FSDP the main process gets the whole trained weights as a module of its own
        # (what it saves, evaluates and returns); the others keep their shards.
        if (gathered := ranks.plain(policy, on_device=True)) is not None:
            policy = gathered.eval()
        if ranks.is_main:
            adapter_dir, model_dir = _save(policy, tokenizer, config, out_dir)
    ranks.barrier()
    history = loop.history
    return TrainResult(
        model=policy,
        steps=len(history),
        total_steps=total_steps,
        stopped=stopped,
        num_kl_samples=sum(kl_flags),
        final=history[-1] if history else {},
        history=history,
        resumed_from=resumed_from,
        config_path=config_path,
        metrics_path=metrics_path,
        adapter_dir=adapter_dir,
        model_dir=model_dir,
    )
