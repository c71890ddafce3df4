"""The fused, chunked loss against the unfused one on the same hidden states and heads.

The unfused reference is :func:`trainer.loss.sarft_loss` on ``hidden @ W.T + b``, whose own
correctness tests/trainer/test_loss.py checks against position-by-position arithmetic. The
chunks are made small (a few positions) so that every case crosses several chunk boundaries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trainer.config import LoraSettings
from trainer.forward import forward_plan
from trainer.fused_loss import Head, chunk_rows_for, fused_sarft_loss
from trainer.loss import IGNORE_INDEX, LossParts, sarft_loss
from trainer.train import fine_tune

B, T, H, V = 4, 9, 6, 23
X = IGNORE_INDEX


@dataclass
class Case:
    hidden: torch.Tensor
    ref_hidden: torch.Tensor
    head: Head
    ref_head: Head
    labels: torch.Tensor
    attention: torch.Tensor
    flags: torch.Tensor


def make_case(dtype: torch.dtype, *, full: bool, bias: bool, seed: int = 0) -> Case:
    """Four right-padded rows; in ``full`` fine-tuning the head is trained and the reference
    has its own, under LoRA the reference shares the (frozen) head."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    weight = rand(V, H, scale=0.8).requires_grad_(full)
    head = Head(weight, rand(V).requires_grad_(full) if bias else None)
    ref_head = Head(rand(V, H, scale=0.8), rand(V) if bias else None) if full else head
    labels = torch.tensor(
        [
            [X, X, X, 4, 5, 6, X, X, X],
            [X, X, 2, 3, X, X, X, X, X],
            [X, X, X, X, 1, 2, 3, 7, 8],
            [X, X, X, X, X, 9, 10, X, X],
        ]
    )
    attention = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 0, 0],
        ]
    )
    return Case(
        hidden=rand(B, T, H, scale=1.5).requires_grad_(True),
        ref_hidden=rand(B, T, H, scale=1.5),
        head=head,
        ref_head=ref_head,
        labels=labels,
        attention=attention,
        flags=torch.tensor([1, 0, 1, 0]),
    )


def project(hidden: torch.Tensor, head: Head) -> torch.Tensor:
    logits = hidden @ head.weight.t()
    return logits if head.bias is None else logits + head.bias


def leaves(case: Case) -> list[torch.Tensor]:
    out = [case.hidden, case.head.weight]
    if case.head.bias is not None:
        out.append(case.head.bias)
    return [t for t in out if t.requires_grad]


def grads(case: Case, parts: LossParts) -> list[torch.Tensor]:
    targets = leaves(case)
    return list(torch.autograd.grad(parts.total, targets))


def both(
    case: Case, *, ref_rows_only: bool = False, **settings: object
) -> tuple[LossParts, LossParts]:
    flagged = case.flags.bool()
    ref_hidden = case.ref_hidden[flagged] if ref_rows_only else case.ref_hidden
    unfused = sarft_loss(
        project(case.hidden, case.head),
        project(ref_hidden, case.ref_head).detach(),
        case.labels,
        case.attention,
        case.flags,
        **settings,  # type: ignore[arg-type]
    )
    fused = fused_sarft_loss(
        case.hidden,
        case.head,
        ref_hidden,
        case.ref_head,
        case.labels,
        case.attention,
        case.flags,
        chunk_rows=3,
        **settings,  # type: ignore[arg-type]
    )
    return unfused, fused


