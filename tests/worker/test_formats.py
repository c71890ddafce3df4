"""Tests for worker.formats: parsing, detection and error reporting for the dataset formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED_DATA
from worker.formats import (
    DatasetError,
    DatasetFormat,
    LineError,
    Message,
    detect_format,
    iter_samples,
    response_text,
    validate_file,
)

ROLEBENCH_FILE = SHARED_DATA / "rolebench" / "role_generalization_role_specific.jsonl"

CHAT_OK: dict[str, Any] = {
    "messages": [
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Ahoy."},
    ]
}
ROLEBENCH_OK: dict[str, Any] = {"role": "Pirate", "question": "Who are you?", "generated": ["Me."]}
ALPACA_OK: dict[str, Any] = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def write_jsonl(tmp_path: Path, records: list[Any], name: str = "data.jsonl") -> Path:
    """Write one JSON value per line; str values are written verbatim (for malformed lines)."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def only_error(path: Path, fmt: DatasetFormat | None = None) -> LineError:
    """Parse the file, expecting a DatasetError; return its single error."""
    with pytest.raises(DatasetError) as info:
        list(iter_samples(path, fmt))
    assert len(info.value.errors) == 1
    return info.value.errors[0]


def chat(*turns: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


# --- parsing -------------------------------------------------------------------------------------


def test_openai_multi_turn_with_system_and_weight(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr.", "weight": 0},
            {"role": "user", "content": "Treasure?"},
            {"role": "assistant", "content": "Buried.", "weight": 1},
        ],
        "id": "x1",
    }
    path = write_jsonl(tmp_path, [record, CHAT_OK])
    samples = list(iter_samples(path))
    assert [s.index for s in samples] == [0, 1]
    assert [s.line for s in samples] == [1, 2]
    first = samples[0]
    assert first.raw == record
    assert first.messages == (
        Message("system", "You are a pirate.", scored=False),
        Message("user", "Hi", scored=False),
        Message("assistant", "Arr.", scored=False),
        Message("user", "Treasure?", scored=False),
        Message("assistant", "Buried.", scored=True),
    )
    assert response_text(first) == "Buried."
    assert detect_format(path) is DatasetFormat.OPENAI_CHAT


def test_openai_content_parts_and_empty_system(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "system", "content": ""},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
            },
            {"role": "assistant", "content": "One."},
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "Two."},
        ]
    }
    (sample,) = iter_samples(write_jsonl(tmp_path, [record]))
    assert sample.messages[1].content == "Hello"
    assert response_text(sample) == "One.\n\nTwo."


def test_rolebench_uses_first_generated(tmp_path: Path) -> None:
    record = {"role": "Pirate", "question": "Who?", "generated": ["First.", "Second."], "type": "x"}
    path = write_jsonl(tmp_path, [record])
    (sample,) = iter_samples(path)
    assert sample.messages == (
        Message("user", "Who?", scored=False),
        Message("assistant", "First.", scored=True),
    )
    assert sample.raw == record
    assert detect_format(path) is DatasetFormat.ROLEBENCH


def test_alpaca_json_array(tmp_path: Path) -> None:
    items = [
        {"instruction": "Greet.", "input": "", "output": "Hello."},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"input": "only input", "output": "ok"},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(items, indent=2), encoding="utf-8")
    samples = list(iter_samples(path))
    assert detect_format(path) is DatasetFormat.ALPACA
    assert [s.line for s in samples] == [1, 2, 3]
    assert [s.messages[0].content for s in samples] == [
        "Greet.",
        "Translate.\n\nchat",
        "only input",
    ]
    assert [response_text(s) for s in samples] == ["Hello.", "cat", "ok"]
    assert samples[1].raw == items[1]


def test_alpaca_jsonl_join_keeps_original_strings(tmp_path: Path) -> None:
    record = {"instruction": "  Do it. ", "input": " data\n", "output": "Done."}
    path = write_jsonl(tmp_path, [record, {"instruction": "   ", "input": "x", "output": "y"}])
    first, second = iter_samples(path)
    assert first.messages[0] == Message("user", "  Do it. \n\n data\n", scored=False)
    assert second.messages[0].content == "x"
    assert detect_format(path) is DatasetFormat.ALPACA


