"""Reading JSON records from a file, line by line (JSONL) or as one array, with line numbers.

Bad input becomes a :class:`LineError` carrying the 1-based line (JSONL) or item (JSON array)
number; errors about a whole file use line 0. Nothing here knows any dataset format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_BOM = b"\xef\xbb\xbf"


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


def read_records(path: Path, is_array: bool) -> Iterator[tuple[int, object] | LineError]:
    """Yield (line or item number, decoded JSON value), or a LineError for an unreadable record."""
    if is_array:
        # A JSON array cannot be parsed incrementally with the standard library, so the whole
        # file is loaded at once. JSONL files, by contrast, are always streamed line by line.
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
            yield LineError(getattr(e, "lineno", 0), _json_error(e))
            return
        yield from enumerate(items, start=1)
        return
    with path.open("rb") as fh:
        for number, raw_line in enumerate(fh, start=1):
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
                yield number, json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                yield LineError(number, _json_error(e))
