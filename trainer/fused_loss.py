"""The RBO loss from the final hidden states, without ever holding [tokens, vocabulary] logits.

:func:`trainer.loss.sarft_loss` takes logits: for a flagged row with ``kl_positions="all"`` that is
every position's full-vocabulary distribution, for the policy and for the reference, in float32,
and its backward allocates a gradient of the same size. On Llama-3-8B (vocabulary 128,256) one
micro-batch of 2 x 640 tokens holds about 0.66 GB per such tensor, which limits the batch
before the model does.

:func:`fused_sarft_loss` computes the same loss and gradients from the hidden states that the LM
head would project, a chunk of positions at a time: project the chunk onto the vocabulary,
take the log-softmax, the CE and the KL against the reference chunk, and the gradient of the
loss with respect to the chunk's logits, which it immediately multiplies back through the head
(the hidden-state gradient, and the head's weight gradient in full fine-tuning). A chunk's
logits are then dropped, so at most one chunk of policy and reference logits (and a few
temporaries of the same size) exist at once. The gradients are computed during the forward, as
Liger-Kernel's fused linear cross-entropy does; only the backward of ``total`` (what training
back-propagates) is supported, so ``ce`` and ``kl`` are returned without a graph.

Written in plain torch, not a kernel library: Liger-Kernel and Apple's cut-cross-entropy fuse
the CE but their kernels are Triton (CUDA only) and neither computes a KL against a second
head's distribution, which this loss needs; torch ops run on CPU, CUDA and every backend the
trainer does, and the chunk's matmuls are the same large GEMMs the unfused head runs.

Numerics: logits are float32 (float64 when the hidden states are), as in the unfused loss; under
autocast the projections and the gradient matmuls run in the autocast dtype, as ``nn.Linear``'s
forward and backward do there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import KLDirection, KLPositions
from trainer.loss import LossParts, kl_positions_mask, response_positions

LOGITS_PER_CHUNK = 2**23
"""About this many logits per chunk (32 MiB per float32 [rows, V] buffer; about five such
buffers are live at once in a chunk with KL rows), so the chunk's memory does not grow with the
vocabulary. See :func:`chunk_rows_for`."""

MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 32, 128
"""Each chunk reads the whole head twice for 2 x rows FLOPs per weight, so fewer rows make it
memory-bound. ``python bench/fused_chunks.py`` on Qwen2.5's head (896 x 151,936, 1,200
positions, half with KL; this project's 2-core CPU, idle): the loss's forward and backward took
7.24 s at 32 rows, 6.15 s at 64, 5.55 s at 128 and 5.29 s at 256, with peaks of 88, 176, 367
and 734 MiB (the unfused loss: 10.4 s and 3.9 GiB)."""


def chunk_rows_for(vocab: int) -> int:
    """Positions per chunk for a head of ``vocab`` rows: 128 for SmolLM2 (49,152), 55 for
    Qwen2.5 (151,936), 65 for Llama 3 (128,256)."""
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, LOGITS_PER_CHUNK // max(vocab, 1)))


@dataclass(frozen=True, slots=True)
class Head:
    """An LM head: ``logits = hidden @ weight.T + bias``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def _compute_dtypes(hidden: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, logits dtype): the autocast dtype if autocast is on for this device."""
    device = hidden.device.type
    logits_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device), logits_dtype
    return hidden.dtype, logits_dtype


def _log_softmax_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtypes: Any
) -> torch.Tensor:
    matmul_dtype, logits_dtype = dtypes
    logits = hidden.to(matmul_dtype) @ weight.t()
    if bias is not None:
        logits = logits + bias.to(matmul_dtype)
    logits = logits.to(logits_dtype)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _kl_and_gradient(
    policy_logp: torch.Tensor, ref_logq: torch.Tensor, direction: KLDirection
) -> tuple[torch.Tensor, torch.Tensor]:
    """[R] per-position KL and [R, V] ``dKL/dz - p`` (the p is in the caller's gradient), in
    place over both inputs: two [R, V] temporaries at most."""
    if direction == "ref_policy":
        # KL(q || p) = sum q (log q - log p); dKL/dz = p - q.
        q = ref_logq.exp()
        kl_rows = ref_logq.sub_(policy_logp).mul_(q).sum(-1)
        return kl_rows, q.neg_()
    # KL(p || q) = sum p (log p - log q); dKL/dz = p (log p - log q - KL): the elementwise KL
    # terms minus p KL, so ``dKL/dz - p = kl_terms - p (KL + 1)``.
    p = policy_logp.exp()
    kl_terms = policy_logp.sub_(ref_logq).mul_(p)
    kl_rows = kl_terms.sum(-1)
    return kl_rows, p.mul_(kl_rows[:, None] + 1).neg_().add_(kl_terms)


class _FusedHeadLoss(torch.autograd.Function):
    """``sum_n ce_w[n] CE_n + lam * sum_n kl_w[n] KL_n`` over N positions, chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ref_hidden: torch.Tensor | None,
        ref_weight: torch.Tensor | None,
        ref_bias: torch.Tensor | None,
        targets: torch.Tensor,
        ce_w: torch.Tensor,
        kl_w: torch.Tensor,
        ref_index: torch.Tensor,
        lam: float,
        direction: KLDirection,
        chunk_rows: int,
        wants: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        want_hidden, want_weight, want_bias = wants
        dtypes = _compute_dtypes(hidden)
        matmul_dtype, logits_dtype = dtypes
        device = hidden.device.type
        # Autocast is applied by hand (explicit casts), so the in-place accumulations below
        # keep their float32 buffers.
        with torch.autocast(device, enabled=False):
            w = weight.to(matmul_dtype)
            b = None if bias is None else bias.to(matmul_dtype)
            rw = None if ref_weight is None else ref_weight.to(matmul_dtype)
            rb = None if ref_bias is None else ref_bias.to(matmul_dtype)
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=logits_dtype) if want_weight else None
            grad_bias = (
                torch.zeros_like(bias, dtype=logits_dtype)
                if want_bias and bias is not None
                else None
            )
            ce_sum = hidden.new_zeros((), dtype=logits_dtype)
            kl_sum = hidden.new_zeros((), dtype=logits_dtype)
            for start in range(0, hidden.shape[0], chunk_rows):
                end = min(start + chunk_rows, hidden.shape[0])
                h = hidden[start:end].to(matmul_dtype)
                logp = _log_softmax_logits(h, w, b, dtypes)
                cw = ce_w[start:end].to(logits_dtype)
                kl_weight = kl_w[start:end].to(logits_dtype)
                kw = kl_weight * lam
                target = targets[start:end].clamp_min(0)[:, None]  # cw is 0 where there is none
                ce_sum -= (logp.gather(1, target)[:, 0] * cw).sum()
                local = ref_index[start:end]
                rows = (local >= 0).nonzero()[:, 0]
                # d(loss)/d(logits) = cw (p - onehot) + kw dKL/dz: the p term is added for
                # every row here, and the KL's own terms below.
                grad = logp.exp()
                grad.mul_((cw + kw)[:, None])
                grad.scatter_add_(1, target, -cw[:, None])
                if rows.numel():
                    assert ref_hidden is not None and rw is not None
                    ref_logq = _log_softmax_logits(ref_hidden[local[rows]], rw, rb, dtypes)
                    every_row = rows.numel() == end - start
                    # The policy's log-probs are not needed after this: the KL may overwrite
                    # them (a row subset is a copy anyway).
                    policy_logp = logp if every_row else logp[rows]
                    kl_rows, term = _kl_and_gradient(policy_logp, ref_logq, direction)
                    del ref_logq, policy_logp
                    term.mul_(kw[rows][:, None])
                    if every_row:
                        grad.add_(term)
                    else:
                        grad.index_add_(0, rows, term)
                    del term
                    kl_sum += (kl_rows * kl_weight[rows]).sum()
                del logp
                grad_c = grad.to(matmul_dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad_c @ w).to(hidden.dtype)
                if grad_weight is not None:
                    if matmul_dtype == grad_weight.dtype:
                        grad_weight.addmm_(grad_c.t(), h)
                    else:
                        grad_weight += (grad_c.t() @ h).to(grad_weight.dtype)
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
        total = ce_sum + lam * kl_sum
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return total, ce_sum, kl_sum

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        if ctx.grads is None:
            raise RuntimeError("the fused loss's backward runs once (no retain_graph)")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        # The buffers become the gradients, scaled in place: kept on ctx (which the loss's
        # graph holds until the step drops it) or copied, a full fine-tuning head's [V, H]
        # gradient would exist twice until the end of the backward, where the step peaks.
        ctx.grads = None
        scale = grad_total
        unit = bool(scale == 1)  # the usual case: a pass over [V, H] saved

        def scaled(g: torch.Tensor | None, like_dtype: torch.dtype | None) -> Any:
            if g is None:
                return None
            if not unit:
                g.mul_(scale.to(g.dtype))
            return g if like_dtype is None else g.to(like_dtype)

        weight_dtype, bias_dtype = ctx.param_dtypes
        return (
            scaled(grad_hidden, None),
            scaled(grad_weight, weight_dtype),
            scaled(grad_bias, bias_dtype),
            *([None] * 11),
        )


