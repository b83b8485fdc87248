"""Input readers: files of text or chat records -> documents with their ``file:line`` origin.

Supported files (by extension):

- ``.txt``: one document per line (LF or CRLF; blank lines separate nothing and are not
  documents), or one per file (``txt_document="file"``);
- ``.jsonl`` / ``.json``: one JSON record per line, or a JSON array of records (a ``.json`` whose
  first character is not ``[`` is read as JSON Lines, as many datasets ship it);
- ``.parquet`` (pandas/pyarrow) and ``.csv`` (pandas, with a header row).

For ``format=lm`` a record's text is ``record[text_key]``; for ``format=chat`` the whole record is a
conversation in one of the shapes :func:`minima.data.formats.normalise_conversation` knows; for
``format=preference`` a pair in one of the shapes of :mod:`minima.data.preference` (the file's first
record fixes the file's shape).
Malformed records raise :class:`DataError` naming ``file:line`` (or ``file:row N``), or, with
``on_error="skip"``, are reported to ``on_skip`` and left out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from minima.core.errors import ConfigError, DataError, InputError
from minima.data.formats import normalise_conversation

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Doc:
    """One document (lm: a string) or conversation (chat: normalised messages) and its origin."""

    payload: Any
    where: str


@dataclass
class ReadStats:
    """Per-source counts gathered while reading."""

    files: int = 0
    records: int = 0
    empty: int = 0
    skipped: int = 0


SkipFn = Callable[[str, str], None]  # (where, reason)


def resolve_files(pattern: str) -> list[Path]:
    """Files for a path, directory (recursive) or glob; InputError when nothing usable matches."""
    import glob

    p = Path(pattern).expanduser()
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.is_file() and _suffix(x) in SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(x) for x in glob.glob(str(p), recursive=True) if Path(x).is_file())
    if not files:
        raise InputError(
            f"no input files match {pattern!r}", fix="check the path/glob (relative paths are from the current dir)"
        )
    bad = [f for f in files if _suffix(f) not in SUFFIXES]
    if bad:
        raise InputError(
            f"unsupported input file type: {bad[0]}", fix=f"use one of {', '.join(SUFFIXES)} (or narrow the glob)"
        )
    return files


def _suffix(path: Path) -> str:
    return path.suffix.lower()


class SourceReader:
    """Reads the documents of one source's files.

    Args:
        fmt: ``"lm"`` or ``"chat"``.
        text_key: lm: the field holding the text in json/jsonl/parquet/csv records.
        txt_document: ``"line"`` or ``"file"`` for .txt inputs.
        shape: chat: the conversation shape (``"auto"`` detects it per record).
        on_skip: called with (where, reason) for a malformed record; None raises DataError.
    """

    def __init__(
        self,
        fmt: str,
        text_key: str = "text",
        txt_document: str = "line",
        shape: str = "auto",
        on_skip: Optional[SkipFn] = None,
    ):
        self.fmt, self.text_key, self.txt_document, self.shape = fmt, text_key, txt_document, shape
        self.on_skip = on_skip
        self.stats = ReadStats()

    # ------------------------------------------------------------------------------- helpers
    def _bad(self, where: str, reason: str, fix: str) -> None:
        if self.on_skip is None:
            raise DataError(reason, where=where, fix=fix)
        self.stats.skipped += 1
        self.on_skip(where, reason)

    def _emit(self, payload: Any, where: str) -> Iterator[Doc]:
        self.stats.records += 1
        if self.fmt == "lm" and not payload.strip():
            self.stats.empty += 1
            return
        yield Doc(payload, where)

    def _from_record(self, rec: Any, where: str, first: bool) -> Iterator[Doc]:
        """A parsed record -> a Doc (validating the text field or the conversation shape)."""
        if self.fmt == "preference":
            yield from self._preference(rec, where, first)
            return
        if self.fmt == "chat":
            try:
                msgs = normalise_conversation(rec, self.shape)
            except ValueError as e:
                if first and self.shape == "auto" and "unrecognised conversation shape" in str(e):
                    raise ConfigError(
                        f"{e}",
                        where=where,
                        fix="format=chat reads MiniChat, ShareGPT, Alpaca or messages records; "
                        "use format=lm with text_key for plain text",
                    ) from None
                self._bad(where, f"bad conversation: {e}", "fix or remove the record, or set on_error=skip")
                return
            yield from self._emit(msgs, where)
            return
        if not isinstance(rec, dict):
            self._bad(
                where,
                f"expected a JSON object with a {self.text_key!r} field, got {type(rec).__name__}",
                "one JSON object per record",
            )
            return
        if self.text_key not in rec:
            if first:
                keys = ", ".join(sorted(map(str, rec))[:12])
                raise ConfigError(
                    f"text_key {self.text_key!r} is not a field of the records (fields: {keys})",
                    where=where,
                    fix="set text_key (or the source's text_key) to the field that holds the text",
                )
            self._bad(where, f"record has no {self.text_key!r} field", "fix or remove the record, or set on_error=skip")
            return
        text = rec[self.text_key]
        if not isinstance(text, str):
            self._bad(
                where,
                f"{self.text_key!r} is {type(text).__name__}, not a string",
                "fix or remove the record, or set on_error=skip",
            )
            return
        yield from self._emit(text, where)

    def _preference(self, rec: Any, where: str, first: bool) -> Iterator[Doc]:
        """A preference record -> a Doc holding a :class:`~minima.data.preference.Pair`; the shape is the file's
        first record's."""
        from minima.data.preference import detect_shape, normalise_pair

        if first:
            try:
                self.pair_shape = detect_shape(rec)
            except ValueError as e:
                raise ConfigError(
                    str(e), where=where, fix="format=preference reads prompt/chosen/rejected records"
                ) from None
        try:
            pair = normalise_pair(rec, self.pair_shape)
        except ValueError as e:
            self._bad(where, f"bad preference pair: {e}", "fix or remove the record, or set on_error=skip")
            return
        yield from self._emit(pair, where)

    # ------------------------------------------------------------------------------- readers
    def read(self, path: Path) -> Iterator[Doc]:
        """Documents of one file, in file order."""
        self.stats.files += 1
        suffix = _suffix(path)
        if suffix == ".txt":
            if self.fmt != "lm":
                raise ConfigError(
                    f"format={self.fmt} cannot read plain text: {path}", fix="use json/jsonl files, or format=lm"
                )
            yield from self._read_txt(path)
        elif suffix in (".jsonl", ".json"):
            yield from self._read_json(path)
        elif suffix == ".parquet":
            yield from self._read_table(path, "parquet")
        elif suffix == ".csv":
            yield from self._read_table(path, "csv")
        else:  # pragma: no cover - resolve_files filters
            raise InputError(f"unsupported input file type: {path}")

    def _lines(self, path: Path) -> Iterator[tuple[int, str]]:
        """(1-based line number, text without the line break); undecodable lines go to _bad."""
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad(
                        f"{path}:{n}",
                        f"not UTF-8 ({e.reason} at byte {e.start} of the line)",
                        "re-encode the file as UTF-8",
                    )
                    continue
                if n == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if line.endswith("\n"):
                    line = line[:-1]
                    if line.endswith("\r"):
                        line = line[:-1]
                yield n, line

    def _read_txt(self, path: Path) -> Iterator[Doc]:
        if self.txt_document == "file":
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad(str(path), f"not UTF-8 ({e.reason} at byte {e.start})", "re-encode the file as UTF-8")
                return
            yield from self._emit(text.removeprefix("\ufeff"), str(path))
            return
        for n, line in self._lines(path):
            yield from self._emit(line, f"{path}:{n}")

    def _read_json(self, path: Path) -> Iterator[Doc]:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
        if not head:
            return
        if path.suffix.lower() == ".json" and head[:1] == b"[":
            yield from self._read_json_array(path)
            return
        first = True
        for n, line in self._lines(path):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad(where, f"malformed JSON: {e.msg} (column {e.colno})", "fix the line, or set on_error=skip")
                continue
            yield from self._from_record(rec, where, first)
            first = False

    def _read_json_array(self, path: Path) -> Iterator[Doc]:
        text = path.read_bytes().decode("utf-8", errors="strict").removeprefix("\ufeff")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # A broken array cannot be skipped record by record: it is one value.
            raise DataError(
                f"malformed JSON: {e.msg} (column {e.colno})",
                where=f"{path}:{e.lineno}",
                fix="fix the file (a JSON array must parse as a whole)",
            ) from None
        line_of = _array_item_lines(text, len(data))
        for i, rec in enumerate(data):
            yield from self._from_record(rec, f"{path}:{line_of[i]} (record {i})", i == 0)

    def _read_table(self, path: Path, kind: str) -> Iterator[Doc]:
        import pandas as pd

        try:
            df = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path, dtype=object, keep_default_na=False)
        except Exception as e:
            raise DataError(
                f"cannot read {kind}: {str(e).splitlines()[0][:200]}",
                where=str(path),
                fix=f"check that it is a valid {kind} file",
            ) from None
        line0 = 2 if kind == "csv" else 0  # csv: header is line 1
        where = (lambda i: f"{path}:{i + line0}") if kind == "csv" else (lambda i: f"{path}:row {i}")
        if self.fmt == "lm":
            if self.text_key not in df.columns:
                raise ConfigError(
                    f"text_key {self.text_key!r} is not a column (columns: {', '.join(map(str, df.columns[:12]))})",
                    where=str(path),
                    fix="set text_key (or the source's text_key) to the column that holds the text",
                )
            for i, text in enumerate(df[self.text_key].tolist()):
                if not isinstance(text, str):
                    self._bad(
                        where(i),
                        f"{self.text_key!r} is {type(text).__name__}, not a string",
                        "fix or remove the row, or set on_error=skip",
                    )
                    continue
                yield from self._emit(text, where(i))
            return
        for i, row in enumerate(df.to_dict(orient="records")):
            yield from self._from_record(_plain(row), where(i), i == 0)


def _plain(value: Any) -> Any:
    """numpy arrays/scalars from parquet -> lists/Python scalars, so shapes are recognised."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _array_item_lines(text: str, n: int) -> list[int]:
    """The 1-based line where each top-level item of a JSON array starts (for error messages)."""
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
