"""The reference cache: the live reference's states, and training that does not notice it."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.policy_setup as policy_setup
import trainer.train as train_module
from tests.trainer.test_checkpoints import assert_same_steps
from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES, count_forwards, quick_config
from trainer.data import collate, encode_examples, pad_token_id, step_batches
from trainer.forward import outputs
from trainer.reference_cache import CachedReference, cache_bytes
from trainer.train import TrainResult, fine_tune


def live_reference(model: Any) -> Any:
    def reference(batch: Any, keep: int, hidden: bool) -> torch.Tensor:
        with torch.no_grad():
            return outputs(model, batch, keep, hidden)

    return reference


def test_cached_states_equal_the_live_ones_whatever_the_padding(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    tiny_model.eval()
    flags = [1, 1, 0, 1, 0, 1]
    examples = encode_examples(SAMPLES[:6], flags, tiny_tokenizer, PROMPTS)
    pad = pad_token_id(tiny_tokenizer)
    live = live_reference(tiny_model)
    cache = CachedReference.build(live, examples, pad, torch.device("cpu"), batch_rows=3)
    assert len(cache.states) == 4
    assert cache.nbytes == cache_bytes(examples, tiny_model.config.hidden_size)

    # The flagged rows, padded to the width of a longer unflagged one as a micro-batch would be.
    longest = max(range(6), key=lambda i: len(examples[i].input_ids))
    batch = collate([examples[i] for i in (3, longest, 0, 5)], pad).rows(torch.tensor([0, 2, 3]))
    width = batch.input_ids.shape[1]
    for keep in (width, width - 5):
        cached, expected = cache(batch, keep, True), live(batch, keep, True)
        assert cached.shape == expected.shape
        real = batch.attention_mask[:, width - keep :].bool()
        torch.testing.assert_close(cached[real], expected[real], rtol=0, atol=1e-5)
        assert not torch.equal(cached[real][:1], expected[real][1:2])  # rows really differ


def test_a_row_outside_the_cache_needs_the_live_reference(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    tiny_model.eval()
    examples = encode_examples(SAMPLES[:4], [1, 0, 0, 0], tiny_tokenizer, PROMPTS)
    pad = pad_token_id(tiny_tokenizer)
    live = live_reference(tiny_model)
    unflagged = collate(examples[1:3], pad)
    strict = CachedReference.build(live, examples, pad, torch.device("cpu"), batch_rows=4)
    with pytest.raises(KeyError, match="not in the cache"):
        strict(unflagged, unflagged.input_ids.shape[1], True)
    lenient = CachedReference(strict.states, fallback=live)
    width = unflagged.input_ids.shape[1]
    torch.testing.assert_close(lenient(unflagged, width, True), live(unflagged, width, True))
    # Logits (the unfused loss) are never cached: the live reference gives them.
    flagged = collate(examples[:1], pad)
    torch.testing.assert_close(lenient(flagged, 3, False), live(flagged, 3, False))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_with_the_cache_takes_the_steps_training_without_it_takes(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path, mode: str
) -> None:
    """Two epochs (every flagged row's cached states are read twice) and a validation set with
    flagged rows of its own: losses, gradient norms and weights as with the live reference."""
    lora = {} if mode == "lora" else {"lora": None, "learning_rate": 1e-3}
    runs: dict[bool, TrainResult] = {}
    for use_cache in (False, True):
        config = quick_config(n_epochs=2, cache_reference=use_cache, **lora)
        model = copy.deepcopy(tiny_model)
        runs[use_cache] = fine_tune(
            model, tiny_tokenizer, SAMPLES[:12], FLAGS[:12], PROMPTS, config,
            tmp_path / str(use_cache), validation=SAMPLES[12:], validation_flags=FLAGS[12:],
        )  # fmt: skip
    live, cached = runs[False], runs[True]
    assert live.steps == cached.steps == 4
    assert live.final["kl"] > 0 and live.final["valid_kl"] > 0
    assert_same_steps(live, cached, rel=1e-5, abs_tol=1e-8, weights_atol=1e-5)


def test_full_finetuning_with_the_cache_drops_the_frozen_copy_and_its_forwards(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = copy.deepcopy(tiny_model)
    copies: list[weakref.ref[Any]] = []
    real_frozen_copy = policy_setup.frozen_copy

    def capture(m: Any) -> Any:
        reference = real_frozen_copy(m)
        copies.append(weakref.ref(reference))
        return reference

    monkeypatch.setattr(policy_setup, "frozen_copy", capture)
    calls = count_forwards(model)  # the frozen copy's decoder inherits the hook
    per_step: list[int] = []
    alive: list[bool] = []

    def on_step(_metrics: Any) -> None:
        per_step.append(len(calls))
        gc.collect()
        alive.append(copies[0]() is not None)

    config = quick_config(lora=None, learning_rate=1e-3, n_epochs=2)  # a step per epoch
    result = fine_tune(
        model, tiny_tokenizer, SAMPLES[:8], FLAGS[:8], PROMPTS, config, tmp_path, on_step=on_step
    )
    assert result.final["kl"] > 0
    assert alive == [False, False]
    # Two micro-batches of 4 in step 2, each one policy forward: no reference forward.
    assert per_step[1] - per_step[0] == 2


def test_a_capped_run_caches_only_the_rows_its_steps_read(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached: list[list[Any]] = []
    real_cached_reference = train_module.cached_reference

    def capture(reference: Any, model: Any, policy: Any, examples: Any, *rest: Any) -> Any:
        cached.append(list(examples))
        return real_cached_reference(reference, model, policy, examples, *rest)

    monkeypatch.setattr(train_module, "cached_reference", capture)
    config = quick_config(max_steps=1)  # one step of 8 out of an epoch of 16
    examples = encode_examples(SAMPLES[:16], FLAGS[:16], tiny_tokenizer, PROMPTS)
    (first_step,) = step_batches(examples, 8, 1, config.seed)
    fine_tune(
        copy.deepcopy(tiny_model), tiny_tokenizer, SAMPLES[:16], FLAGS[:16], PROMPTS, config,
        tmp_path,
    )  # fmt: skip
    assert [e.input_ids for e in cached[0]] == [e.input_ids for e in first_step]
    assert any(e.kl_flag for e in first_step)