def assert_same(case: Case, unfused: LossParts, fused: LossParts, rtol: float, atol: float) -> None:
    for name in ("total", "ce", "kl"):
        want, got = getattr(unfused, name), getattr(fused, name)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol, msg=name)
    for want, got in zip(grads(case, unfused), grads(case, fused), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
@pytest.mark.parametrize("positions", ["all", "response"])
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_fused_loss_and_gradients_equal_the_unfused_ones(
    direction: str, positions: str, full: bool
) -> None:
    case = make_case(torch.float64, full=full, bias=full)
    unfused, fused = both(case, lam=0.5, direction=direction, positions=positions)
    assert float(fused.kl) > 0
    assert_same(case, unfused, fused, rtol=1e-10, atol=1e-12)


def test_the_backward_scales_its_buffers_and_keeps_none_of_them() -> None:
    """The chunks' gradient buffers become the gradients: scaled by the upstream gradient,
    and no longer held by the loss's graph (which the step keeps until its end, so a full
    fine-tuning head's [V, H] gradient would exist twice). A second backward is refused
    rather than handed buffers already given away."""
    for scale in (-2.5, 0.0):
        case = make_case(torch.float64, full=True, bias=True)
        unfused, fused = both(case, lam=0.5)
        want = torch.autograd.grad(unfused.total * scale, leaves(case))
        got = torch.autograd.grad(fused.total * scale, leaves(case), retain_graph=True)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        node: Any = fused.total.grad_fn  # the function's ctx
        assert node is not None and node.grads is None
        with pytest.raises(RuntimeError, match="runs once"):
            torch.autograd.grad(fused.total, leaves(case))


@pytest.mark.parametrize("normalization", ["sample_tokens", "response_tokens"])
def test_fused_loss_keeps_the_step_denominators(normalization: str) -> None:
    """Gradient accumulation passes the whole step's counts: the fused loss uses them too."""
    case = make_case(torch.float64, full=True, bias=False, seed=1)
    sample_tokens = case.attention.sum(1) if normalization == "sample_tokens" else None
    unfused, fused = both(
        case,
        lam=0.7,
        num_response_tokens=40,
        num_rows=16,
        sample_tokens=sample_tokens,
        ref_rows_only=True,
    )
    assert_same(case, unfused, fused, rtol=1e-10, atol=1e-12)


def test_fused_loss_without_flagged_rows_needs_no_reference() -> None:
    case = make_case(torch.float64, full=True, bias=True, seed=2)
    case.flags = torch.zeros(B, dtype=torch.long)
    unfused = sarft_loss(
        project(case.hidden, case.head), None, case.labels, case.attention, case.flags, lam=0.5
    )
    fused = fused_sarft_loss(
        case.hidden,
        case.head,
        None,
        None,
        case.labels,
        case.attention,
        case.flags,
        lam=0.5,
        chunk_rows=2,
    )
    assert float(fused.kl) == 0.0
    assert_same(case, unfused, fused, rtol=1e-10, atol=1e-12)


def test_fused_loss_in_float32_and_under_bfloat16_autocast() -> None:
    """float32 agrees to float32 rounding; under autocast both run the head in bfloat16, so
    they agree to bfloat16's (the order of the sums differs)."""
    case = make_case(torch.float32, full=True, bias=False, seed=3)
    unfused, fused = both(case, lam=0.5, ref_rows_only=True)
    assert_same(case, unfused, fused, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", torch.bfloat16):
        unfused, fused = both(case, lam=0.5, ref_rows_only=True)
    assert_same(case, unfused, fused, rtol=2e-2, atol=2e-3)


def test_fused_loss_without_gradients_matches_and_builds_no_graph() -> None:
    case = make_case(torch.float64, full=True, bias=True, seed=4)
    with torch.no_grad():
        unfused, fused = both(case, lam=0.5)
    assert not fused.total.requires_grad
    for name in ("total", "ce", "kl"):
        torch.testing.assert_close(getattr(fused, name), getattr(unfused, name))


def test_fused_loss_refuses_flagged_rows_without_a_reference() -> None:
    case = make_case(torch.float64, full=False, bias=False)
    with pytest.raises(ValueError, match="reference hidden states"):
        fused_sarft_loss(
            case.hidden, case.head, None, None, case.labels, case.attention, case.flags, lam=0.5
        )


# --- in the trainer ------------------------------------------------------------------------------


def train_two_steps(
    tiny_model: Any, tiny_tokenizer: Any, out: Path, **overrides: Any
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES, quick_config

    config = quick_config(max_steps=2, **overrides)
    model = copy.deepcopy(tiny_model)
    result = fine_tune(model, tiny_tokenizer, SAMPLES, FLAGS, PROMPTS, config, out)
    weights = {k: v.detach().clone() for k, v in result.model.named_parameters()}
    return result.history, weights


@pytest.mark.parametrize(
    ("lora", "positions", "dtype"),
    [
        (LoraSettings(r=8, alpha=16, dropout=0.0), "all", "float32"),
        (None, "all", "float32"),
        (None, "response", "float32"),
        (LoraSettings(r=8, alpha=16, dropout=0.0), "all", "bfloat16"),
    ],
    ids=["lora-all", "full-all", "full-response", "lora-bf16"],
)
def test_training_with_the_fused_loss_takes_the_unfused_steps(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path, lora: Any, positions: str, dtype: str
) -> None:
    settings = {"lora": lora, "kl_positions": positions, "dtype": dtype}
    if lora is None:
        settings["learning_rate"] = 1e-3
    fused, fused_weights = train_two_steps(
        tiny_model, tiny_tokenizer, tmp_path / "fused", **settings
    )
    unfused, unfused_weights = train_two_steps(
        tiny_model, tiny_tokenizer, tmp_path / "unfused", fused_loss=False, **settings
    )
    assert fused[-1]["kl"] > 0  # the second step starts away from the reference
    rel, atol = (1e-5, 1e-6) if dtype == "float32" else (2e-2, 1e-3)
    for got, expected in zip(fused, unfused, strict=True):
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=rel, abs=atol), key
    # Adam's early updates are about lr * sign(gradient): an element whose gradient is near 0
    # moves by a good part of lr on float noise, so the weights are held to a tenth of lr.
    lr = 1e-3 if lora is None else 1e-2
    if dtype == "float32":
        for name, weight in unfused_weights.items():
            torch.testing.assert_close(fused_weights[name], weight, rtol=0, atol=0.1 * lr, msg=name)
        return
    # In bf16 the noise can flip the sign of a near-zero gradient, and such an element's two
    # updates then differ by up to Adam's bound (about lr a step): 3 of 3,584 LoRA elements on
    # one host. Nearly all (99%) must still agree to a tenth of lr.
    trained = [n for n in unfused_weights if "lora_" in n]
    diffs = torch.cat([(fused_weights[n] - unfused_weights[n]).abs().flatten() for n in trained])
    assert diffs.max().item() <= 2 * 2 * lr
    assert (diffs > 0.1 * lr).float().mean().item() <= 1e-2
    frozen = [n for n in unfused_weights if n not in trained]
    for name in frozen:
        assert torch.equal(fused_weights[name], unfused_weights[name]), name


def test_the_plan_fuses_only_a_plain_head_that_gives_the_models_logits(
    tiny_model: Any,
) -> None:
    model = copy.deepcopy(tiny_model)
    plan = forward_plan(model, model, fused=True)
    assert plan.fused and plan.head is not None
    assert plan.head.weight is model.get_output_embeddings().weight
    assert not forward_plan(model, model, fused=False).fused

    reference = copy.deepcopy(tiny_model)
    assert forward_plan(model, reference, fused=True).ref_head.weight is (  # type: ignore[union-attr]
        reference.get_output_embeddings().weight
    )

    adapted = get_peft_model(
        copy.deepcopy(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
    )
    assert not forward_plan(adapted, adapted, fused=True).fused

    scaled = copy.deepcopy(tiny_model)
    plain_forward = scaled.forward

    def scaled_forward(*args: Any, **kwargs: Any) -> Any:
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 0.5  # a logit scale, as some architectures apply
        return out

    scaled.forward = scaled_forward
    assert not forward_plan(scaled, scaled, fused=True).fused


def test_chunks_hold_about_the_same_logits_whatever_the_vocabulary() -> None:
    assert chunk_rows_for(49_152) == 128  # SmolLM2: the cap
    assert chunk_rows_for(151_936) == 55  # Qwen2.5
    assert chunk_rows_for(128_256) == 65  # Llama 3
    assert chunk_rows_for(2**22) == 32  # the floor, past which chunks are memory-bound
