"""The start-up checks hold every scoring path to a plain forward of the whole sequence.

Each test builds its own tiny model: the checks run once per model and are cached in
``_PATHS``, so a shared model would carry one test's results (and its fused weights) into
the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import transformers

from tests.conftest import TINY_SHAPE, reference_span_sum
from worker.encoding import ChatEncoder, EncodedSequence
from worker.formats import Sample
from worker.prompts import Condition, RolePrompts
from worker.scoring import fused_llama, prefix_attention
from worker.scoring.path_checks import (
    CACHE,
    FUSED_PLAIN,
    FUSED_PREFIX,
    PLAIN,
    PREFIX_ATTENTION,
    ScoringPathError,
)
from worker.scoring.transformers_backend import _PATHS, TransformersScorer

TOL = 1e-4
ALL_PATHS = {CACHE, PLAIN, PREFIX_ATTENTION, FUSED_PREFIX, FUSED_PLAIN}
MODULE_PATHS = {CACHE, PLAIN, PREFIX_ATTENTION}  # where the fused forward does not apply

Factory = Callable[..., Any]


@pytest.fixture
def new_model(tiny_tokenizer: Any) -> Iterator[Factory]:
    """Builds fresh tiny Llamas (``gelu=True``: one the fused forward does not support)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    made: list[Any] = []

    def make(gelu: bool = False) -> Any:
        config = LlamaConfig(
            **TINY_SHAPE,
            vocab_size=len(tiny_tokenizer),
            pad_token_id=tiny_tokenizer.pad_token_id,
            hidden_act="gelu" if gelu else "silu",
        )
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config).float().eval()
        made.append(model)
        return model

    yield make
    for model in made:
        _PATHS.pop(model, None)


@pytest.fixture
def sequences(
    tiny_tokenizer: Any, sarft_prompts: RolePrompts, rolebench_rows: list[Sample]
) -> list[EncodedSequence]:
    encoder = ChatEncoder(tiny_tokenizer, sarft_prompts)
    seqs = [encoder.encode(s, c) for s in rolebench_rows[:2] for c in Condition]
    assert any(s.shared_len > 0 for s in seqs)  # the prefix paths are exercised
    return seqs


def assert_scores_match_plain_forward(
    scorer: TransformersScorer, sequences: list[EncodedSequence]
) -> None:
    for seq, got in zip(sequences, scorer.score(sequences), strict=True):
        want = reference_span_sum(scorer.model, seq.token_ids, seq.response_spans)
        assert abs(got.mean - want / seq.num_response_tokens) <= TOL


def errors(model: Any) -> dict[str, float]:
    return {c.path: c.error for c in _PATHS[model].checks}