def _weights(
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    flags: torch.Tensor,
    positions: KLPositions,
    with_kl: bool,
    num_response_tokens: int | None,
    num_rows: int | None,
    sample_tokens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] CE weights, KL weights, targets (-100 where no CE) and the KL mask, each weight
    the factor its position's term has in :func:`trainer.loss.sarft_loss`'s CE or KL."""
    batch_rows = labels.shape[0]
    rows = batch_rows if num_rows is None else num_rows
    ce_mask = response_positions(labels)
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    targets = targets.masked_fill(~ce_mask, -100)
    if sample_tokens is None:
        count = int(ce_mask.sum()) if num_response_tokens is None else num_response_tokens
        ce_w = ce_mask.double() / max(count, 1)
    else:
        per_row = 1.0 / (sample_tokens.clamp_min(1).double() * max(rows, 1))
        ce_w = ce_mask.double() * per_row[:, None]
    if not with_kl:
        kl_mask = torch.zeros_like(ce_mask)
        return ce_w, torch.zeros_like(ce_w), targets, kl_mask
    kl_mask = kl_positions_mask(labels, attention_mask, positions) & flags.bool()[:, None]
    per_row = flags.double() / (kl_mask.sum(1).clamp_min(1).double() * max(rows, 1))
    return ce_w, kl_mask.double() * per_row[:, None], targets, kl_mask


def fused_sarft_loss(
    policy_hidden: torch.Tensor,
    head: Head,
    ref_hidden: torch.Tensor | None,
    ref_head: Head | None,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    flags: torch.Tensor,
    lam: float,
    direction: KLDirection = "ref_policy",
    positions: KLPositions = "all",
    *,
    num_response_tokens: int | None = None,
    num_rows: int | None = None,
    sample_tokens: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> LossParts:
    """:func:`trainer.loss.sarft_loss` with hidden states [B, T, H] in place of logits.

    ``ref_hidden`` holds every row of ``policy_hidden`` or only the flagged ones (in order), as
    ``ref_logits`` does there; ``ref_head`` is the reference's head (the policy's own under
    LoRA, whose head is not adapted). Only ``total`` can be back-propagated. ``chunk_rows``:
    positions per chunk, :func:`chunk_rows_for` the vocabulary by default.
    """
    if direction not in ("ref_policy", "policy_ref"):
        raise ValueError(f"unknown KL direction {direction!r}")
    with_kl = lam != 0 and bool(flags.bool().any())
    if with_kl and (ref_hidden is None or ref_head is None):
        raise ValueError("flagged rows with lam > 0 need reference hidden states")
    ce_w, kl_w, targets, kl_mask = _weights(
        labels,
        attention_mask,
        flags,
        positions,
        with_kl,
        num_response_tokens,
        num_rows,
        sample_tokens,
    )
    selected = (targets != -100) | kl_mask
    hidden = policy_hidden[selected]
    ref_selected: torch.Tensor | None = None
    kl_selected = kl_mask[selected]
    ref_index = torch.cumsum(kl_selected, 0) - 1
    ref_index = ref_index.masked_fill(~kl_selected, -1)
    if with_kl:
        assert ref_hidden is not None
        ref_mask = kl_mask if ref_hidden.shape[0] == labels.shape[0] else kl_mask[flags.bool()]
        ref_selected = ref_hidden[ref_mask].detach()
    wants = (
        torch.is_grad_enabled() and hidden.requires_grad,
        torch.is_grad_enabled() and head.weight.requires_grad,
        torch.is_grad_enabled() and head.bias is not None and head.bias.requires_grad,
    )
    function: Any = _FusedHeadLoss
    total, ce, kl = function.apply(
        hidden,
        head.weight,
        head.bias,
        ref_selected,
        None if ref_head is None else ref_head.weight.detach(),
        None if ref_head is None or ref_head.bias is None else ref_head.bias.detach(),
        targets[selected],
        ce_w[selected],
        kl_w[selected],
        ref_index,
        float(lam),
        direction,
        chunk_rows_for(head.weight.shape[0]) if chunk_rows is None else chunk_rows,
        wants,
    )
    return LossParts(total=total, ce=ce, kl=kl)
