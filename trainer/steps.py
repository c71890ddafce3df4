"""One optimizer step of the RBO loss: micro-batches planned, each one's loss (only the logits it
reads projected), gradients accumulated, clipped and applied; and the optimizer with its
learning-rate schedule. The same loss over validation examples, without gradients."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import TrainConfig
from trainer.data import Batch, TrainExample, collate
from trainer.forward import ForwardPlan, outputs
from trainer.fused_loss import fused_sarft_loss
from trainer.loss import IGNORE_INDEX, LossParts, sarft_loss
from trainer.optimizers import AdamWInBackward, build_adamw
from trainer.ranks import Ranks

StepMetrics = dict[str, float]
ReferenceLogits = Callable[[Batch, int, bool], torch.Tensor]
"""The reference's ``outputs(batch, keep, hidden)`` (see :func:`trainer.forward.outputs`)."""


def lr_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def first_kept_position(batch: Batch, needs_all_positions: bool, can_slice: bool) -> int:
    """The first position whose logits the loss reads."""
    if needs_all_positions or not can_slice:
        return 0
    is_label = batch.labels != IGNORE_INDEX
    first_label = torch.where(is_label.any(1), is_label.int().argmax(1), batch.labels.shape[1])
    return max(int(first_label.min()) - 1, 0)


def micro_batch_loss(
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
    start = first_kept_position(batch, needs_kl and config.kl_positions == "all", plan.can_slice)
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


def optimizer_step(
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
            parts = micro_batch_loss(
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


def validation_metrics(
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
                parts = micro_batch_loss(
                    policy, reference, batch, config, plan, step_tokens, len(examples)
                )
                totals["valid_loss"] += parts.total.item()
                totals["valid_ce"] += parts.ce.item()
                totals["valid_kl"] += parts.kl.item()
    finally:
        policy.train(was_training)
    return totals


def build_optimizer(
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
