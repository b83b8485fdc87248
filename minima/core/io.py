"""The one reader of data files, plus the small writers every stage shares.

Reading: ``.txt``, ``.jsonl``, ``.json``, ``.csv`` and ``.parquet`` files as ``(n, row)`` pairs, where
``n`` is the 1-based line a row starts on (txt, jsonl, csv, JSON Lines under a ``.json`` name) or its
1-based record number (JSON arrays, parquet). Undecodable bytes, malformed JSON and broken CSV rows
raise :class:`DataError` naming ``file:line``; readers that can go on past a bad line take an
``on_error(where, reason, fix)`` callback instead, which may raise or record the line and return
(the line is then left out).

- ``.txt``: every line, without its line break (LF or CRLF) and without a leading BOM.
- ``.jsonl``: one JSON value per non-blank line.
- ``.json``: a JSON array (one row per item), JSON Lines under a ``.json`` name (as many datasets
  ship it: the first line is a whole value and more follow), or one other value (one row).
- ``.csv``: a header row, then one dict per row (``header=False``: lists of strings).
- ``.parquet``: one dict per row, numpy values turned into plain Python.

Writing: :class:`Journal` (append-only, fsync'd JSONL with :func:`read_journal` to resume) and
:func:`write_json_atomic`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from minima.core.errors import DataError, InputError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

#: ``(where, reason, fix)`` for a bad line: raise, or record it and return to skip the line.
OnError = Callable[[str, str, str], None]

UTF8_FIX = "re-encode the file as UTF-8"
JSON_LINE_FIX = "fix or remove the line (one JSON value per line)"

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one field are normal in corpora


def _raise(where: str, reason: str, fix: str) -> None:
    raise DataError(reason, where=where, fix=fix)


def kind_of(path: str | Path) -> str:
    """The file kind from its suffix (``txt``, ``jsonl``, ``json``, ``csv``, ``parquet``); InputError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in KINDS:
        raise InputError(
            f"unsupported file type {suffix or '(no suffix)'}", where=str(path), fix=f"use one of {', '.join(KINDS)}"
        )
    return KINDS[suffix]


# ------------------------------------------------------------------------------------ text
def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text of a whole file without its BOM; a bad byte is a DataError naming its line."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise DataError(
            f"not UTF-8 ({e.reason} at byte {col} of the line)", where=f"{path}:{line}", fix=UTF8_FIX
        ) from None


def read_text(path: str | Path) -> str:
    """The whole file as UTF-8 text (BOM dropped); undecodable bytes raise DataError naming ``file:line``."""
    p = Path(path)
    return _decode(p, p.read_bytes())


