"""Reading benchmark files: JSON/JSONL/CSV/parquet rows with their line numbers, and split discovery.

The readers are thin layers over :mod:`minima.core.io` that add the benchmark layouts (BIG-Bench
``examples``, DROP's ``{id: row}``) and require object rows. Every reader yields ``(line, row)`` so
that a bad record is reported as ``file:line``. A task's files are found by their schema (see
``tasks/loading.py``), not by a fixed name; the split of a file comes from its path (``dev``,
``val``/``validation``, ``test``, ``train`` as a folder or a name token).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from minima.core import io
from minima.core.errors import DataError, InputError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_ALIASES = {"dev": "dev", "val": "val", "valid": "val", "validation": "val", "test": "test", "train": "train"}
_TOKEN = re.compile(r"[A-Za-z]+")


def split_of(path: Path, root: Optional[Path] = None) -> Optional[str]:
    """The split a file belongs to, read from its folder names and its file name tokens (None if unnamed)."""
    rel = path.relative_to(root) if root is not None and root in path.parents else Path(path.name)
    parts = list(rel.parts[:-1]) + [rel.stem]
    for part in reversed(parts):  # the nearest name wins: mmlu/val/anatomy_val.csv -> val
        for token in reversed(_TOKEN.findall(part.lower())):
            if token in SPLIT_ALIASES:
                return SPLIT_ALIASES[token]
    return None


def list_files(root: Path, suffixes=DATA_SUFFIXES, max_depth: int = 3) -> list[Path]:
    """Data files under ``root`` (or ``root`` itself, or a glob), sorted, skipping hidden ones."""
    s = str(root)
    if any(ch in s for ch in "*?["):
        import glob

        return sorted(Path(p) for p in glob.glob(s, recursive=True) if Path(p).is_file())
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if len(rel.parts) > max_depth or any(x.startswith(".") for x in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in suffixes:
            out.append(p)
    return out


def _one_object_per_line(where: str, reason: str, fix: str) -> None:
    raise DataError(reason, where=where, fix=f"{fix}; each line must be one JSON object")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a JSON Lines file; a bad line raises DataError naming ``file:line``."""
    for i, row in io.iter_jsonl(path, _one_object_per_line):
        if not isinstance(row, dict):
            raise DataError(
                f"expected a JSON object, got {type(row).__name__}",
                where=f"{path}:{i}",
                fix="each line must be one JSON object",
            )
        yield i, row


def read_json(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a ``.json`` file: a list of objects, an object of objects, or JSON Lines under a .json name."""
    if io.is_json_lines(path):  # e.g. BELLE's eval set
        yield from read_jsonl(path)
        return
    data = io.read_json(path)
    if isinstance(data, dict) and "examples" in data and isinstance(data["examples"], list):  # BIG-Bench layout
        data = data["examples"]
    if isinstance(data, dict):  # {id: row} (original DROP) -> rows with their key
        data = [dict(v, _key=k) if isinstance(v, dict) else {"_key": k, "value": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise DataError(f"expected a list of objects, got {type(data).__name__}", where=str(path))
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"item {i} is a {type(row).__name__}, expected an object", where=f"{path}:item {i}")
        yield i, row


def read_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Raw CSV rows (lists of strings) with the line each starts on; a malformed row raises DataError."""
    return io.iter_csv(path, header=False)


def read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a parquet file, numbered from 1."""
    return io.iter_parquet(path)


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Dict rows of any JSON-like data file (CSV files go through :func:`read_csv`)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise InputError(f"unsupported file type {suffix}", where=str(path), fix="use .jsonl, .json, .csv or .parquet")


def first_row(path: Path):
    """The first record of a data file (a dict, or a list of strings for CSV), or None if it is empty."""
    it = read_csv(path) if path.suffix.lower() == ".csv" else read_rows(path)
    for _, row in it:
        return row
    return None