def drop_cache_argument(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transformers 5.19 failure: the decoder took ``past_key_values=``, so the
    scorer's ``cache=`` fell into ``**kwargs`` and the prefix was silently dropped."""
    forward = model.model.forward

    def without_cache(*args: Any, cache: Any = None, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", without_cache)


@pytest.mark.parametrize("gelu", [False, True], ids=["fused", "module"])
def test_a_healthy_model_passes_every_check(
    new_model: Factory, sequences: list[EncodedSequence], gelu: bool
) -> None:
    model = new_model(gelu=gelu)
    scorer = TransformersScorer(model, batch_size=4)
    paths = _PATHS[model]
    assert set(errors(model)) == (MODULE_PATHS if gelu else ALL_PATHS)
    assert all(e <= paths.tolerance for e in errors(model).values()), errors(model)
    assert paths.tolerance == TOL  # fp32: the model's own batch-shape noise is far below it
    assert (scorer.fused is None) is gelu
    assert scorer.shared_prefix_attention
    assert_scores_match_plain_forward(scorer, sequences)
    assert_scores_match_plain_forward(TransformersScorer(model, reuse_prefix=False), sequences)


def test_a_cache_path_that_drops_the_prefix_refuses_to_score(
    new_model: Factory, sequences: list[EncodedSequence], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no fused forward the prefix keys and (with shared-prefix attention off) the
    scores come from the cache path: a wrong one must stop the scorer, not be trusted."""
    model = new_model(gelu=True)
    drop_cache_argument(model, monkeypatch)
    with pytest.raises(ScoringPathError) as raised:
        TransformersScorer(model)
    message = str(raised.value)
    assert f"transformers {transformers.__version__}" in message
    assert "LlamaForCausalLM" in message
    assert CACHE in message and "reuse_prefix=False" in message
    assert errors(model)[CACHE] > 0.1  # the whole system prompt is missing, not rounding
    # The cached results still refuse a scorer that needs the cache path ...
    with pytest.raises(ScoringPathError):
        TransformersScorer(model)
    # ... and serve one that does not, as the message advises.
    assert_scores_match_plain_forward(TransformersScorer(model, reuse_prefix=False), sequences)


def test_a_broken_cache_path_goes_unused_beside_a_fused_forward_that_agrees(
    new_model: Factory,
    sequences: list[EncodedSequence],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under the 5.19 failure the fused forward was right and the cache path wrong: held to
    the plain forward, the fused forward is kept and scores correctly."""
    model = new_model()
    drop_cache_argument(model, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="worker.scoring.path_checks"):
        scorer = TransformersScorer(model, batch_size=4)
    assert scorer.fused is not None
    assert errors(model)[CACHE] > 0.1
    assert f"{CACHE} off by" in caplog.text
    assert_scores_match_plain_forward(scorer, sequences)


def test_a_batched_forward_that_mixes_rows_refuses_to_score(
    new_model: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward without a prefix serves every scorer without a fused forward."""
    model = new_model(gelu=True)
    forward = model.model.forward

    def rows_swapped(*args: Any, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if kwargs.get("cache") is None and input_ids.shape[0] > 1:
            input_ids = input_ids.flip(0)
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model.model, "forward", rows_swapped)
    with pytest.raises(ScoringPathError) as raised:
        TransformersScorer(model, reuse_prefix=False)
    message = str(raised.value)
    assert PLAIN in message and transformers.__version__ in message
    assert "reuse_prefix=False" not in message  # it would not help


def wrong_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x.clone()  # positions ignored


def prefix_ignored(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    return prefix_attention.attend_causal(query, key, value, scale)


@pytest.mark.parametrize(
    "broken",
    [{"fused"}, {"prefix attention"}, {"fused", "prefix attention"}],
    ids=["fused", "prefix-attention", "both"],
)
def test_a_fast_path_that_disagrees_is_dropped(
    new_model: Factory,
    sequences: list[EncodedSequence],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    broken: set[str],
) -> None:
    """The fast path goes, with a warning; the scores still match the plain forward."""
    if "fused" in broken:
        monkeypatch.setattr(fused_llama, "_rotary", wrong_rotary)
    if "prefix attention" in broken:
        # The fused forward holds its own reference to the function: it stays correct.
        monkeypatch.setattr(prefix_attention, "attend_with_prefix", prefix_ignored)
    model = new_model()
    with caplog.at_level(logging.WARNING, logger="worker.scoring.path_checks"):
        scorer = TransformersScorer(model, batch_size=4)
    assert (scorer.fused is None) == ("fused" in broken)
    assert scorer.shared_prefix_attention == ("prefix attention" not in broken)
    tolerance = _PATHS[model].tolerance
    failed = {path for path, e in errors(model).items() if e > tolerance}
    expected = {PREFIX_ATTENTION} if "prefix attention" in broken else set()
    if "fused" in broken:
        expected |= {FUSED_PREFIX, FUSED_PLAIN}
    assert failed == expected
    for path in failed:
        assert f"{path} off by" in caplog.text
    assert_scores_match_plain_forward(scorer, sequences)
