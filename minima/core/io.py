"""Small file helpers: JSON lines journals that resume, atomic JSON writes, string-list coercion."""

from __future__ import annotations

import json
import os
from pathlib import Path

from minima.core.errors import DataError


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
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
