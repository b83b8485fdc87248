"""A task's files: the doc record, row schemas, where a task's folder is, and eval/few-shot split picking.

Files are found by their schema (the keys of the first record, or a CSV header), not by a fixed name;
the split of a file comes from its path (see :func:`minima.evaluate.data.split_of`). When no file fits,
the error lists the formats the task reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from minima.core.errors import DataError, InputError
from minima.evaluate.data import first_row, list_files, read_rows, split_of

LETTERS = "ABCDEFGHIJ"


@dataclass
class Doc:
    """One evaluation item.

    ``query`` is the question text (lm-eval's ``doc_to_text``); ``choices`` the scored continuations of a
    multiple-choice item (or its contexts, when the choices are contexts sharing one continuation in
    ``target``). Generation tasks keep the reference answer in ``target`` and what they compare with in ``gold``.
    """

    query: str
    choices: list[str] = field(default_factory=list)
    gold: Any = None
    target: Any = None
    subject: str = ""
    raw: dict = field(default_factory=dict)
    where: str = ""  # file:line, for messages and samples.jsonl


@dataclass
class TaskData:
    """Loaded docs by subject ('' for tasks without subjects) for the eval and few-shot pools."""

    eval: dict[str, list[Doc]]
    fewshot: dict[str, list[Doc]]
    eval_split: Optional[str]
    fewshot_split: Optional[str]
    files: list[str]
    format: str
    fewshot_short: dict[str, int] = field(default_factory=dict)  # subject -> shots used, where the pool was short

    def info(self) -> dict:
        """What results.json records about the data (and the subjects that got fewer shots than asked)."""
        return {
            "split": self.eval_split,
            "fewshot_split": self.fewshot_split,
            "format": self.format,
            "files": len(self.files),
            **({"fewshot_short": dict(self.fewshot_short)} if self.fewshot_short else {}),
        }


RowParser = Callable[[dict, str], Union[Doc, list[Doc]]]


@dataclass(frozen=True)
class Schema:
    """One row format of a task: the keys that identify it, a one-line description, and row -> doc(s).

    ``to_doc(row, where)`` gets the row and its ``file:line``; ``when(row)`` is an extra test on the
    first row (e.g. a field's type) when the keys alone are ambiguous.
    """

    name: str
    keys: tuple[str, ...]
    describe: str
    to_doc: RowParser
    when: Optional[Callable[[dict], bool]] = None

    def matches(self, row) -> bool:
        return isinstance(row, dict) and all(k in row for k in self.keys) and (self.when is None or self.when(row))


def parse_rows(path: Path, schema: Schema) -> list[Doc]:
    """Every row of a JSON-like file through ``schema``; a missing or malformed field names ``file:line``."""
    docs: list[Doc] = []
    for line, row in read_rows(path):
        where = f"{path}:{line}"
        try:
            got = schema.to_doc(row, where)
        except (KeyError, TypeError) as e:
            raise DataError(
                f"missing or malformed field {e} for the {schema.name} format ({schema.describe})", where=where
            ) from None
        docs.extend(got if isinstance(got, list) else [got])
    return docs


def gold_index(value, n: int, where: str, labels: Optional[list[str]] = None) -> int:
    """A gold answer given as an int index, a letter A-D, a number '1'-'4' or one of ``labels``."""
    if isinstance(value, bool):
        raise DataError(f"gold answer {value!r} is not an index or a letter", where=where)
    if labels is not None and str(value).strip() in labels:
        return labels.index(str(value).strip())
    if isinstance(value, int):
        idx = value
    else:
        s = str(value).strip()
        if len(s) == 1 and s.upper() in LETTERS:
            idx = LETTERS.index(s.upper())
        elif s.isdigit():
            idx = int(s) - 1 if labels is not None else int(s)
        else:
            raise DataError(
                f"gold answer {value!r} is not an index, a letter or a choice label",
                where=where,
                fix="use A-D, 1-4 or a 0-based index",
            )
    if not 0 <= idx < n:
        raise DataError(f"gold answer {value!r} is out of range for {n} choices", where=where)
    return idx


# ----------------------------------------------------------------------------------- discovery
def task_root(task, data_dir: Optional[Path], path: Optional[str]) -> Path:
    """Where a task's files live: its ``path`` override, else the first existing ``data_dir/<folder>``."""
    if path:
        p = Path(path).expanduser()
        if not p.exists() and not any(ch in path for ch in "*?["):
            raise InputError(
                f"{task.name}: path {p} does not exist",
                where=f"tasks.{task.name}.path",
                fix="point it at the benchmark folder or file",
            )
        return p
    if data_dir is None:
        raise InputError(
            f"{task.name}: no data_dir and no tasks.{task.name}.path",
            fix=f"set data_dir=DIR (one folder per benchmark) or tasks.{task.name}.path=...",
        )
    for folder in task.folders:
        if (data_dir / folder).exists():
            return data_dir / folder
    raise InputError(
        f"{task.name}: none of {', '.join(task.folders)} found under {data_dir}",
        fix=f"set tasks.{task.name}.path=..."
        + ("" if task.in_shared_data else " (these files are not in ../shared/data)"),
    )


def load_task(
    task,
    root: Path,
    split: Optional[str] = None,
    fmt: Optional[str] = None,
    limit: Optional[int] = None,
    subjects: Optional[list[str]] = None,
) -> TaskData:
    """Find ``task``'s files under ``root`` by schema, parse them, and pick the eval and few-shot splits.

    The eval split is ``split``, else the first labelled one of test, val, dev; the few-shot pool is
    dev, train or val (another split than the eval one), else the full eval split itself (as lm-eval).
    """
    base = root if root.is_dir() else None
    found: dict[str, list[tuple[Path, str]]] = {}
    seen = []
    for f in list_files(root):
        if not task.accept_file(f):
            continue
        row = first_row(f)
        if row is None:
            continue
        got = task.detect(f, row)
        if fmt and got and got != fmt:
            got = fmt if fmt in task.formats else None
        if got is None:
            seen.append(f)
            continue
        found.setdefault(split_of(f, base) or "test", []).append((f, got))
    if not found:
        expected = "; ".join(f"{k}: {v}" for k, v in task.formats.items())
        what = f"found {len(seen)} data file(s) in another format, e.g. {seen[0]}" if seen else "found no data files"
        raise InputError(
            f"{task.name}: no file under {root} has a format this task reads ({what})",
            where=str(seen[0]) if seen else str(root),
            fix=f"expected one of: {expected}",
        )

    def parse_split(name: str) -> dict[str, list[Doc]]:
        out: dict[str, list[Doc]] = {}
        for f, got in found[name]:
            for d in task.parse(f, got):
                out.setdefault(d.subject or (task.subject_of(f) if task.has_subjects else ""), []).append(d)
        return out

    order = [split] if split else ["test", "val", "dev"]
    if split and split not in found:
        raise InputError(
            f"{task.name}: no '{split}' split under {root} (found: {', '.join(sorted(found))})",
            where=f"tasks.{task.name}.split",
        )
    eval_split, eval_docs = None, None
    for name in order:
        if name not in found:
            continue
        docs = parse_split(name)
        if any(d.gold is not None for ds in docs.values() for d in ds):
            eval_split, eval_docs = name, docs
            break
    if eval_docs is None:
        raise InputError(
            f"{task.name}: no labelled split to evaluate under {root} (found: {', '.join(sorted(found))})",
            fix="point the task at a split with answers (C-Eval's public test split has none; use val)",
        )
    eval_docs = {s: [d for d in ds if d.gold is not None] for s, ds in eval_docs.items()}
    if subjects:
        missing = sorted(set(subjects) - set(eval_docs))
        if missing:
            import difflib

            close = difflib.get_close_matches(missing[0], list(eval_docs), n=1)
            raise InputError(
                f"{task.name}: no subject {missing[0]!r} under {root}",
                where=f"tasks.{task.name}.subjects",
                fix=f"did you mean {close[0]!r}?" if close else f"subjects: {', '.join(sorted(eval_docs))}",
            )
        eval_docs = {s: eval_docs[s] for s in subjects}
    fs_split = next((s for s in ("dev", "train", "val") if s in found and s != eval_split), None)
    # With no other split, shots come from the eval split itself (the full one, as in lm-eval).
    fewshot = parse_split(fs_split) if fs_split else {s: list(ds) for s, ds in eval_docs.items()}
    fewshot = {s: [d for d in ds if d.gold is not None] for s, ds in fewshot.items()}
    if limit:
        eval_docs = {s: ds[:limit] for s, ds in eval_docs.items()}
    files = [str(f) for name in found for f, _ in found[name]]
    fmts = sorted({g for name in found for _, g in found[name]})
    return TaskData(
        eval=dict(sorted(eval_docs.items())),
        fewshot=fewshot,
        eval_split=eval_split,
        fewshot_split=fs_split,
        files=files,
        format=",".join(fmts),
    )
