"""Input documents: files of text or chat records -> documents with their ``file:line`` origin.

Files are read by :mod:`minima.core.io` (by extension):

- ``.txt``: one document per line (LF or CRLF; blank lines separate nothing and are not
  documents), or one per file (``txt_document="file"``);
- ``.jsonl`` / ``.json``: one JSON record per line, or a JSON array of records (JSON Lines under a
  ``.json`` name are recognised, as many datasets ship them);
- ``.parquet`` and ``.csv`` (with a header row).

For ``format=lm`` a record's text is ``record[text_key]``; for ``format=chat`` the whole record is a
conversation in one of the shapes :func:`minima.data.formats.normalise_conversation` knows, or a raw
record that a named loader or a ``columns`` mapping turns into one (:mod:`minima.data.records.loaders`); for
``format=preference`` a pair in one of the shapes of :mod:`minima.data.preference` (the file's first
record fixes the file's shape).
Malformed records raise :class:`DataError` naming ``file:line`` (or ``file:row N``), or, with
``on_error="skip"``, are reported to ``on_skip`` and left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from minima.core import io
from minima.core.errors import ConfigError, DataError, InputError
from minima.data.formats import normalise_conversation, split_messages
from minima.data.records.loaders import Loader, as_instruction

SUFFIXES = tuple(io.KINDS)  # .txt .jsonl .json .csv .parquet


@dataclass
class SourceItem:
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
        loader: chat: a named loader or columns mapping that turns each raw record into a conversation.
    """

    def __init__(
        self,
        fmt: str,
        text_key: str = "text",
        txt_document: str = "line",
        shape: str = "auto",
        on_skip: Optional[SkipFn] = None,
        loader: Optional[Loader] = None,
    ):
        self.fmt, self.text_key, self.txt_document, self.shape = fmt, text_key, txt_document, shape
        self.on_skip, self.loader = on_skip, loader
        self.stats = ReadStats()

    # ------------------------------------------------------------------------------- helpers
    def _bad(self, where: str, reason: str, fix: str) -> None:
        if self.on_skip is None:
            raise DataError(reason, where=where, fix=fix)
        self.stats.skipped += 1
        self.on_skip(where, reason)

    def _emit(self, payload: Any, where: str) -> Iterator[SourceItem]:
        self.stats.records += 1
        if self.fmt == "lm" and not payload.strip():
            self.stats.empty += 1
            return
        yield SourceItem(payload, where)

    def _from_record(self, rec: Any, where: str, first: bool) -> Iterator[SourceItem]:
        """A parsed record -> a SourceItem (validating the text field or the conversation shape)."""
        if self.fmt == "preference":
            yield from self._preference(rec, where, first)
            return
        if self.fmt == "chat" and self.loader is not None:
            try:
                msgs = self.loader.to_messages(rec)
                if self.shape == "instruction":
                    msgs = as_instruction(msgs)
                split_messages(msgs)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                reason = f"{self.loader.name}: {e}"
                if first and "missing column" in str(e):  # the wrong loader or mapping for these files
                    raise ConfigError(
                        reason,
                        where=where,
                        fix=f"check that the files hold {self.loader.name} records, or set the source's loader/columns",
                    ) from None
                self._bad(where, reason, "fix or remove the record, or set on_error=skip")
                return
            yield from self._emit(msgs, where)
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

    def _preference(self, rec: Any, where: str, first: bool) -> Iterator[SourceItem]:
        """A preference record -> a SourceItem holding a :class:`~minima.data.preference.Pair`; the shape is the file's
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
    def read(self, path: Path) -> Iterator[SourceItem]:
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

    def _skip_or_raise(self, where: str, reason: str, fix: str) -> None:
        """``on_error`` of the core readers: a bad line is skipped under on_error=skip, else an error."""
        self._bad(where, reason, f"{fix}, or set on_error=skip")

    def _read_txt(self, path: Path) -> Iterator[SourceItem]:
        if self.txt_document == "file":
            try:
                text = io.read_text(path)
            except DataError as e:
                self._skip_or_raise(e.where or str(path), e.what, e.fix or io.UTF8_FIX)
                return
            yield from self._emit(text, str(path))
            return
        for n, line in io.read_text_lines(path, self._skip_or_raise):
            yield from self._emit(line, f"{path}:{n}")

    def _read_json(self, path: Path) -> Iterator[SourceItem]:
        if _suffix(path) == ".jsonl" or io.is_json_lines(path):
            for i, (n, rec) in enumerate(io.iter_jsonl(path, self._skip_or_raise)):
                yield from self._from_record(rec, f"{path}:{n}", i == 0)
            return
        for i, line, rec in io.iter_json_array(path):
            yield from self._from_record(rec, f"{path}:{line} (record {i - 1})", i == 1)

    def _read_table(self, path: Path, kind: str) -> Iterator[SourceItem]:
        if kind == "csv":
            header = self.loader.csv_header if self.loader is not None else True
            rows = ((f"{path}:{n}", row) for n, row in io.iter_csv(path, header, on_error=self._skip_or_raise))
        else:
            rows = ((f"{path}:row {n - 1}", row) for n, row in io.iter_parquet(path))
        for i, (where, row) in enumerate(rows):
            yield from self._from_record(row, where, i == 0)
