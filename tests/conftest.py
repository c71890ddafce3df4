"""Shared fixtures and the plain reference scorer for the scoring tests.

The reference follows the SaRFT authors' code: the prompt is the chat template rendered with the
condition's system message and a generation prompt, tokenized without special tokens and cut to
its first 512 tokens; the label is ``answer + eos_token`` tokenized on its own and cut to its
first 128 tokens; the score is the mean log-softmax probability of the label tokens from one
plain full forward over ``prompt + label`` with full-vocabulary logits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.formats import Message, Sample
from worker.model_loader import LoadedModel, load_model, materialize_bundled
from worker.prompts import Condition, RolePrompts

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROLEBENCH_FILE = SHARED_DATA / "rolebench" / "role_generalization_role_specific.jsonl"
SARFT_PROMPTS_FILE = SHARED_DATA / "sarft" / "role_prompts_v2.json"
ROLE_NAME = "Jack Sparrow"
NUM_ROWS = 12

# `make test` runs the suite on two pytest-xdist workers: each takes its share of the cores,
# for itself and for the servers and workers it starts, since two processes that each run
# torch on every core slow each other several-fold.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))
    os.environ["OMP_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))


def model_cache_dir() -> Path:
    """Where the bundled model is converted once and reused across test runs.

    ``$SARFT_HOME/models`` when SARFT_HOME is set (what load_model uses by default), otherwise
    ``$SARFT_TEST_CACHE/models`` (default ``~/.cache/sarft-test/models``).
    """
    home = os.environ.get("SARFT_HOME")
    if home:
        return Path(home).expanduser() / "models"
    return (
        Path(os.environ.get("SARFT_TEST_CACHE", Path.home() / ".cache" / "sarft-test")) / "models"
    )


# A chat template with no system role, like Gemma's or Mistral's: it raises on a system message.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- the plain reference ---------------------------------------------------------------------


def render_prompt(tokenizer: Any, system: str, question: str, supports_system: bool) -> str:
    if supports_system:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    else:
        messages = [{"role": "user", "content": system + " " + question}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reference_prompt_ids(
    tokenizer: Any,
    system: str,
    question: str,
    *,
    supports_system: bool = True,
    max_prompt_tokens: int = 512,
) -> list[int]:
    text = render_prompt(tokenizer, system, question, supports_system)
    return tokenize(tokenizer, text)[:max_prompt_tokens]


def reference_label_ids(tokenizer: Any, answer: str, max_response_tokens: int = 128) -> list[int]:
    return tokenize(tokenizer, answer + tokenizer.eos_token)[:max_response_tokens]


@torch.inference_mode()
def token_logprobs(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """``out[p]`` = log p(ids[p] | ids[:p]) for p >= 1 (out[0] is 0), from one full forward."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(ids)], device=device)
    logits = model(input_ids=input_ids).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    picked = lp.gather(1, input_ids[0, 1:, None]).squeeze(1).double().cpu()
    return torch.cat([torch.zeros(1, dtype=torch.float64), picked])


def reference_span_sum(model: Any, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> float:
    lp = token_logprobs(model, ids)
    return float(sum(lp[s:e].sum().item() for s, e in spans))


def reference_single_turn(
    model: Any,
    tokenizer: Any,
    system: str,
    question: str,
    answer: str,
    *,
    supports_system: bool = True,
    max_prompt_tokens: int = 512,
    max_response_tokens: int = 128,
) -> tuple[float, int, list[int]]:
    """(mean log-prob of the label tokens, label count, full token ids) as SaRFT computes it."""
    prompt = reference_prompt_ids(
        tokenizer,
        system,
        question,
        supports_system=supports_system,
        max_prompt_tokens=max_prompt_tokens,
    )
    label = reference_label_ids(tokenizer, answer, max_response_tokens)
    ids = prompt + label
    total = reference_span_sum(model, ids, [(len(prompt), len(ids))])
    return total / len(label), len(label), ids


def question_answer(sample: Sample) -> tuple[str, str]:
    user = next(m for m in sample.messages if m.role == "user")
    answer = next(m for m in sample.messages if m.role == "assistant")
    return user.content, answer.content


# --- data --------------------------------------------------------------------------------------


def read_rolebench_rows(n: int, role: str = ROLE_NAME) -> list[dict[str, Any]]:
    if not ROLEBENCH_FILE.exists():
        pytest.skip(f"RoleBench data not found at {ROLEBENCH_FILE}")
    rows: list[dict[str, Any]] = []
    with ROLEBENCH_FILE.open(encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            if obj.get("role") == role:
                rows.append(obj)
                if len(rows) == n:
                    break
    return rows


def rows_to_samples(rows: list[dict[str, Any]]) -> list[Sample]:
    return [
        Sample(
            index=i,
            line=i + 1,
            messages=(
                Message("user", row["question"], scored=False),
                Message("assistant", row["generated"][0]),
            ),
            raw=row,
        )
        for i, row in enumerate(rows)
    ]


@pytest.fixture(scope="session")
def rolebench_rows() -> list[Sample]:
    """The first NUM_ROWS RoleBench rows of Jack Sparrow as samples."""
    return rows_to_samples(read_rolebench_rows(NUM_ROWS))


@pytest.fixture(scope="session")
def sarft_prompts() -> RolePrompts:
    if not SARFT_PROMPTS_FILE.exists():
        pytest.skip(f"SaRFT prompts not found at {SARFT_PROMPTS_FILE}")
    return RolePrompts.from_file(SARFT_PROMPTS_FILE, ROLE_NAME)


# --- models ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The dense checkpoint of the bundled model (converted from GGUF once, then cached)."""
    return materialize_bundled(model_cache_dir())


@pytest.fixture(scope="session")
def bundled_model(bundled_model_dir: Path) -> LoadedModel:
    return load_model(cache_dir=model_cache_dir(), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def bundled_tokenizer(bundled_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir)


def build_tiny_tokenizer() -> Any:
    """The bundled tokenizer (its own instance) with a chat template that has no system role."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(materialize_bundled(model_cache_dir()))
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer()


# Tiny random decoders: 2 layers, grouped kv heads, and a larger init range than the
# default so outputs depend visibly on the context (a wrong position or a stale cache
# shows up well above the test tolerances).
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}


def build_tiny_model(tokenizer: Any, tie_word_embeddings: bool = False) -> Any:
    """A tiny random Llama in fp32 over ``tokenizer``'s vocabulary, the same on every call;
    with ``tie_word_embeddings`` its head is its input embedding (as SmolLM2's).

    A larger init range than the default makes its outputs depend visibly on the context,
    so a wrong position or a stale cache shows up well above the test tolerances.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{**TINY_SHAPE, "tie_word_embeddings": tie_word_embeddings},
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    model: Any = LlamaForCausalLM(config)
    model.float().eval()
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: Any) -> Any:
    return build_tiny_model(tiny_tokenizer)


ALL_CONDITIONS = tuple(Condition)
