"""JSON inputs read as a stream: a JSON array item by item (ijson), JSON lines line by line; memory holds one row.

for source, row in json_items("train.json"):   # ("train.json[3]", {...}) or (source, the decoding error)
    ...
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from rbvl.records.record import RecordsError


def _first_byte(f) -> bytes:
    """The first non-blank byte of a binary file (after a UTF-8 BOM), leaving the file after the BOM."""
    head = f.read(4096)
    f.seek(3 if head.startswith(b"\xef\xbb\xbf") else 0)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]


def _array_items(f) -> Iterator[object]:
    """The items of a JSON array, parsed as a stream (ijson: memory holds one item, not the file)."""
    import ijson

    n = 0
    try:
        for item in ijson.items(f, "item", use_float=True):
            yield item
            n += 1
    except (ijson.JSONError, UnicodeDecodeError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecordsError(f"{getattr(f, 'name', 'input')}: not valid JSON after {n} records: {problem}") from None


def json_items(path: str) -> Iterator[tuple[str, object]]:
    """(source, parsed object or the decoding error) for a JSON array file or a JSON-lines file, streamed.

    Raises:
        RecordsError: a JSON array that stops parsing (the records before the fault were already yielded), or a
            `.json` file holding one JSON object where a list of records is expected.
    """
    with open(path, "rb") as f:
        head = _first_byte(f)
        if head == b"{":
            _refuse_single_object(path)
        if head == b"[":
            for i, row in enumerate(_array_items(f)):
                yield f"{path}[{i}]", row
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            line = line.rstrip(b"\r\n")  # so an error's position is within the line, not past its end
            try:
                yield f"{path}:{n}", json.loads(line)  # bytes: bad UTF-8 is a ValueError like bad JSON
            except json.JSONDecodeError as e:
                at = "at the end of the line" if e.pos >= len(e.doc) else f"at column {e.colno}"
                yield f"{path}:{n}", ValueError(f"{e.msg.removesuffix(' at')} {at}")
            except ValueError as e:
                yield f"{path}:{n}", e


def _refuse_single_object(path: str) -> None:
    """A `.json` file holding one JSON object (not a list of records, not JSON lines) is an error naming the file."""
    if Path(path).suffix.lower() != ".json":
        return
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # only the shape matters here
        first = f.readline()
        rest = f.read(1 << 16)
    try:
        obj = json.loads(first)
        if rest.strip():
            return  # JSON lines in a .json file
    except json.JSONDecodeError:
        try:  # an object spread over several lines (json.dump with indent)
            obj = json.loads(Path(path).read_text(encoding="utf-8-sig", errors="replace"))
        except json.JSONDecodeError:
            return  # broken lines: each becomes a bad_json reject
    if isinstance(obj, dict):
        keys = ", ".join(list(map(str, obj))[:5]) or "none"
        raise RecordsError(f"{path}: expected a list of records (a JSON array), got one JSON object (keys: {keys})")
