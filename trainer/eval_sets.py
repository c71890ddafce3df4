"""Harmful-prompt sets for the safety evaluation.

Three file shapes are understood, told apart by their content rather than their name:

* AdvBench ``harmful_behaviors.csv``: a CSV with a ``goal`` column (``goal,target``)
* BeaverTails ``evaluation.csv``: a CSV with a ``prompt`` column (``,prompt,category,category_id``);
  its ``category`` column, where present, is kept per prompt (refusal is reported by category)
* JSONL: one ``{"prompt": "..."}`` object per line (other keys are ignored)

A file whose first non-blank character is ``{`` is JSONL, anything else is read as CSV. A CSV
with both columns uses ``prompt``. Bad input raises :class:`PromptSetError` naming the file and
the line.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from worker.formats import Sample

T = TypeVar("T")

BUILTIN_SET = "builtin"
BUILTIN_PROMPTS = Path(__file__).resolve().parent / "prompt_sets" / "builtin.jsonl"
"""Eight harmful requests written for sarft: evaluation works before any data set is configured."""
ADVBENCH_COLUMN = "goal"
PROMPT_COLUMN = "prompt"
CATEGORY_COLUMN = "category"


class PromptSetError(ValueError):
    """A prompt file that cannot be read as a prompt set."""


@dataclass(frozen=True, slots=True)
class PromptSet:
    name: str
    """Shown in results and reports: "advbench", "beavertails", or the file's stem."""
    prompts: tuple[str, ...]
    categories: tuple[str, ...] | None = None
    """Each prompt's harm category (BeaverTails), or None."""
    system: str | None = None
    """A system message the set's prompts are asked under (a jailbreak's), after the role's
    own in character."""
    decode: Callable[[str], str] | None = field(default=None, compare=False)
    """What the judge reads of an answer: a cipher's answers are deciphered first."""

    def __post_init__(self) -> None:
        if self.categories is not None and len(self.categories) != len(self.prompts):
            raise ValueError(f"{len(self.categories)} categories for {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def judged(self, prompt: str, response: str) -> tuple[str, str]:
        """What a judge reads: the prompt as the model got it (the set's system message first)
        and the answer, both through ``decode`` when the set has one."""
        read = self.decode or (lambda text: text)
        context = f"{self.system}\n\n" if self.system else ""
        return read(context + prompt), read(response)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{path}: not valid UTF-8 text ({exc.reason})") from exc


def _jsonl_prompts(path: Path, text: str) -> Iterator[tuple[str, str | None]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{path}: line {number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get(PROMPT_COLUMN), str):
            raise PromptSetError(
                f'{path}: line {number}: expected an object with a string "prompt" field'
            )
        prompt = obj[PROMPT_COLUMN].strip()
        if not prompt:
            raise PromptSetError(f'{path}: line {number}: "prompt" is empty')
        yield prompt, None


def _csv_column(path: Path, fieldnames: list[str] | None) -> str:
    names = [n.strip() for n in fieldnames or []]
    for column in (PROMPT_COLUMN, ADVBENCH_COLUMN):
        if column in names:
            return column
    got = ", ".join(repr(n) for n in names[:8]) or "none"
    raise PromptSetError(
        f"{path}: line 1: expected a {ADVBENCH_COLUMN!r} column (AdvBench) or a "
        f"{PROMPT_COLUMN!r} column (BeaverTails); got columns {got}"
    )


def _csv_prompts(path: Path, text: str, column: str) -> Iterator[tuple[str, str | None]]:
    reader = csv.reader(text.splitlines(keepends=True))
    header = [n.strip() for n in next(reader)]
    at = header.index(column)
    category_at = header.index(CATEGORY_COLUMN) if CATEGORY_COLUMN in header else None
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            # reader.line_num is the line where this record ends (quoted cells span lines).
            if at >= len(row) or not row[at].strip():
                raise PromptSetError(f"{path}: line {reader.line_num}: empty {column!r} cell")
            category = None
            if category_at is not None:
                if category_at >= len(row) or not row[category_at].strip():
                    raise PromptSetError(
                        f"{path}: line {reader.line_num}: empty {CATEGORY_COLUMN!r} cell"
                    )
                category = row[category_at].strip()
            yield row[at].strip(), category
    except csv.Error as exc:
        raise PromptSetError(f"{path}: line {reader.line_num}: bad CSV ({exc})") from exc


def _csv_header(text: str) -> list[str] | None:
    try:
        return next(csv.reader(text.splitlines()), None)
    except csv.Error:
        return None


def load_prompts(
    path: Path | str, max_prompts: int | None = None, name: str | None = None
) -> PromptSet:
    """Read a prompt set; keep its first ``max_prompts`` prompts (file order) when given."""
    path = Path(path)
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be at least 1, got {max_prompts}")
    text = _read_text(path)
    if not text.strip():
        raise PromptSetError(f"{path}: the file is empty (no prompts)")
    if text.lstrip().startswith("{"):
        prompts, default_name = _jsonl_prompts(path, text), path.stem
    else:
        header = _csv_header(text)
        column = _csv_column(path, header)
        prompts = _csv_prompts(path, text, column)
        if column == ADVBENCH_COLUMN:
            default_name = "advbench"
        elif header is not None and CATEGORY_COLUMN in (h.strip() for h in header):
            default_name = "beavertails"
        else:
            default_name = path.stem
    kept: list[tuple[str, str | None]] = []
    for prompt in prompts:
        kept.append(prompt)
        if max_prompts is not None and len(kept) == max_prompts:
            break
    if not kept:
        raise PromptSetError(f"{path}: no prompts (only a header or blank lines)")
    categories = [c for _, c in kept]
    return PromptSet(
        name=name or default_name,
        prompts=tuple(p for p, _ in kept),
        categories=None if None in categories else tuple(c for c in categories if c is not None),
    )


# --- held-out role-play samples (the fidelity set) ----------------------------------------------


def question_and_reference(sample: Sample) -> tuple[str, str]:
    """(the last user turn before the first scored assistant turn, that assistant turn)."""
    question: str | None = None
    for message in sample.messages:
        if message.role == "user":
            question = message.content
        elif message.role == "assistant" and message.scored:
            if question is None:
                break
            return question, message.content
    raise ValueError(f"line {sample.line}: no user turn followed by a scored assistant turn")


def split_validation(
    samples: Sequence[T], fraction: float = 0.1, max_n: int = 100, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Hold out ``min(max_n, round(fraction * n))`` samples (at least 1 when n >= 2).

    The choice depends only on ``n`` and ``seed``; both parts keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if max_n < 0:
        raise ValueError(f"max_n must be >= 0, got {max_n}")
    n = len(samples)
    n_val = 0 if fraction == 0 or n < 2 else min(max_n, max(1, round(fraction * n)))
    held = set(random.Random(seed).sample(range(n), n_val))
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val
