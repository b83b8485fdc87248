"""Few-shot sampling: no item is ever its own example, shots come from another split when one exists,
and a pool too small gives fewer shots with one warning (never an error)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import shared

from minima.evaluate.tasks import get_task, load_task
from minima.evaluate.tasks.base import FewshotSampler, Settings


class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.fixture
def warnings_seen():
    h = _Catch()
    log = logging.getLogger("minima")
    log.addHandler(h)
    yield h.records
    log.removeHandler(h)


def _contexts(task_name: str, root: Path, shots: int, limit=None) -> tuple[list, object]:
    task = get_task(task_name)
    data = load_task(task, root, limit=limit)
    settings = Settings(shots=shots, limit=limit)
    return task.instances(data, settings), data


def _shots_in(inst, task, data) -> list:
    """The pool docs whose solved-example text appears in the instance's context."""
    ctx = inst.requests[0].args[0]
    pool = data.fewshot.get(inst.subject) or data.fewshot.get("", [])
    return [d for d in pool if task.fewshot_text(d) + "\n\n" in ctx]


def _write_mmlu(d: Path, subject: str, split: str, rows: list[tuple]) -> None:
    (d / split).mkdir(parents=True, exist_ok=True)
    lines = [",".join(r) for r in rows]
    (d / split / f"{subject}_{split}.csv").write_text("\n".join(lines) + "\n")


def _rows(prefix: str, n: int) -> list[tuple]:
    return [(f"{prefix} question {i}?", "w", "x", "y", "z", "ABCD"[i % 4]) for i in range(n)]


@pytest.mark.parametrize("kind", ["first_n", "random"])
def test_single_split_never_uses_the_scored_item(kind):
    """Hand check: for each doc of a 6-doc pool, 5 shots are exactly the other 5 (in either sampler)."""
    from minima.evaluate.tasks.loading import Doc

    pool = [Doc(query=f"q{i}", raw={"i": i}) for i in range(6)]
    s = FewshotSampler(pool, kind, seed=1234, same_split=True)
    for doc in pool:
        got = s.sample(5, doc)
        assert doc not in got and len(got) == 5 and {d.raw["i"] for d in got} == set(range(6)) - {doc.raw["i"]}
    assert s.short is None
    # 6 asked of 5 others: all 5 are used and the shortfall is recorded, never raised
    assert len(s.sample(6, pool[0])) == 5 and s.short == (6, 5)


def test_single_file_task_excludes_the_item(tmp_path, warnings_seen):
    """One file (eval split = pool): no context holds its own item; 4 others -> 4 shots and one warning."""
    _write_mmlu(tmp_path, "anatomy", "dev", _rows("anatomy", 5))
    _write_mmlu(tmp_path, "virology", "dev", _rows("virology", 8))
    insts, data = _contexts("mmlu", tmp_path, shots=5)
    task = get_task("mmlu")
    assert data.fewshot_split is None and len(insts) == 13
    for inst in insts:
        used = _shots_in(inst, task, data)
        assert inst.doc not in used and all(d.raw != inst.doc.raw for d in used)
        # the question itself appears once: as the scored item only
        assert inst.requests[0].args[0].count(inst.doc.raw["question"]) == 1
        assert len(used) == (4 if inst.subject == "anatomy" else 5)
    assert len(warnings_seen) == 1
    assert "mmlu/anatomy" in warnings_seen[0] and "virology" not in warnings_seen[0], warnings_seen


def test_shots_come_from_the_other_split(tmp_path, warnings_seen):
    """With a dev split beside val, shots are dev items (in order) and never a val item."""
    _write_mmlu(tmp_path, "anatomy", "dev", _rows("dev", 5))
    _write_mmlu(tmp_path, "anatomy", "val", _rows("val", 7))
    insts, data = _contexts("mmlu", tmp_path, shots=5)
    task = get_task("mmlu")
    assert (data.eval_split, data.fewshot_split) == ("val", "dev")
    for inst in insts:
        used = _shots_in(inst, task, data)
        assert [d.raw["question"] for d in used] == [f"dev question {i}?" for i in range(5)]
        assert "dev" not in inst.doc.raw["question"]
    assert warnings_seen == []


def test_random_sampler_single_file_real_arc(warnings_seen):
    """ARC ships one file: lm-eval draws n+1 and drops the scored doc; never its own example."""
    root = shared("eval/arc/arc_easy_llmfoundry_500.jsonl")
    insts, data = _contexts("arc_easy", root, shots=3, limit=40)
    task = get_task("arc_easy")
    assert data.fewshot_split is None
    for inst in insts:
        used = _shots_in(inst, task, data)
        assert len(used) == 3 and all(d.raw != inst.doc.raw for d in used)
    assert warnings_seen == []


def test_cmmlu_dev_only_falls_back_with_one_warning(warnings_seen):
    """CMMLU ships only dev (5 per subject): 5 shots -> 4 others per item, one warning naming the task."""
    root = shared("eval/cmmlu")
    insts, data = _contexts("cmmlu", root, shots=5, limit=2)
    task = get_task("cmmlu")
    assert data.eval_split == "dev" and data.fewshot_split is None
    for inst in insts:
        used = _shots_in(inst, task, data)
        assert len(used) == 4 and all(d.raw != inst.doc.raw for d in used)
    assert len(warnings_seen) == 1 and "cmmlu" in warnings_seen[0] and "cmmlu/agronomy" in warnings_seen[0]
    assert data.info()["fewshot_short"] == dict.fromkeys(data.eval, 4)  # results.json says what was used
