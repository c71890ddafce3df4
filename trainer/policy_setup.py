"""What a run trains and what it anchors to: the policy (the model, or a LoRA-wrapped one),
the KL reference (the adapter disabled, a frozen copy, or cached outputs) and activation
checkpointing."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from trainer.config import TrainConfig
from trainer.data import Batch, TrainExample
from trainer.forward import ForwardPlan, outputs, sparse_tied_embedding_gradient
from trainer.reference_cache import CachedReference
from trainer.steps import ReferenceLogits


def frozen_copy(model: Any) -> Any:
    """A deep copy in eval mode with no gradients: the KL reference of full fine-tuning."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    return reference


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


def prepare_policy(
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
