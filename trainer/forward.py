"""What the loss reads from a forward pass: logits, or the final hidden states and the LM head.

The fused loss (:mod:`trainer.fused_loss`) projects hidden states itself, a chunk at a time, so
the model's own head must not run over the positions. The forward then asks for the logits of
one position only (``logits_to_keep=1``) and takes the final, normalised hidden states from
``output_hidden_states``: it still goes through the model's (or DDP's) own ``forward``, so the
wrappers around it see a normal call (the reference's, without gradients, runs the decoder).

A head is only used outside the model when that provably gives the model's logits: a plain
``nn.Linear`` (not a LoRA-adapted one, not a sharded parameter) whose projection of the hidden
states reproduces the model's own logits on a probe (which rules out logit scaling and
soft-capping). Anything else takes the unfused path.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from trainer.data import Batch
from trainer.fused_loss import Head


def unwrapped(model: Any) -> Any:
    """The transformers model inside DDP and PEFT wrappers (LoRA layers stay in place)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters


def outputs(model: Any, batch: Batch, keep: int, hidden: bool) -> torch.Tensor:
    """The last ``keep`` positions' logits [B, keep, V], or with ``hidden`` their final hidden
    states [B, keep, H] (the model's head then runs on one position only).

    Without gradients (the reference) the hidden states come from the decoder alone: through
    the whole model, ``output_hidden_states`` would keep every layer's output alive, which a
    training forward keeps for its backward anyway but a no-grad one would otherwise free."""
    width = batch.input_ids.shape[1]
    if hidden and not torch.is_grad_enabled():
        decoder = unwrapped(model).get_decoder()
        out = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        return out.last_hidden_state[:, width - keep :]
    extra: dict[str, Any] = {}
    if hidden:
        extra = {"logits_to_keep": 1, "output_hidden_states": True}
    elif keep < width:
        extra = {"logits_to_keep": keep}
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **extra
    )
    if not hidden:
        return out.logits
    return out.hidden_states[-1][:, width - keep :]


def _plain_head(model: Any) -> Head | None:
    head = unwrapped(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear or type(head.weight.data) is not torch.Tensor:
        return None
    return Head(head.weight, head.bias)


@torch.no_grad()
def _reproduces_logits(model: Any, head: Head) -> bool:
    """Whether ``hidden @ W.T + b`` is the model's own logits, on a short probe."""
    inner = unwrapped(model)
    was_training = inner.training
    inner.eval()
    try:
        device = head.weight.device
        ids = torch.arange(4, device=device)[None] % int(head.weight.shape[0])
        out = inner(input_ids=ids, use_cache=False, output_hidden_states=True)
        decoded = inner.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        logits = out.logits
        for states in (out.hidden_states[-1], decoded):
            projected = states @ head.weight.t()
            if head.bias is not None:
                projected = projected + head.bias
            if projected.shape != logits.shape or not torch.allclose(
                projected, logits.to(projected.dtype), rtol=1e-4, atol=1e-4
            ):
                return False
        return True
    finally:
        inner.train(was_training)


@dataclass(frozen=True, slots=True)
class ForwardPlan:
    """How the training forwards feed the loss."""

    can_slice: bool
    """``logits_to_keep`` is supported: the head can skip positions the loss does not read."""
    head: Head | None = None
    """The policy's head when the loss is fused (None: the model's logits, unfused)."""
    ref_head: Head | None = None
    """The reference's head for the fused KL (the policy's own under LoRA)."""
    chunk_rows: int | None = None
    """Positions per fused-loss chunk; None: :func:`trainer.fused_loss.chunk_rows_for` the
    vocabulary."""

    @property
    def fused(self) -> bool:
        return self.head is not None


def forward_plan(policy: Any, reference_model: Any | None, fused: bool) -> ForwardPlan:
    """The fused plan when ``fused`` is asked for and both heads allow it, else the unfused."""
    can_slice = supports_logits_to_keep(policy)
    if not (fused and can_slice):
        return ForwardPlan(can_slice)
    head = _plain_head(policy)
    if head is None or not _reproduces_logits(policy, head):
        return ForwardPlan(can_slice)
    if reference_model is None or reference_model is policy:
        return ForwardPlan(can_slice, head, head)
    ref_head = _plain_head(reference_model)
    if ref_head is None or not _reproduces_logits(reference_model, ref_head):
        return ForwardPlan(can_slice)
    return ForwardPlan(can_slice, head, ref_head)


def sparse_tied_embedding_gradient(model: Any) -> bool:
    """Have a trained input embedding that shares its weight with the LM head (SmolLM2, and
    Qwen2.5 as published; the packaged Qwen GGUF loads untied) send the backward a sparse
    gradient: the rows of the batch's tokens instead of a dense [V, H] tensor. Autograd
    sums a shared parameter's gradients before it stores them; the head's, dense and first,
    then takes the embedding's rows in place, so the dense [V, H] copy that would otherwise
    be allocated at the very end of the backward, when every other gradient already exists,
    never is (108 MiB for SmolLM2's 49,152 x 576 in float32, 519 MiB at Qwen2.5's 151,936 x
    896). The sum is the same up to the order of float additions.

    Only for one process: DDP and FSDP expect a sparse-mode embedding's gradient to arrive
    sparse, and this one arrives dense. Without the tie the embedding's gradient alone would
    be stored sparse, which AdamW refuses, so an untied model is left as it is. Returns
    whether the embedding was switched."""
    inner = unwrapped(model)
    embedding = inner.get_input_embeddings()
    head = inner.get_output_embeddings()
    if type(embedding) is not torch.nn.Embedding or head is None:
        return False
    weight = embedding.weight
    if weight is not getattr(head, "weight", None) or not weight.requires_grad:
        return False
    embedding.sparse = True
    return True