def test_bom_and_blank_lines_keep_numbering(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    body = "\n".join(["", json.dumps(ALPACA_OK), "   ", "", json.dumps(ALPACA_OK), ""])
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [(s.index, s.line) for s in iter_samples(path)] == [(0, 2), (1, 5)]
    path.write_bytes(path.read_bytes() + b"\n{oops\n")  # line 6 blank, line 7 broken
    assert only_error(path).line == 7


def test_bom_json_array(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf  \n" + json.dumps([ALPACA_OK]).encode())
    assert len(list(iter_samples(path))) == 1


def test_explicit_format_is_enforced(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [ALPACA_OK])
    err = only_error(path, DatasetFormat.ROLEBENCH)
    assert err.line == 1
    assert "RoleBench" in err.message and "Alpaca" in err.message


# --- detection -----------------------------------------------------------------------------------


def test_detect_unknown_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, ["", {"prompt": "a", "completion": "b"}])
    with pytest.raises(DatasetError) as info:
        detect_format(path)
    assert info.value.format is None
    assert info.value.errors[0].line == 2
    assert "cannot tell" in str(info.value)


def test_detect_uses_first_record_only(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [ROLEBENCH_OK, "{broken"])
    assert detect_format(path) is DatasetFormat.ROLEBENCH
    # a first record that is detectable but invalid still tells the format
    path = write_jsonl(tmp_path, [{"output": ""}])
    assert detect_format(path) is DatasetFormat.ALPACA


@pytest.mark.parametrize("content", ["", "\n  \n", "[]"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match="empty"):
        detect_format(path)
    err = only_error(path)
    assert err.line == 0 and "empty" in err.message
    report = validate_file(path)
    assert report.num_samples == 0 and len(report.errors) == 1 and report.format is None


# --- bad input -----------------------------------------------------------------------------------

BAD_LINE_3: list[tuple[Any, str]] = [
    ('{"messages": [}', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"text"', "expected a JSON object, got a string"),
    (chat(("user", "Q")) | {"messages": "nope"}, '"messages" should be a list, got a string'),
    ({"messages": [{"content": "Q"}]}, 'messages[0] is missing "role"'),
    ({"messages": [{"role": "user"}]}, 'messages[0] is missing "content"'),
    (chat(("user", 5), ("assistant", "A")), 'messages[0] "content" should be a string'),
    (chat(("user", "Q"), ("assistant", None)), "got null"),
    (chat(("user", "Q"), ("assistant", "  ")), "empty response"),
    (chat(("user", " "), ("assistant", "A")), "empty prompt"),
    (chat(("system", "S"), ("user", "Q")), "no assistant turn"),
    (chat(("user", "Q"), ("assistant", "A"), ("user", "Q2")), "ends with a user turn"),
    (chat(("user", "Q"), ("bot", "A")), 'unknown role "bot"'),
    (chat(("assistant", "A")), 'expected a "user" turn, got "assistant"'),
    (chat(("user", "Q"), ("user", "Q2"), ("assistant", "A")), 'expected a "assistant" turn'),
    (chat(("user", "Q"), ("assistant", "A"), ("system", "S")), "only allowed at the start"),
    ({"messages": []}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "Q"}, 3]}, "messages[1] should be an object"),
    (
        {
            "messages": [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A", "weight": 0},
            ]
        },
        "weight 0",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A", "weight": 2},
            ]
        },
        '"weight" should be 0 or 1',
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        '"type": "text"',
    ),
    ({"role": "x"}, 'expected an OpenAI chat record with a "messages" list'),
    (ROLEBENCH_OK, "expected an OpenAI chat record"),
]


@pytest.mark.parametrize(("record", "expected"), BAD_LINE_3)
def test_bad_openai_line_reported_with_line_number(
    tmp_path: Path, record: Any, expected: str
) -> None:
    path = write_jsonl(tmp_path, [CHAT_OK, CHAT_OK, record, CHAT_OK])
    err = only_error(path)
    assert err.line == 3
    assert expected in err.message
    assert str(err).startswith("line 3: ")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"role": "P", "question": "Q", "generated": []}, "empty response"),
        ({"role": "P", "question": "Q", "generated": ["  ", "b"]}, "empty response"),
        ({"role": "P", "question": "", "generated": ["a"]}, "empty prompt"),
        ({"role": "P", "question": "Q", "generated": "a"}, '"generated" should be a list'),
        ({"role": "P", "question": "Q", "generated": ["a", 1]}, "generated[1] should be a string"),
        ({"role": "P", "question": 7, "generated": ["a"]}, '"question" should be a string'),
        ({"role": "P", "question": "Q"}, 'expected a RoleBench record with "question"'),
        (ALPACA_OK, "looks like an Alpaca record"),
    ],
)
def test_bad_rolebench_line(tmp_path: Path, record: Any, expected: str) -> None:
    path = write_jsonl(tmp_path, [ROLEBENCH_OK, record])
    err = only_error(path)
    assert (err.line, expected in err.message) == (2, True), err


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "I", "output": " "}, "empty response"),
        ({"instruction": " ", "input": "", "output": "O"}, "empty prompt"),
        ({"output": "O"}, "empty prompt"),
        ({"instruction": "I", "output": 3}, '"output" should be a string, got a number'),
        ({"instruction": ["I"], "output": "O"}, '"instruction" should be a string, got an array'),
        (
            {"instruction": "I", "input": None, "output": "O"},
            '"input" should be a string, got null',
        ),
        ({"instruction": "I", "response": "O"}, 'expected an Alpaca record with an "output" field'),
    ],
)
def test_bad_alpaca_item_in_json_array(tmp_path: Path, record: Any, expected: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA_OK, ALPACA_OK, record], indent=2), encoding="utf-8")
    err = only_error(path)
    assert (err.line, expected in err.message) == (3, True), err
    assert str(err).startswith("item 3: ")


