"""The lean Llama-family forward: same scores as a full forward, model left intact, fallbacks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import ALL_CONDITIONS, TINY_SHAPE, reference_span_sum
from worker.encoding import ChatEncoder
from worker.formats import Sample
from worker.prompts import RolePrompts
from worker.scoring import fused_llama
from worker.scoring.fused_llama import Segment
from worker.scoring.transformers_backend import TransformersScorer

TOL = 1e-4


def tiny(kind: str, vocab: int, **overrides: Any) -> Any:
    """A 2-layer random model of ``kind`` with visible context effects and random biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape: dict[str, Any] = {**TINY_SHAPE, "vocab_size": vocab, **overrides}
    torch.manual_seed(99)
    if kind == "qwen2":
        model: Any = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.2)  # initialised to zero: make them matter
    return model.float().eval()


def check_against_full_forward(
    model: Any, tokenizer: Any, prompts: RolePrompts, samples: list[Sample]
) -> TransformersScorer:
    encoder = ChatEncoder(tokenizer, prompts)
    sequences = [encoder.encode(s, c) for s in samples for c in ALL_CONDITIONS]
    scorer = TransformersScorer(model, batch_size=4)
    got = scorer.score(sequences)
    for seq, result in zip(sequences, got, strict=True):
        want = reference_span_sum(model, seq.token_ids, seq.response_spans)
        assert abs(result.mean - want / seq.num_response_tokens) <= TOL
    return scorer


@pytest.mark.parametrize(
    ("kind", "overrides", "fused"),
    [
        ("llama", {}, True),
        ("llama", {"attention_bias": True}, True),  # q, k, v and o biases
        ("qwen2", {}, True),  # q, k and v biases
        ("llama", {"hidden_act": "gelu"}, False),  # not the gated-SiLU MLP: module path
        ("llama", {"num_key_value_heads": 4}, True),  # no grouped heads
    ],
)
def test_scores_match_a_full_forward(
    tiny_tokenizer: Any,
    sarft_prompts: RolePrompts,
    rolebench_rows: list[Sample],
    kind: str,
    overrides: dict[str, Any],
    fused: bool,
) -> None:
    model = tiny(kind, len(tiny_tokenizer), **overrides)
    assert fused_llama.supports(model) is fused
    scorer = check_against_full_forward(model, tiny_tokenizer, sarft_prompts, rolebench_rows[:3])
    assert (scorer.fused is not None) is fused


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def test_model_keeps_its_weights_and_outputs(tiny_tokenizer: Any) -> None:
    """Fusing re-points the model's projections at the fused weights: same values, no copy."""
    model = tiny("llama", len(tiny_tokenizer), attention_bias=True)
    ids = torch.arange(5, 40)[None]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    scorer = TransformersScorer(model)
    assert scorer.fused is not None
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    attn = model.model.layers[0].self_attn
    fused = scorer.fused.layers[0]
    assert fused.qkv_bias is not None
    assert same_storage(attn.q_proj.weight, fused.qkv)
    assert same_storage(attn.v_proj.weight, fused.qkv)
    assert same_storage(attn.k_proj.bias, fused.qkv_bias)
    # A second scorer on the same model reuses the start-up checks and the fused weights.
    assert TransformersScorer(model).fused is scorer.fused
    # New parameter tensors (a round trip through fp64) are checked and fused again.
    model.double().float()
    assert not same_storage(attn.q_proj.weight, fused.qkv)
    again = TransformersScorer(model)
    assert again.fused is not None and again.fused is not scorer.fused
    assert same_storage(attn.q_proj.weight, again.fused.layers[0].qkv)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_a_forward_that_disagrees_falls_back(
    tiny_tokenizer: Any,
    sarft_prompts: RolePrompts,
    rolebench_rows: list[Sample],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start-up check compares the fused forward with the module path, not just the type."""
    model = tiny("llama", len(tiny_tokenizer))

    def wrong(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x.clone()  # positions ignored

    monkeypatch.setattr(fused_llama, "_rotary", wrong)
    scorer = check_against_full_forward(model, tiny_tokenizer, sarft_prompts, rolebench_rows[:2])
    assert scorer.fused is None


def test_forward_runs_outside_inference_mode(tiny_tokenizer: Any) -> None:
    """Weights that require grad (as loaded) must not trip the matmuls that write in place."""
    model = tiny("llama", len(tiny_tokenizer))
    scorer = TransformersScorer(model)
    assert scorer.fused is not None
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.arange(5, 17).reshape(2, 6)
    hidden = scorer.fused.forward(ids, torch.arange(6).expand(2, -1), [Segment(0, 2, None)])
    with torch.inference_mode():
        want = model.model(input_ids=ids).last_hidden_state
    assert float((hidden - want).abs().max()) <= 1e-4 * float(want.abs().max())
