"""Label log-probabilities from hidden states, without materializing full-vocabulary logits.

This module owns the scorer's output projection: given the final hidden states
at the positions that predict response tokens, the output embedding's weight
(and bias) and the model's logit soft-cap, it returns ``log p(label)`` per row.
Rows are taken ``PROJECTION_ROWS`` at a time and the vocabulary
``VOCAB_SLICE`` columns at a time into one reused buffer, so each slice of
logits is reduced while still in cache. Plain fp32 heads take the
label-shifted sum (one exp and one sum per slice); anything else, or a shifted
sum that overflows, takes the exact per-slice log-sum-exp.
"""

from __future__ import annotations

import torch

# 2048 rows x 2048 columns of fp32 logits is 16 MiB, and slices this wide keep the
# matmul near its peak.
PROJECTION_ROWS = 2048
VOCAB_SLICE = 2048


def label_logprobs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    """log p(label) at each row of ``hidden``: the label's logit minus the log-sum-exp.

    Up to ``PROJECTION_ROWS`` rows at a time, the logits are made one slice of
    ``VOCAB_SLICE`` vocabulary columns at a time into one reused buffer and
    reduced while in cache, where full-vocabulary logits (positions x vocab x
    4 bytes, 260 MB for SmolLM2 at batch 16) would go to memory and back
    several times. Memory stays bounded whatever the vocabulary.
    """
    plain = weight.dtype == torch.float32 and bias is None and not softcap
    out = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
    for i in range(0, len(labels), PROJECTION_ROWS):
        h, lab = hidden[i : i + PROJECTION_ROWS], labels[i : i + PROJECTION_ROWS]
        lp = _shifted_logprobs(h, lab, weight) if plain else None
        out[i : i + PROJECTION_ROWS] = (
            lp if lp is not None else exact_logprobs(h, lab, weight, bias, softcap)
        )
    return out


def exact_logprobs(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    """Each slice's log-sum-exp shifted by its own row maxima, then combined."""
    slices = range(0, weight.shape[0], VOCAB_SLICE)
    lse = torch.empty(len(slices), len(h), dtype=torch.float32, device=h.device)
    buffer = h.new_empty(len(h) * VOCAB_SLICE)
    for j, v in enumerate(slices):
        w = weight[v : v + VOCAB_SLICE]
        logits = torch.mm(h, w.t(), out=buffer[: len(h) * len(w)].view(len(h), len(w)))
        if bias is not None:
            logits += bias[v : v + VOCAB_SLICE]
        lse[j] = _logsumexp_(apply_softcap(logits.float(), softcap))
    picked = (h.float() * weight[labels].float()).sum(-1)
    if bias is not None:
        picked += bias[labels].float()
    if weight.dtype != torch.float32:
        # As the matmul rounds its output: the label logit enters the sum rounded.
        picked = picked.to(weight.dtype).float()
    return apply_softcap(picked, softcap) - torch.logsumexp(lse, dim=0)


def apply_softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _shifted_logprobs(
    h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor | None:
    """-log sum_v exp(logit_v - logit_label): the label's own logit is the shift.

    The matmul subtracts it as it writes each slice, so a slice costs one exp
    and one sum and no max pass. The sum is at least 1 (the label's own term),
    so it cannot underflow; it overflows only where some logit exceeds the
    label's by more than fp32's exp range (~88), and then the caller takes the
    exact path (None).
    """
    shift = (h * weight[labels]).sum(-1).neg_()[:, None]
    total = torch.zeros(len(h), dtype=torch.float32, device=h.device)
    buffer = h.new_empty(len(h) * VOCAB_SLICE)
    for v in range(0, weight.shape[0], VOCAB_SLICE):
        w = weight[v : v + VOCAB_SLICE]
        logits = buffer[: len(h) * len(w)].view(len(h), len(w))
        total += torch.addmm(shift, h, w.t(), out=logits).exp_().sum(-1)
    if not bool(torch.isfinite(total).all()):
        return None
    return total.log_().neg_()


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last dim, overwriting ``x``: no temporaries the size of ``x``."""
    top = x.amax(dim=-1, keepdim=True)
    total = x.sub_(top).exp_().sum(dim=-1)
    return total.log_().add_(top.squeeze(-1))
