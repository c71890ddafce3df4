"""Reading JSON records from a file, line by line (JSONL) or as one array, with line numbers.

Bad input becomes a :class:`LineError` carrying the 1-based line (JSONL) or item (JSON array)
number; errors about a whole file use line 0. Nothing here knows any dataset format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

_BOM = b"\xef\xbb\xbf"

MAX_LINE_BYTES = 8 * 1024 * 1024
"""A JSONL line (one dialogue) longer than this is refused without being held in memory:
real dialogues are kilobytes, and a 50 MB line would cost the reader several times that."""
MAX_ARRAY_BYTES = 64 * 1024 * 1024
"""A JSON array is parsed whole (the standard library has no incremental parser), at several
times its size in memory: larger files must be JSONL, which streams."""
_SKIP_CHUNK = 1 << 20


class Record(NamedTuple):
    number: int  # the 1-based line (JSONL) or item (JSON array) number
    value: object  # the decoded JSON
    text: str | None  # the record's JSON text as uploaded (JSONL lines only)


@dataclass(frozen=True, slots=True)
class LineError:
    line: int  # 0 means the error concerns the whole file
    message: str
    unit: str = "line"  # "line" for JSONL lines and file lines, "item" for JSON array items

    def __str__(self) -> str:
        return self.message if self.line <= 0 else f"{self.unit} {self.line}: {self.message}"


def is_json_array(path: Path) -> bool:
    """True when the first non-whitespace character (after an optional BOM) is ``[``."""
    with path.open("rb") as fh:
        chunk = fh.read(65536)
        if chunk.startswith(_BOM):
            chunk = chunk[len(_BOM) :]
        while chunk:
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return stripped.startswith(b"[")
            chunk = fh.read(65536)
    return False


def _json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg}: column {e.colno})"
    return "invalid JSON (nested too deeply)"


def _lines(fh: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The file's lines; None for a line longer than ``limit`` bytes, which is skipped in
    chunks so that memory stays bounded by ``limit`` whatever the line's length."""
    while line := fh.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while (rest := fh.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield None


def read_records(
    path: Path,
    is_array: bool,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_array_bytes: int = MAX_ARRAY_BYTES,
) -> Iterator[Record | LineError]:
    """Yield each record (number, decoded value, text), or a LineError for an unreadable one."""
    if is_array:
        # A JSON array cannot be parsed incrementally with the standard library, so the whole
        # file is loaded at once. JSONL files, by contrast, are always streamed line by line.
        size = path.stat().st_size
        if size > max_array_bytes:
            yield LineError(
                0,
                f"a JSON array file is parsed whole and may be at most {max_array_bytes} bytes "
                f"(this one is {size}); write one record per line (JSONL) instead",
            )
            return
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            yield LineError(line, f"not valid UTF-8 text (invalid byte 0x{data[e.start]:02x})")
            return
        try:
            items = json.loads(text)  # a list: the text starts with "[" after optional whitespace
        except (json.JSONDecodeError, RecursionError) as e:
            # A RecursionError has no position: a too-deep array is named by its first line.
            yield LineError(getattr(e, "lineno", 1), _json_error(e))
            return
        for number, item in enumerate(items, start=1):
            yield Record(number, item, None)
        return
    with path.open("rb") as fh:
        for number, raw_line in enumerate(_lines(fh, max_line_bytes), start=1):
            if raw_line is None:
                yield LineError(number, f"the line is longer than {max_line_bytes} bytes")
                continue
            if number == 1 and raw_line.startswith(_BOM):
                raw_line = raw_line[len(_BOM) :]
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw_line[e.start]
                yield LineError(
                    number, f"not valid UTF-8 text (invalid byte 0x{bad:02x} at byte {e.start + 1})"
                )
                continue
            if not text.strip():
                continue
            try:
                yield Record(number, json.loads(text), text.strip())
            except (json.JSONDecodeError, RecursionError) as e:
                yield LineError(number, _json_error(e))
