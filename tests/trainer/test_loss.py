"""The RBO loss against computations written out position by position."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.loss import (
    IGNORE_INDEX,
    kl_positions_mask,
    per_sample_kl,
    response_ce,
    sarft_loss,
)

B, T, V = 3, 7, 11


def crafted_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy and reference logits, labels and attention mask of three right-padded rows."""
    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    ref = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    x = IGNORE_INDEX
    labels = torch.tensor(
        [
            [x, x, x, 4, 5, 6, x],  # prompt of 3, response of 3, one pad
            [x, x, 2, 3, x, x, x],  # prompt of 2, response of 2, three pads
            [x, x, x, x, 1, 2, 3],  # prompt of 4, response of 3, no padding
        ]
    )
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    return policy, ref, labels, attention


def manual_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    losses = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                z = logits[b, t].tolist()
                log_norm = math.log(sum(math.exp(v) for v in z))
                losses.append(log_norm - z[target])
    return sum(losses) / len(losses)


def manual_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), one position, in plain Python."""
    p_norm = math.log(sum(math.exp(v) for v in p_logits.tolist()))
    q_norm = math.log(sum(math.exp(v) for v in q_logits.tolist()))
    total = 0.0
    for pv, qv in zip(p_logits.tolist(), q_logits.tolist(), strict=True):
        log_p, log_q = pv - p_norm, qv - q_norm
        total += math.exp(log_p) * (log_p - log_q)
    return total


def manual_sample_kl(
    policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, direction: str
) -> list[float]:
    out = []
    for b in range(policy.shape[0]):
        values = []
        for t in range(policy.shape[1]):
            if mask[b, t]:
                if direction == "ref_policy":
                    values.append(manual_kl(ref[b, t], policy[b, t]))
                else:
                    values.append(manual_kl(policy[b, t], ref[b, t]))
        out.append(sum(values) / len(values) if values else 0.0)
    return out


def test_response_ce_matches_a_loop_over_positions() -> None:
    policy, _, labels, _ = crafted_batch()
    assert response_ce(policy, labels).item() == pytest.approx(manual_ce(policy, labels), abs=1e-9)
    # In float32 too (what training uses), to 1e-6.
    ce32 = response_ce(policy.float(), labels)
    assert ce32.dtype == torch.float32
    assert ce32.item() == pytest.approx(manual_ce(policy, labels), abs=1e-6)


def test_response_ce_with_a_step_token_count_is_a_share_of_the_step_mean() -> None:
    policy, _, labels, _ = crafted_batch()
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert response_ce(policy, labels, num_tokens=4 * n).item() == pytest.approx(
        response_ce(policy, labels).item() / 4, abs=1e-12
    )


def test_sample_tokens_ce_is_the_authors_normalisation() -> None:
    """Each row's summed response CE over its non-pad tokens (prompt included), batch-averaged."""
    policy, _, labels, attention = crafted_batch()
    per_row = []
    for b in range(B):
        row_ce = manual_ce(policy[b : b + 1], labels[b : b + 1])
        n_response = int((labels[b, 1:] != IGNORE_INDEX).sum())
        per_row.append(row_ce * n_response / int(attention[b].sum()))
    expected = sum(per_row) / B
    tokens = attention.sum(1)
    got = response_ce(policy, labels, sample_tokens=tokens)
    assert got.item() == pytest.approx(expected, abs=1e-9)
    # A micro-batch of an effective batch twice as large contributes half.
    half = response_ce(policy, labels, sample_tokens=tokens, num_rows=2 * B)
    assert half.item() == pytest.approx(expected / 2, abs=1e-12)
    parts = sarft_loss(policy, None, labels, attention, torch.zeros(B), 0.0, sample_tokens=tokens)
    assert parts.ce.item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
@pytest.mark.parametrize("positions", ["all", "response"])
def test_per_sample_kl_matches_a_manual_sum_over_the_vocabulary(
    direction: str, positions: str
) -> None:
    policy, ref, labels, attention = crafted_batch()
    mask = kl_positions_mask(labels, attention, positions)  # type: ignore[arg-type]
    got = per_sample_kl(policy, ref, mask, direction)  # type: ignore[arg-type]
    want = manual_sample_kl(policy, ref, mask, direction)
    assert got.tolist() == pytest.approx(want, abs=1e-9)
    got32 = per_sample_kl(policy.float(), ref.float(), mask, direction)  # type: ignore[arg-type]
    assert got32.tolist() == pytest.approx(want, abs=1e-5)