def test_mixed_formats_name_expected_shape(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [CHAT_OK, CHAT_OK, "", "", "", "", ALPACA_OK])
    with pytest.raises(DatasetError) as info:
        list(iter_samples(path))
    assert info.value.format is DatasetFormat.OPENAI_CHAT
    assert str(info.value) == (
        'data.jsonl: line 7: expected an OpenAI chat record with a "messages" list, '
        "but this looks like an Alpaca record"
    )


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = json.dumps(ALPACA_OK).encode()
    path.write_bytes(good + b"\n" + b'{"output": "caf\xe9"}\n' + good + b"\n")
    err = only_error(path)
    assert err.line == 2 and "UTF-8" in err.message and "0xe9" in err.message


def test_non_utf8_json_array_names_file_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n  {"output": "ok"},\n  {"output": "\xff"}\n]\n')
    err = only_error(path)
    assert (err.line, err.unit) == (3, "line") and "UTF-8" in err.message


def test_invalid_json_array_names_file_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"output": "ok"},\n  {"output": "x" "y"}\n]\n', encoding="utf-8")
    err = only_error(path)
    assert err.line == 3 and err.message.startswith("invalid JSON (Expecting ',' delimiter")


def test_invalid_json_message_includes_json_reason(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [ALPACA_OK, ALPACA_OK, '{"output": "a" "b"}'])
    with pytest.raises(DatasetError) as info:
        list(iter_samples(path))
    assert str(info.value).startswith("data.jsonl: line 3: invalid JSON (Expecting ',' delimiter")
    assert isinstance(info.value, ValueError)


def test_iter_samples_streams_until_first_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [ALPACA_OK, "{bad", ALPACA_OK])
    it = iter_samples(path)
    assert next(it).line == 1
    with pytest.raises(DatasetError):
        next(it)


# --- validate_file -------------------------------------------------------------------------------


def test_validate_file_collects_errors(tmp_path: Path) -> None:
    records: list[Any] = [
        CHAT_OK,
        "{bad",
        "",
        chat(("user", "Q")),
        CHAT_OK,
        "42",
        chat(("user", "Q"), ("assistant", "")),
        CHAT_OK,
    ]
    report = validate_file(write_jsonl(tmp_path, records))
    assert report.format is DatasetFormat.OPENAI_CHAT
    assert report.num_samples == 3
    assert [e.line for e in report.errors] == [2, 4, 6, 7]
    assert report.total_errors == 4
    assert not report.ok


def test_validate_file_respects_max_errors_and_keeps_counting(tmp_path: Path) -> None:
    records: list[Any] = [ALPACA_OK if i % 2 == 0 else {"output": ""} for i in range(20)]
    report = validate_file(write_jsonl(tmp_path, records), max_errors=3)
    assert report.num_samples == 10
    assert [e.line for e in report.errors] == [2, 4, 6]
    assert report.total_errors == 10


def test_validate_file_clean(tmp_path: Path) -> None:
    report = validate_file(write_jsonl(tmp_path, [ROLEBENCH_OK] * 4))
    assert (report.format, report.num_samples, report.errors, report.ok) == (
        DatasetFormat.ROLEBENCH,
        4,
        [],
        True,
    )


def test_validate_file_detects_format_after_bad_first_line(tmp_path: Path) -> None:
    report = validate_file(write_jsonl(tmp_path, ["{bad", ALPACA_OK]))
    assert report.format is DatasetFormat.ALPACA
    assert report.num_samples == 1 and [e.line for e in report.errors] == [1]


def test_dataset_error_str_lists_first_five(tmp_path: Path) -> None:
    errors = [LineError(i, f"problem {i}") for i in range(1, 9)]
    text = str(DatasetError(errors, None, tmp_path / "data.jsonl"))
    assert text.startswith("data.jsonl: line 1: problem 1; line 2: problem 2")
    assert "problem 5" in text and "problem 6" not in text
    assert text.endswith("(and 3 more)")


# --- real data -----------------------------------------------------------------------------------


@pytest.mark.skipif(not ROLEBENCH_FILE.is_file(), reason="RoleBench data not present")
def test_real_rolebench_file_first_50_lines(tmp_path: Path) -> None:
    with ROLEBENCH_FILE.open("rb") as src:
        head = b"".join(line for _, line in zip(range(50), src, strict=False))
    path = tmp_path / "head.jsonl"
    path.write_bytes(head)
    assert detect_format(path) is DatasetFormat.ROLEBENCH
    samples = list(iter_samples(path))
    assert len(samples) == 50
    for sample in samples:
        assert [m.role for m in sample.messages] == ["user", "assistant"]
        assert response_text(sample) == sample.raw["generated"][0]
        assert sample.messages[0].content == sample.raw["question"]
