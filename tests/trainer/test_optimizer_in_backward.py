"""AdamW stepped inside the backward: the steps of AdamW without clipping, with at most one
parameter holding a gradient at any time, and checkpoints in AdamW's own layout (a resumed
run is in test_checkpoints.py)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.policy_setup as policy_setup
import trainer.steps as steps
import trainer.train as train_module
from tests.conftest import build_tiny_model
from tests.trainer.test_checkpoints import assert_same_steps, run
from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES, in_backward, quick_config
from trainer.config import LoraSettings
from trainer.data import collate, encode_examples, pad_token_id
from trainer.optimizers import AdamWInBackward, adamw


@pytest.mark.parametrize(
    ("tied", "lora", "recompute"),
    [(False, False, False), (True, False, False), (False, False, True), (False, True, False)],
    ids=["full", "full-tied", "full-checkpointing", "lora"],
)
def test_training_takes_the_steps_of_adamw_without_clipping(
    tiny_tokenizer: Any, tmp_path: Path, tied: bool, lora: bool, recompute: bool
) -> None:
    """Two epochs with validation and checkpoints through fine_tune(): losses, gradient
    norms and weights as AdamW's after the backward with max_grad_norm None. The tied model's
    embedding sends its gradient sparse into the head's (one gradient, one update); with
    gradient checkpointing each block's parameters are updated after its recomputation."""
    model = build_tiny_model(tiny_tokenizer, tie_word_embeddings=tied)
    settings = LoraSettings(r=8, alpha=16) if lora else None
    config = in_backward(
        lora=settings, learning_rate=1e-2 if lora else 1e-3, gradient_checkpointing=recompute
    )
    after = dataclasses.replace(config, optimizer_in_backward=False)
    runs = {
        c.optimizer_in_backward: run(model, tiny_tokenizer, tmp_path / str(i), c)
        for i, c in enumerate((config, after))
    }
    stepped, plain = runs[True], runs[False]
    assert plain.steps == stepped.steps == 6 and plain.final["kl"] > 0
    assert_same_steps(plain, stepped, rel=1e-6, abs_tol=1e-9, weights_atol=1e-6)


def test_at_most_one_parameter_holds_a_gradient_during_the_backward(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    """AdamW after the backward holds every gradient at its end; in the backward each is
    applied and freed as soon as it is complete, including the fused loss's head gradient."""
    config = in_backward()
    examples = encode_examples(SAMPLES[:4], FLAGS[:4], tiny_tokenizer, PROMPTS)
    batch = collate(examples, pad_token_id(tiny_tokenizer))
    tokens = sum(e.num_response_tokens for e in examples)
    held: dict[bool, list[int]] = {}
    for stepped in (True, False):
        model = copy.deepcopy(tiny_model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        policy, reference, reference_model = policy_setup.prepare_policy(model, config, None)
        plan = train_module.forward_plan(policy, reference_model, True)
        assert plan.fused
        params = [p for p in policy.parameters() if p.requires_grad]
        counts: list[int] = []

        def count(_: torch.Tensor, counts: list[int] = counts, params: list[Any] = params) -> None:
            counts.append(sum(q.grad is not None for q in params))

        # Registered first, so they run before the optimizer's: the gradients held as each
        # one completes.
        for p in params:
            p.register_post_accumulate_grad_hook(count)
        optimizer = AdamWInBackward(params, 1e-3, 0.0) if stepped else adamw(params, 1e-3, 0.0)
        parts = steps.micro_batch_loss(
            policy, reference, batch, config, plan, tokens, len(examples), False
        )
        parts.total.backward()
        held[stepped] = counts
        if isinstance(optimizer, AdamWInBackward):
            assert all(p.grad is None for p in params)
            assert optimizer.take_grad_norm() > 0 and optimizer.take_grad_norm() == 0
            changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
            assert len(changed) == len(params)  # every parameter updated, once the backward ends
            assert all(int(s["step"]) == 1 for s in optimizer.state_dict()["state"].values())
            optimizer.close()
    assert len(held[True]) == len(held[False]) == len(list(tiny_model.parameters()))
    assert max(held[True]) == 1
    assert held[False][-1] == len(held[False])


def test_its_state_is_adamws() -> None:
    """The layout checkpoints store (a resumed run: test_checkpoints.py's full-in-backward)."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    stepped, plain = AdamWInBackward(params, 1e-2, 0.1), adamw(twins, 1e-2, 0.1)
    for _ in range(2):
        sum((p * p).sum() for p in params).backward()  # type: ignore[union-attr]
        sum((p * p).sum() for p in twins).backward()  # type: ignore[union-attr]
        plain.step()
        plain.zero_grad()
    mine, theirs = stepped.state_dict(), plain.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys() == {0, 1}
    for index, state in theirs["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(mine["state"][index][key], value, rtol=0, atol=0)
    loaded = AdamWInBackward([torch.nn.Parameter(p.detach().clone()) for p in params], 1.0, 0.0)
    loaded.load_state_dict(theirs)
    assert loaded.state_dict()["param_groups"] == theirs["param_groups"]
    with pytest.raises(ValueError, match="holds 2 parameters, this optimizer 1"):
        AdamWInBackward(params[:1], 1e-2, 0.0).load_state_dict(theirs)


def test_it_needs_no_clipping_and_one_micro_batch_per_step() -> None:
    with pytest.raises(ValueError, match="set max_grad_norm to None"):
        in_backward(max_grad_norm=1.0)
    with pytest.raises(ValueError, match="set micro_batch_size to batch_size"):
        in_backward(micro_batch_size=2)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        quick_config(max_grad_norm=0.0)
