"""The RBO loss of SaRFT: ``CE(all samples) + lambda * KL(flagged samples)``, on tensors only.

Shapes: ``logits`` [B, T, V] where ``logits[:, t]`` is the next-token distribution emitted at
position t; ``labels`` [B, T] aligned with the input ids (``-100`` outside response tokens);
``attention_mask`` [B, T] (1 on real tokens); ``flags`` [B] (1 where the KL term applies).

The next-token shift happens once, in :func:`response_positions`: position t predicts
``labels[:, t + 1]``. Both the CE and the "response" KL mask use it; the "all" KL mask is the
attention mask itself, i.e. every distribution emitted at a real token, including the last one
(the authors' code does exactly this). Every softmax is taken in float32, and only over the rows
a mask selects, so unflagged samples cost nothing in the KL term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config import KLDirection, KLPositions

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class LossParts:
    total: torch.Tensor
    """``ce + lambda * kl``: what is back-propagated."""
    ce: torch.Tensor
    """Response cross-entropy: a token mean, or the authors' per-sample normalisation."""
    kl: torch.Tensor
    """Mean over the batch rows of ``flag * per-sample KL`` (unflagged rows count as 0)."""


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at positions whose next-token distribution predicts a response token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def kl_positions_mask(
    labels: torch.Tensor, attention_mask: torch.Tensor, positions: KLPositions
) -> torch.Tensor:
    """[B, T] bool: the positions the KL term averages over, per sample."""
    if positions == "all":
        return attention_mask.bool()
    if positions == "response":
        return response_positions(labels)
    raise ValueError(f"unknown KL positions {positions!r}")


def response_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_tokens: int | None = None,
    *,
    sample_tokens: torch.Tensor | None = None,
    num_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the response tokens.

    Without ``sample_tokens``: the sum over tokens divided by ``num_tokens``, which defaults to
    this batch's response tokens (a plain token mean). With ``sample_tokens`` ([B], each
    sample's non-pad tokens, prompt included): each sample's summed CE divided by its count,
    summed over the rows and divided by ``num_rows`` (default: this batch's rows), the
    authors' normalisation. Gradient accumulation passes the whole optimizer step's counts, so
    that the micro-batch losses add up to the effective batch's.
    """
    mask = response_positions(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    if targets.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph: nothing to learn from this batch
    picked = _at_least_fp32(logits[mask])
    if sample_tokens is None:
        count = int(targets.numel()) if num_tokens is None else num_tokens
        return F.cross_entropy(picked, targets, reduction="sum") / max(count, 1)
    per_token = F.cross_entropy(picked, targets, reduction="none")
    # logits[mask] is row-major, so the nonzero rows line up with per_token.
    rows = mask.nonzero(as_tuple=True)[0]
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device)
    sums = sums.index_add(0, rows, per_token)
    per_sample = sums / sample_tokens.clamp_min(1).to(sums.dtype)
    return per_sample.sum() / max(labels.shape[0] if num_rows is None else num_rows, 1)


def token_kl(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, direction: KLDirection
) -> torch.Tensor:
    """[N] full-vocabulary KL per row of [N, V] logits, computed in float32 (or float64).

    ``kl_div`` with log targets computes ``sum_v exp(t) * (t - x)`` in one pass, without the
    [N, V] temporaries of spelling it out (the vocabulary makes these the largest tensors).
    """
    policy_lp = torch.log_softmax(_at_least_fp32(policy_logits), dim=-1)
    ref_lp = torch.log_softmax(_at_least_fp32(ref_logits), dim=-1)
    if direction == "ref_policy":  # KL(ref || policy) = sum_v p_ref (log p_ref - log p_policy)
        return F.kl_div(policy_lp, ref_lp, reduction="none", log_target=True).sum(-1)
    if direction == "policy_ref":  # KL(policy || ref) = sum_v p_policy (log p_policy - log p_ref)
        return F.kl_div(ref_lp, policy_lp, reduction="none", log_target=True).sum(-1)
    raise ValueError(f"unknown KL direction {direction!r}")


def per_sample_kl(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor,
    direction: KLDirection = "ref_policy",
    ref_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B]: per-token KL averaged over each sample's ``mask`` positions (0 for an empty mask).

    ``ref_logits`` holds every row of ``policy_logits``, or only the rows ``ref_rows`` (a
    sorted index; ``mask`` must be False on every other row).
    """
    mask = mask.bool()
    rows = mask.nonzero(as_tuple=True)[0]
    ref_mask = mask if ref_rows is None else mask[ref_rows]
    per_token = token_kl(policy_logits[mask], ref_logits[ref_mask], direction)
    sums = torch.zeros(mask.shape[0], dtype=per_token.dtype, device=per_token.device)
    sums = sums.index_add(0, rows, per_token)
    return sums / mask.sum(dim=1).clamp_min(1).to(sums.dtype)


def sarft_loss(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
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
) -> LossParts:
    """``CE + lam * mean_b(flag_b * KL_b)``.

    ``ref_logits`` holds every row, or only the flagged rows (in order): the reference forward
    need not run on the others. It may be None when ``lam == 0`` or no row is flagged: the KL is
    then 0 and no reference forward is needed. ``num_response_tokens`` and ``num_rows`` override
    this batch's counts as the CE and KL denominators; ``sample_tokens`` switches the CE to the
    authors' per-sample normalisation (see :func:`response_ce`).
    """
    ce = response_ce(
        policy_logits,
        labels,
        num_response_tokens,
        sample_tokens=sample_tokens,
        num_rows=num_rows,
    )
    rows = labels.shape[0] if num_rows is None else num_rows
    flagged = flags.bool()
    if lam == 0 or not bool(flagged.any()):
        kl = ce.new_zeros(())
    else:
        if ref_logits is None:
            raise ValueError("flagged rows with lam > 0 need reference logits")
        mask = kl_positions_mask(labels, attention_mask, positions) & flagged[:, None]
        ref_rows = None if ref_logits.shape[0] == labels.shape[0] else flagged.nonzero()[:, 0]
        kl_rows = per_sample_kl(policy_logits, ref_logits, mask, direction, ref_rows)
        kl = (flags.to(kl_rows.dtype) * kl_rows).sum() / max(rows, 1)
    return LossParts(total=ce + lam * kl, ce=ce, kl=kl)