def read_text_lines(path: str | Path, on_error: Optional[OnError] = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line, blank ones included, without the line break or a BOM.

    A line that is not UTF-8 goes to ``on_error`` (default: DataError naming ``file:line``).
    """
    on_error = on_error or _raise
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                on_error(f"{path}:{n}", f"not UTF-8 ({e.reason} at byte {e.start} of the line)", UTF8_FIX)
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")
            if line.endswith("\n"):
                line = line[:-1]
                if line.endswith("\r"):
                    line = line[:-1]
            yield n, line


# ------------------------------------------------------------------------------------ JSON
def iter_jsonl(path: str | Path, on_error: Optional[OnError] = None) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line; bad lines go to ``on_error`` (default: DataError)."""
    on_error = on_error or _raise
    for n, line in read_text_lines(path, on_error):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            on_error(f"{path}:{n}", f"malformed JSON: {e.msg} (column {e.colno})", JSON_LINE_FIX)
            continue
        yield n, value


def _loads(path: str | Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"malformed JSON: {e.msg} (column {e.colno})",
            where=f"{path}:{e.lineno}",
            fix="fix the file (a .json file must parse as a whole; JSON Lines go in .jsonl)",
        ) from None


def read_json(path: str | Path) -> Any:
    """The one JSON value a file holds; malformed JSON raises DataError naming ``file:line``."""
    return _loads(path, read_text(path))


def is_json_lines(path: str | Path) -> bool:
    """True when a file's first line is a whole JSON value and more non-blank lines follow (JSON Lines)."""
    with open(path, "rb") as f:
        first = f.readline()
        while first and not first.strip():
            first = f.readline()
        rest = f.read(4096)
        while rest and not rest.strip():
            rest = f.read(4096)
    if not rest.strip():
        return False
    try:
        json.loads(first.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def iter_json_array(path: str | Path) -> Iterator[tuple[int, int, Any]]:
    """``(record number, line it starts on, item)`` of a JSON array; another value is one record, an empty file none."""
    text = read_text(path)
    if not text.strip():
        return
    value = _loads(path, text)
    if not isinstance(value, list):
        lead = len(text) - len(text.lstrip())
        yield 1, 1 + text.count("\n", 0, lead), value
        return
    for i, (line, item) in enumerate(zip(_array_item_lines(text, len(value)), value), 1):
        yield i, line, item


def _array_item_lines(text: str, n: int) -> list[int]:
    """The 1-based line where each top-level item of a JSON array starts."""
    dec = json.JSONDecoder()
    lines: list[int] = []
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    for _ in range(n):
        start = pos
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        lines.append(line)
        _, end = dec.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end
    return lines


# ------------------------------------------------------------------------------------ tables
def iter_csv(path: str | Path, header: bool = True, on_error: Optional[OnError] = None) -> Iterator[tuple[int, Any]]:
    """``(line the row starts on, row)`` of a CSV file, blank rows skipped.

    Rows are dicts keyed by the header row, or lists of strings with ``header=False``. Broken quoting
    raises DataError naming ``file:line``; a row with another number of fields than the header goes
    to ``on_error`` (default: DataError).
    """
    on_error = on_error or _raise
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            start, names = 1, None
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise DataError(
                        f"malformed CSV: {e}",
                        where=f"{path}:{start}",
                        fix="check the quoting of this row (a field with a comma or newline must be quoted)",
                    ) from None
                if row:
                    if not header:
                        yield start, row
                    elif names is None:
                        names = [h.strip() for h in row]
                    elif len(row) != len(names):
                        on_error(
                            f"{path}:{start}",
                            f"{len(row)} fields but the header has {len(names)}",
                            "quote fields that contain commas; check for a missing or extra field",
                        )
                    else:
                        yield start, dict(zip(names, row))
                start = reader.line_num + 1
    except UnicodeDecodeError:
        read_text(path)  # names the line of the first bad byte
        raise


def plain(value: Any) -> Any:
    """numpy arrays and scalars (as parquet gives them) -> lists and Python scalars, recursively."""
    import numpy as np

    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def iter_parquet(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(row number, row)`` of a parquet file; an unreadable file raises DataError."""
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:
        raise DataError(
            f"cannot read parquet: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}",
            where=str(path),
            fix="check that it is a valid parquet file",
        ) from None
    for i, row in enumerate(df.to_dict(orient="records"), 1):
        yield i, plain(row)


# ------------------------------------------------------------------------------------ any file
def iter_rows(
    path: str | Path, kind: Optional[str] = None, on_error: Optional[OnError] = None
) -> Iterator[tuple[int, Any]]:
    """``(n, row)`` of any supported file; ``kind`` overrides the suffix (see the module docstring).

    ``on_error`` receives the bad lines of txt, JSON Lines and CSV files; a JSON array, a parquet
    file and broken CSV quoting can only be fixed as a whole and raise DataError.
    """
    kind = kind or kind_of(path)
    if kind == "txt":
        return read_text_lines(path, on_error)
    if kind == "jsonl" or (kind == "json" and is_json_lines(path)):
        return iter_jsonl(path, on_error)
    if kind == "json":
        return ((i, item) for i, _, item in iter_json_array(path))
    if kind == "csv":
        return iter_csv(path, on_error=on_error)
    if kind == "parquet":
        return iter_parquet(path)
    raise InputError(f"unknown file kind {kind!r}", where=str(path), fix=f"one of {', '.join(KINDS.values())}")


def read_rows(path: str | Path, kind: Optional[str] = None) -> list[tuple[int, Any]]:
    """All ``(n, row)`` pairs of a file (see :func:`iter_rows`)."""
    return list(iter_rows(path, kind))


# ------------------------------------------------------------------------------------ writing
def str_list(value):
    """``"[a, b]"`` or ``"a,b"`` from a key=value override -> ``["a", "b"]``; other values unchanged."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
    return value


def read_journal(path: Path) -> list[dict]:
    """Complete lines of an append-only JSONL journal; a torn last line (a kill mid-write) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)  # later appends must start on a fresh line
    rows = []
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"corrupt journal line ({e.msg})",
                    where=f"{path}:{n}",
                    fix="delete the line (or the file to start over)",
                ) from None
    return rows


class Journal:
    """Append-only JSONL: each line is flushed and fsync'd before the call returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the journal's life

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
