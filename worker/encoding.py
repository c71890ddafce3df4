"""Turn a sample into token sequences for each scoring condition.

Matches the SaRFT reference code: the prompt is the chat template rendered with
the condition's system message and a generation prompt; the response label is
``answer + eos_token`` tokenized on its own; the prompt keeps its first
``max_prompt_tokens`` tokens and the response its first ``max_response_tokens``.
A template without a system role gets ``system + " " + user`` as the first user
turn. Multi-turn samples extend this turn by turn: every assistant turn is a
response span, and the limits apply to each turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from worker.formats import Message, Sample
from worker.prompts import Condition, RolePrompts

NO_SYSTEM = "none"
"""The prefix key of samples encoded with no system message."""

# Stands in for the first user message when rendering a condition's shared
# prefix; it must not occur in any template.
_PLACEHOLDER = "\x00SARFT-USER-TURN\x00"


class EncodingError(ValueError):
    """The model's chat template cannot express a sample faithfully."""


@dataclass(frozen=True, slots=True)
class EncodingConfig:
    max_prompt_tokens: int = 512
    """Prompt tokens kept (its first ones, as the reference code does)."""
    max_response_tokens: int = 128
    """Response tokens kept per assistant turn (answer + EOS, first ones)."""


@dataclass(frozen=True, slots=True)
class Prefix:
    """Tokens every sample of one condition starts with (system prompt and its framing)."""

    key: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EncodedSequence:
    token_ids: list[int]
    response_spans: tuple[tuple[int, int], ...]
    """[start, end) positions of response tokens in ``token_ids``."""
    prefix: Prefix
    shared_len: int
    """Leading tokens equal to ``prefix.token_ids``; capped so that at least the
    position predicting the first response token is outside the shared part."""
    truncated: bool

    @property
    def num_response_tokens(self) -> int:
        return sum(end - start for start, end in self.response_spans)


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def template_supports_system(tokenizer: Any) -> bool:
    """True if the chat template renders a system message (some raise, some drop it)."""
    probe = "sarft-system-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # templates signal "no system role" by raising anything
        return False
    return probe in text


class ChatEncoder:
    """Encodes samples of one role under its three conditions with one tokenizer."""

    def __init__(
        self, tokenizer: Any, prompts: RolePrompts, config: EncodingConfig | None = None
    ) -> None:
        if tokenizer.eos_token is None:
            raise EncodingError("the tokenizer has no EOS token; responses end with EOS")
        if tokenizer.chat_template is None:
            raise EncodingError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.config = config or EncodingConfig()
        self.supports_system = template_supports_system(tokenizer)
        self.prefixes = {c: self._prefix(c) for c in Condition}

    @cached_property
    def no_system_prefix(self) -> Prefix:
        return self._prefix(None)

    def _messages(
        self, condition: Condition | None, turns: Sequence[Message]
    ) -> list[dict[str, str]]:
        out = [{"role": m.role, "content": m.content} for m in turns]
        if condition is None:  # no system message: the template's own default applies
            return out
        system = self.prompts.system_text(condition)
        if self.supports_system:
            return [{"role": "system", "content": system}, *out]
        out[0] = {"role": "user", "content": system + " " + out[0]["content"]}
        return out

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return str(text)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prefix(self, condition: Condition | None) -> Prefix:
        rendered = self._render(
            self._messages(condition, [Message(role="user", content=_PLACEHOLDER)]), True
        )
        text = rendered[: rendered.index(_PLACEHOLDER)]
        ids = self._tokenize(text)[: self.config.max_prompt_tokens]
        if condition is None:
            return Prefix(key=NO_SYSTEM, token_ids=tuple(ids))
        key = f"{condition.value}:{self.prompts.hashes()[condition.value]}"
        return Prefix(key=key, token_ids=tuple(ids))

    def encode(self, sample: Sample, condition: Condition | None) -> EncodedSequence:
        """``sample`` under ``condition``'s system prompt; None encodes it with no system
        message (training may use that; scoring never does)."""
        turns = [m for m in sample.messages if m.role != "system"]
        messages = self._messages(condition, turns)
        offset = len(messages) - len(turns)  # 1 when a system message leads
        eos = self.tokenizer.eos_token
        token_ids: list[int] = []
        spans: list[tuple[int, int]] = []
        emitted = ""  # the text the sequence so far stands for
        truncated = False
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            prompt_text = self._render(messages[: offset + i], True)
            prompt_ids = self._tokenize(self._delta(prompt_text, emitted, sample))
            if not token_ids and len(prompt_ids) > self.config.max_prompt_tokens:
                prompt_ids, truncated = prompt_ids[: self.config.max_prompt_tokens], True
            token_ids += prompt_ids
            answer_ids = self._tokenize(turn.content + eos)
            if len(answer_ids) > self.config.max_response_tokens:
                answer_ids, truncated = answer_ids[: self.config.max_response_tokens], True
            if turn.scored:
                spans.append((len(token_ids), len(token_ids) + len(answer_ids)))
            token_ids += answer_ids
            emitted = prompt_text + turn.content + eos
        if not spans:
            raise EncodingError(f"line {sample.line}: no assistant turn to score")
        prefix = self.prefixes[condition] if condition is not None else self.no_system_prefix
        shared = min(_common_prefix_len(token_ids, prefix.token_ids), spans[0][0] - 1)
        return EncodedSequence(token_ids, tuple(spans), prefix, max(shared, 0), truncated)

    def _delta(self, rendered: str, emitted: str, sample: Sample) -> str:
        """The new text of this turn's prompt, given what earlier turns emitted."""
        if rendered.startswith(emitted):
            return rendered[len(emitted) :]
        # Templates whose turn end is not the EOS text (e.g. "</s>" vs "<|eot|>"):
        # the response keeps its EOS and the template's own turn end follows.
        eos = self.tokenizer.eos_token
        without_eos = emitted[: -len(eos)]
        if rendered.startswith(without_eos):
            return rendered[len(without_eos) :]
        raise EncodingError(
            f"line {sample.line}: the chat template does not render earlier turns verbatim, "
            "so multi-turn responses cannot be located"
        )

    def encode_all(self, sample: Sample, conditions: Sequence[Condition]) -> list[EncodedSequence]:
        return [self.encode(sample, c) for c in conditions]
