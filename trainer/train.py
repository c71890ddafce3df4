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

import functools
import gc
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoints
from trainer.checkpoints import Checkpoint, CheckpointPolicy
from trainer.config import TrainConfig
from trainer.data import (
    TrainExample,
    encode_examples,
    pad_token_id,
    plan_steps,
    select_kl_subset,
    step_batches,
)
from trainer.forward import forward_plan
from trainer.optimizers import AdamWInBackward
from trainer.policy_setup import cached_reference, prepare_policy
from trainer.ranks import Ranks
from trainer.steps import (
    ReferenceLogits,
    StepMetrics,
    build_optimizer,
    optimizer_step,
    validation_metrics,
)
from worker.formats import Sample
from worker.prompts import RolePrompts

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
        self.optimizer, self.scheduler = build_optimizer(self.policy, self.config, self.total_steps)
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
                metrics = optimizer_step(
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
        return validation_metrics(
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
    policy, reference, reference_model = prepare_policy(model, config, name, ranks.world)
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
