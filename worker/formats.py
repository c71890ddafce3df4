"""Training dataset formats: detection, parsing and validation.

Three input formats are understood, and each is turned into the same :class:`Sample`:

* OpenAI fine-tuning chat JSONL: ``{"messages": [{"role", "content", "weight"?}, ...]}``
* RoleBench JSONL: ``{"role", "question", "generated": [str, ...]}`` (the first answer is used)
* Alpaca / SaRFT: ``{"instruction"?, "input"?, "output"}`` as a JSON array file or as JSONL

Bad input is reported as :class:`LineError` values carrying the 1-based line number (JSONL) or
the 1-based item number (JSON array). Errors about a whole file use line 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from worker.json_records import LineError, is_json_array, read_records

_ROLES = ("system", "user", "assistant")
_SHOWN_ERRORS = 5


class DatasetFormat(StrEnum):
    OPENAI_CHAT = "openai_chat"
    ROLEBENCH = "rolebench"
    ALPACA = "alpaca"


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    scored: bool = True  # False for system/user turns and for assistant turns with "weight": 0


@dataclass(frozen=True, slots=True)
class Sample:
    index: int  # 0-based position among the samples of the file
    line: int  # 1-based line number (JSONL) or 1-based item number (JSON array)
    messages: tuple[Message, ...]
    raw: dict[str, Any]  # the original JSON object, unchanged
    # Its JSON text as uploaded (JSONL), stored without re-encoding; not part of its identity.
    text: str | None = field(default=None, compare=False, repr=False)


class DatasetError(ValueError):
    """Bad dataset input: ``errors`` (the first errors found) and ``format`` (None if unknown)."""

    def __init__(
        self, errors: list[LineError], format: DatasetFormat | None = None, path: Path | None = None
    ) -> None:
        self.errors = list(errors)
        self.format = format
        self.path = path  # only its name is shown in messages
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = "; ".join(str(e) for e in self.errors[:_SHOWN_ERRORS]) or "invalid dataset"
        if len(self.errors) > _SHOWN_ERRORS:
            parts += f" (and {len(self.errors) - _SHOWN_ERRORS} more)"
        return f"{self.path.name}: {parts}" if self.path is not None else parts


@dataclass(frozen=True)
class ValidationReport:
    format: DatasetFormat | None
    num_samples: int  # number of valid samples
    errors: list[LineError]  # the first max_errors errors
    total_errors: int = 0  # all errors found, including those not kept in ``errors``

    @property
    def ok(self) -> bool:
        return not self.errors and self.num_samples > 0


class _RecordError(Exception):
    """A problem with one record; turned into a LineError by the caller."""


_TYPE_NAMES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"),
    ((int, float), "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
)


def _json_type(value: object) -> str:
    """The JSON type of a decoded value, for error messages ("got a number")."""
    if value is None:
        return "null"
    return next((n for t, n in _TYPE_NAMES if isinstance(value, t)), type(value).__name__)


def _str_field(obj: dict[str, Any], key: str, where: str = "", required: bool = True) -> str:
    """obj[key] as a string; a missing optional field reads as ""."""
    if key not in obj:
        if required:
            raise _RecordError(f'{where} is missing "{key}"' if where else f'missing field "{key}"')
        return ""
    value = obj[key]
    if not isinstance(value, str):
        label = f'{where} "{key}"' if where else f'"{key}"'
        raise _RecordError(f"{label} should be a string, got {_json_type(value)}")
    return value


# --- record shapes -------------------------------------------------------------------------------

# Keys that identify each format (checked in this order), its name, and what a record must hold.
_SHAPES: dict[DatasetFormat, tuple[tuple[str, ...], str, str]] = {
    DatasetFormat.OPENAI_CHAT: (("messages",), "an OpenAI chat", 'a "messages" list'),
    DatasetFormat.ROLEBENCH: (
        ("question", "generated"),
        "a RoleBench",
        '"question" and "generated"',
    ),
    DatasetFormat.ALPACA: (("output",), "an Alpaca", 'an "output" field'),
}


def _shape(obj: dict[str, Any]) -> DatasetFormat | None:
    return next((f for f, (keys, *_) in _SHAPES.items() if all(k in obj for k in keys)), None)


def _detect(obj: object) -> DatasetFormat:
    """The format of a first record, or _RecordError when it cannot be told."""
    if not isinstance(obj, dict):
        raise _RecordError(f"expected a JSON object, got {_json_type(obj)}")
    fmt = _shape(obj)
    if fmt is None:
        keys = ", ".join(f'"{k}"' for k in list(obj)[:8]) or "none"
        raise _RecordError(
            'cannot tell the dataset format: expected a "messages" list (OpenAI chat), '
            '"question" and "generated" fields (RoleBench), or an "output" field (Alpaca); '
            f"got keys {keys}"
        )
    return fmt


def _content(msg: dict[str, Any], where: str) -> str:
    if "content" not in msg:
        raise _RecordError(f'{where} is missing "content"')
    content = msg["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _RecordError(
            f'{where} "content" should be a string or a list of text parts, '
            f"got {_json_type(content)}"
        )
    texts: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise _RecordError(f'{at} should be a {{"type": "text", "text": ...}} part')
        texts.append(_str_field(part, "text", at))
    return "".join(texts)


def _parse_openai(obj: dict[str, Any]) -> tuple[Message, ...]:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise _RecordError(f'"messages" should be a list, got {_json_type(msgs)}')
    if not msgs:
        raise _RecordError('"messages" is empty: no assistant turn')
    out: list[Message] = []
    expected, started = "user", False
    for i, msg in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _RecordError(f"{where} should be an object, got {_json_type(msg)}")
        role = _str_field(msg, "role", where)
        if role not in _ROLES:
            raise _RecordError(
                f'{where} has an unknown role "{role}" (expected "system", "user" or "assistant")'
            )
        content = _content(msg, where)
        weight = msg.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1):
            raise _RecordError(f'{where} "weight" should be 0 or 1, got {json.dumps(weight)}')
        if role == "system":
            if started:
                raise _RecordError(
                    f"{where}: system messages are only allowed at the start of the conversation"
                )
            out.append(Message("system", content, scored=False))
            continue
        started = True
        if role != expected:
            raise _RecordError(
                f'{where}: expected a "{expected}" turn, got "{role}" '
                "(turns must alternate user/assistant, starting with user)"
            )
        if not content.strip():
            what = "prompt" if role == "user" else "response"
            raise _RecordError(f"empty {what}: {where} ({role}) has no text")
        out.append(Message(role, content, scored=role == "assistant" and weight != 0))
        expected = "assistant" if role == "user" else "user"
    if not any(m.role == "assistant" for m in out):
        raise _RecordError("no assistant turn")
    if out[-1].role == "user":
        raise _RecordError("conversation ends with a user turn that has no answer")
    if not any(m.scored for m in out):
        raise _RecordError("no assistant turn to score (every assistant turn has weight 0)")
    return tuple(out)


def _parse_rolebench(obj: dict[str, Any]) -> tuple[Message, ...]:
    if "role" in obj:
        _str_field(obj, "role")
    question = _str_field(obj, "question")
    generated = obj["generated"]
    if not isinstance(generated, list):
        raise _RecordError(f'"generated" should be a list of strings, got {_json_type(generated)}')
    if not generated:
        raise _RecordError('empty response: "generated" is an empty list')
    for j, answer in enumerate(generated):
        if not isinstance(answer, str):
            raise _RecordError(f"generated[{j}] should be a string, got {_json_type(answer)}")
    if not question.strip():
        raise _RecordError('empty prompt: "question" is empty')
    if not generated[0].strip():
        raise _RecordError("empty response: generated[0] is empty")
    return (Message("user", question, scored=False), Message("assistant", generated[0]))


def _parse_alpaca(obj: dict[str, Any]) -> tuple[Message, ...]:
    instruction = _str_field(obj, "instruction", required=False)
    input_text = _str_field(obj, "input", required=False)
    output = _str_field(obj, "output")
    prompt = "\n\n".join(p for p in (instruction, input_text) if p.strip())
    if not prompt:
        raise _RecordError('empty prompt: "instruction" and "input" are both empty')
    if not output.strip():
        raise _RecordError('empty response: "output" is empty')
    return (Message("user", prompt, scored=False), Message("assistant", output))


_PARSERS: dict[DatasetFormat, Callable[[dict[str, Any]], tuple[Message, ...]]] = {
    DatasetFormat.OPENAI_CHAT: _parse_openai,
    DatasetFormat.ROLEBENCH: _parse_rolebench,
    DatasetFormat.ALPACA: _parse_alpaca,
}


def _parse(obj: object, fmt: DatasetFormat) -> tuple[Message, ...]:
    if not isinstance(obj, dict):
        raise _RecordError(f"expected a JSON object, got {_json_type(obj)}")
    keys, name, needs = _SHAPES[fmt]
    missing = [k for k in keys if k not in obj]
    if missing:
        shape = _shape(obj)
        got = f", but this looks like {_SHAPES[shape][1]} record" if shape else ""
        raise _RecordError(f"expected {name} record with {needs}{got}")
    return _PARSERS[fmt](obj)


class _Scan:
    """One pass over a file, yielding samples and errors; ``fmt`` is set once it is known."""

    def __init__(self, path: Path, fmt: DatasetFormat | None) -> None:
        self.path = path
        self.fmt = fmt

    def __iter__(self) -> Generator[Sample | LineError, None, None]:
        is_array = is_json_array(self.path)
        unit = "item" if is_array else "line"
        index, seen = 0, False
        for record in read_records(self.path, is_array):
            seen = True
            if isinstance(record, LineError):
                yield record
                continue
            number, obj, text = record
            try:
                if self.fmt is None:
                    self.fmt = _detect(obj)
                messages = _parse(obj, self.fmt)
            except _RecordError as e:
                yield LineError(number, str(e), unit)
                continue
            assert isinstance(obj, dict)
            yield Sample(index=index, line=number, messages=messages, raw=obj, text=text)
            index += 1
        if not seen:
            yield LineError(0, "the file is empty (no samples)")


# --- public API ----------------------------------------------------------------------------------


def detect_format(path: Path) -> DatasetFormat:
    """Detect the format from the first record (first array item or first non-blank line)."""
    path = Path(path)
    scan = _Scan(path, None)
    records = iter(scan)
    try:
        first = next(records)  # a scan always yields something: a sample or an error
    finally:
        records.close()
    if scan.fmt is None:
        assert isinstance(first, LineError)
        raise DatasetError([first], None, path)
    return scan.fmt


def iter_samples(path: Path, fmt: DatasetFormat | None = None) -> Iterator[Sample]:
    """Stream the samples of a file; raise DatasetError at the first bad record.

    With ``fmt`` None the format is detected from the first record.
    """
    path = Path(path)
    scan = _Scan(path, fmt)
    for item in scan:
        if isinstance(item, LineError):
            raise DatasetError([item], scan.fmt, path)
        yield item


def scan_file(path: Path, fmt: DatasetFormat | None = None) -> Iterator[Sample | LineError]:
    """Every sample and every bad record of a file, in file order, in one pass (for callers
    that store the samples while they validate, and discard them on any error)."""
    yield from _Scan(Path(path), fmt)


def validate_file(path: Path, max_errors: int = 100) -> ValidationReport:
    """Check a whole file, keeping the first ``max_errors`` errors and counting valid samples.

    Bad content never raises; only I/O errors (e.g. a missing file) do.
    """
    path = Path(path)
    scan = _Scan(path, None)
    errors: list[LineError] = []
    num_samples = total = 0
    for item in scan:
        if isinstance(item, LineError):
            total += 1
            if len(errors) < max_errors:
                errors.append(item)
        else:
            num_samples += 1
    return ValidationReport(scan.fmt, num_samples, errors, total)


def response_text(sample: Sample) -> str:
    """The scored assistant turns' contents joined by a blank line (for display)."""
    return "\n\n".join(m.content for m in sample.messages if m.role == "assistant" and m.scored)


def sample_from_record(record: dict[str, Any], fmt: DatasetFormat, index: int, line: int) -> Sample:
    """Rebuild a Sample from a stored record (already validated once, so errors are bugs)."""
    try:
        messages = _parse(record, fmt)
    except _RecordError as exc:
        raise DatasetError([LineError(line, str(exc))], fmt) from exc
    return Sample(index=index, line=line, messages=messages, raw=record)
