"""The task registry: every task family file registers its tasks here by name."""

from __future__ import annotations

from minima.core.errors import InputError
from minima.evaluate.tasks.base import Task

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` under its name (a second task of the same name is an error)."""
    if not task.name or task.name in TASKS:
        raise ValueError(f"task name {task.name!r} is empty or already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``; an unknown name suggests the closest one."""
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, list(TASKS), n=1)
        raise InputError(
            f"unknown task '{name}'", fix=f"did you mean '{close[0]}'?" if close else f"tasks: {', '.join(TASKS)}"
        )
    return TASKS[name]