def test_the_two_directions_differ() -> None:
    policy, ref, _, attention = crafted_batch()
    mask = attention.bool()
    forward = per_sample_kl(policy, ref, mask, "ref_policy")
    reverse = per_sample_kl(policy, ref, mask, "policy_ref")
    assert not torch.allclose(forward, reverse)


def test_position_masks_follow_the_next_token_shift() -> None:
    _, _, labels, attention = crafted_batch()
    response = kl_positions_mask(labels, attention, "response")
    # Row 0: labels at 3, 4, 5, so positions 2, 3, 4 predict them.
    assert response[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert response[2].nonzero().flatten().tolist() == [3, 4, 5]
    assert kl_positions_mask(labels, attention, "all").tolist() == attention.bool().tolist()


def test_sarft_loss_combines_ce_and_flagged_kl() -> None:
    policy, ref, labels, attention = crafted_batch()
    flags = torch.tensor([1.0, 0.0, 1.0])
    parts = sarft_loss(policy, ref, labels, attention, flags, 0.5, "ref_policy", "all")
    per_sample = manual_sample_kl(policy, ref, attention.bool(), "ref_policy")
    want_kl = (per_sample[0] + per_sample[2]) / B  # unflagged rows count as 0 in the mean
    assert parts.kl.item() == pytest.approx(want_kl, abs=1e-9)
    assert parts.ce.item() == pytest.approx(manual_ce(policy, labels), abs=1e-9)
    assert parts.total.item() == pytest.approx(parts.ce.item() + 0.5 * want_kl, abs=1e-9)


def test_reference_logits_of_the_flagged_rows_only() -> None:
    # The trainer runs the reference forward on the flagged rows alone.
    policy, ref, labels, attention = crafted_batch()
    flags = torch.tensor([1.0, 0.0, 1.0])
    for direction in ("ref_policy", "policy_ref"):
        whole = sarft_loss(policy, ref, labels, attention, flags, 0.5, direction, "all")
        flagged = sarft_loss(policy, ref[[0, 2]], labels, attention, flags, 0.5, direction, "all")
        assert flagged.kl.item() == pytest.approx(whole.kl.item(), abs=1e-12)
        assert flagged.kl.item() > 0


def test_kl_is_zero_when_policy_equals_reference() -> None:
    policy, _, labels, attention = crafted_batch()
    flags = torch.ones(B)
    for direction in ("ref_policy", "policy_ref"):
        parts = sarft_loss(policy, policy.clone(), labels, attention, flags, 0.5, direction, "all")
        assert parts.kl.item() == 0.0


def test_unflagged_rows_contribute_no_kl() -> None:
    policy, ref, labels, attention = crafted_batch()
    flags = torch.tensor([1.0, 0.0, 0.0])
    base = sarft_loss(policy, ref, labels, attention, flags, 1.0).kl
    other_ref = ref.clone()
    other_ref[1:] += torch.randn_like(other_ref[1:])  # only unflagged rows change
    assert sarft_loss(policy, other_ref, labels, attention, flags, 1.0).kl.item() == base.item()
    none = sarft_loss(policy, ref, labels, attention, torch.zeros(B), 1.0)
    assert none.kl.item() == 0.0


def test_lambda_zero_is_plain_ce_and_needs_no_reference() -> None:
    policy, _, labels, attention = crafted_batch()
    parts = sarft_loss(policy, None, labels, attention, torch.ones(B), 0.0)
    assert torch.equal(parts.total, response_ce(policy, labels))
    with pytest.raises(ValueError, match="reference logits"):
        sarft_loss(policy, None, labels, attention, torch.ones(B), 0.5)


def test_response_positions_ignore_prompt_differences_that_all_positions_see() -> None:
    policy, _, labels, attention = crafted_batch()
    flags = torch.ones(B)
    ref = policy.clone()
    ref[0, 0] += 3.0  # a prompt position of row 0: it predicts a prompt token
    ref[1, 5] += 3.0  # a padding position of row 1: no mask sees it
    all_kl = sarft_loss(policy, ref, labels, attention, flags, 1.0, positions="all").kl
    resp_kl = sarft_loss(policy, ref, labels, attention, flags, 1.0, positions="response").kl
    assert resp_kl.item() == 0.0
    want = manual_kl(ref[0, 0], policy[0, 0]) / int(attention[0].sum()) / B
    assert all_kl.item() == pytest.approx(want, abs=1e-9)
    ref[2, 4] += 3.0  # a response-predicting position of row 2: both see it
    resp_kl = sarft_loss(policy, ref, labels, attention, flags, 1.0, positions="response").kl
    assert resp_kl.item() == pytest.approx(manual_kl(ref[2, 4], policy[2, 4]) / 3 / B, abs=1e-9)
