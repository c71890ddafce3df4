"""Bounded reading: an over-long line is refused and skipped without losing line numbers, and
a JSON array over its size limit is refused before it is read."""

from __future__ import annotations

from pathlib import Path

from worker.json_records import LineError, read_records


def test_a_long_line_is_refused_and_the_next_keeps_its_number(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n' + '{"b": "' + "x" * 5000 + '"}\n' + '{"c": 3}\n{"d": 4}')
    records = list(read_records(path, is_array=False, max_line_bytes=100))
    assert records[0] == (1, {"a": 1}, '{"a": 1}')
    assert isinstance(records[1], LineError) and records[1].line == 2
    assert "longer than 100 bytes" in records[1].message
    assert records[2:] == [(3, {"c": 3}, '{"c": 3}'), (4, {"d": 4}, '{"d": 4}')]


def test_a_line_exactly_at_the_limit_is_read(tmp_path: Path) -> None:
    line = '{"k": "' + "y" * 90 + '"}'
    path = tmp_path / "rows.jsonl"
    path.write_text(line + "\n")
    assert list(read_records(path, is_array=False, max_line_bytes=len(line) + 1)) == [
        (1, {"k": "y" * 90}, line)
    ]


def test_a_json_array_over_its_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text("[" + ", ".join(['{"a": 1}'] * 100) + "]")
    (error,) = list(read_records(path, is_array=True, max_array_bytes=50))
    assert isinstance(error, LineError) and error.line == 0 and "JSONL" in error.message


def test_too_deep_json_array_names_line_1(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 10_000 + "]" * 10_000)
    (error,) = list(read_records(path, is_array=True))
    assert isinstance(error, LineError) and error.line == 1 and "deeply" in error.message
