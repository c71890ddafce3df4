"""Full fine-tuning of a model whose input embedding is its LM head (as SmolLM2's): the
embedding's gradient is handed over sparse, so no second dense [V, H] tensor is made."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.policy_setup as policy_setup
import trainer.steps as steps
import trainer.train as train_module
from tests.conftest import build_tiny_model
from tests.trainer.test_checkpoints import assert_same_steps
from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES, quick_config
from trainer.data import collate, encode_examples, pad_token_id
from trainer.forward import sparse_tied_embedding_gradient
from trainer.train import TrainResult, fine_tune


def tied_model(tokenizer: Any) -> Any:
    model = build_tiny_model(tokenizer, tie_word_embeddings=True)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return model


def test_only_a_trained_embedding_tied_to_the_head_is_switched(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    tied = tied_model(tiny_tokenizer)
    assert sparse_tied_embedding_gradient(tied) and tied.get_input_embeddings().sparse
    # Untied, its gradient alone would be stored sparse, which AdamW refuses.
    untied = copy.deepcopy(tiny_model)
    assert not sparse_tied_embedding_gradient(untied)
    assert not untied.get_input_embeddings().sparse
    frozen = tied_model(tiny_tokenizer).requires_grad_(False)
    assert not sparse_tied_embedding_gradient(frozen)


def test_several_processes_keep_the_dense_gradient(tiny_tokenizer: Any) -> None:
    """DDP and FSDP expect a sparse-mode embedding's gradient to arrive sparse; a tied one's
    arrives dense (summed with the head's)."""
    config = quick_config(lora=None, learning_rate=1e-3)
    for world, sparse in ((1, True), (2, False)):
        model = tied_model(tiny_tokenizer)
        policy_setup.prepare_policy(model, config, None, world)
        assert model.get_input_embeddings().sparse is sparse


def micro_batch_gradients(
    tokenizer: Any, fused: bool, sparse: bool
) -> tuple[dict[str, torch.Tensor], list[bool], list[bool]]:
    """A full fine-tuning micro-batch's gradients with the embedding in ``sparse`` mode, and
    whether the embedding's backward sent, and the weight stored, a sparse gradient."""
    config = quick_config(lora=None, learning_rate=1e-3, fused_loss=fused)
    examples = encode_examples(SAMPLES[:4], FLAGS[:4], tokenizer, PROMPTS)
    batch = collate(examples, pad_token_id(tokenizer))
    tokens = sum(e.num_response_tokens for e in examples)
    model = tied_model(tokenizer)
    policy, reference, reference_model = policy_setup.prepare_policy(model, config, None)
    torch.manual_seed(7)
    with torch.no_grad():  # away from the frozen copy, so the KL and its gradient are not 0
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    embedding = model.get_input_embeddings()
    embedding.sparse = sparse
    plan = train_module.forward_plan(policy, reference_model, fused)
    assert plan.fused is fused
    sent: list[bool] = []
    stored: list[bool] = []

    def on_output(_module: Any, _inputs: Any, out: torch.Tensor) -> None:
        # The embedding's own backward node: its gradient for the weight.
        assert out.grad_fn is not None
        out.grad_fn.register_hook(lambda grads, _: sent.append(grads[0].is_sparse))

    handles = [
        embedding.register_forward_hook(on_output),
        embedding.weight.register_hook(lambda g: stored.append(g.is_sparse)),  # the sum
    ]
    try:
        parts = steps.micro_batch_loss(
            policy, reference, batch, config, plan, tokens, len(examples), False
        )
        assert float(parts.kl.detach()) > 0
        parts.total.backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return grads, sent, stored


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_the_embedding_sends_rows_and_the_stored_gradient_is_dense(
    tiny_tokenizer: Any, fused: bool
) -> None:
    """The embedding's backward gives a sparse gradient, the stored one is dense (as AdamW
    needs), and it equals the dense-mode gradient of the same micro-batch (float sums in
    another order: rtol 1e-6)."""
    dense, sent, stored = micro_batch_gradients(tiny_tokenizer, fused, sparse=False)
    assert sent == [False] and stored == [False]
    sparse, sent, stored = micro_batch_gradients(tiny_tokenizer, fused, sparse=True)
    assert sent == [True] and stored == [False]
    assert all(g.layout == torch.strided for g in sparse.values())
    assert sparse.keys() == dense.keys()
    for name, want in dense.items():
        torch.testing.assert_close(sparse[name], want, rtol=1e-6, atol=1e-8, msg=name)


def test_full_finetuning_of_a_tied_model_takes_the_dense_mode_steps(
    tiny_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two epochs with validation through fine_tune(): losses, gradient norms and weights as
    with the embedding's dense gradient."""
    runs: dict[bool, TrainResult] = {}
    for sparse in (True, False):
        if not sparse:
            monkeypatch.setattr(policy_setup, "sparse_tied_embedding_gradient", lambda m: False)
        config = quick_config(lora=None, learning_rate=1e-3, n_epochs=2)
        model = tied_model(tiny_tokenizer)
        runs[sparse] = fine_tune(
            model, tiny_tokenizer, SAMPLES[:12], FLAGS[:12], PROMPTS, config,
            tmp_path / str(sparse), validation=SAMPLES[12:], validation_flags=FLAGS[12:],
        )  # fmt: skip
        assert model.get_input_embeddings().sparse is sparse
    dense, sparse_run = runs[False], runs[True]
    assert dense.steps == sparse_run.steps == 4 and dense.final["kl"] > 0
    assert_same_steps(dense, sparse_run, rel=1e-5, abs_tol=1e-8, weights_atol=1e-5)
