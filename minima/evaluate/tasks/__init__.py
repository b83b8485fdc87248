"""Benchmark tasks, one file per family: each owns its data parsing, its prompt and its scoring.

``base.py`` is the interface (:class:`Task`: load docs, build contexts, requests, per-item scores,
aggregation), ``loading.py`` the file discovery and split picking, ``registry.py`` the name -> task table.
Importing this package registers every family in :data:`TASKS`. Prompts follow lm-eval 0.4, so scores are
the harness's scores. Imports: minima.core and minima.evaluate's data, metrics and sandbox.
"""

from __future__ import annotations

# isort: off
# Each family registers its tasks on import; this order is the order of TASKS.
from minima.evaluate.tasks import mmlu, arc, hellaswag, winogrande, demo_mc  # noqa: F401
from minima.evaluate.tasks import gsm8k, bbh, drop, humaneval, demo_qa, perplexity, chat  # noqa: F401
from minima.evaluate.tasks import preference  # noqa: F401

# isort: on
from minima.evaluate.tasks.base import (
    KINDS,
    FewshotSampler,
    GenerateUntilTask,
    Instance,
    MultipleChoiceTask,
    Request,
    Scored,
    Settings,
    Task,
)
from minima.evaluate.tasks.chat import CHAT_TASKS, ChatTask
from minima.evaluate.tasks.loading import Doc, Schema, TaskData, load_task, task_root
from minima.evaluate.tasks.registry import TASKS, get_task, register_task

__all__ = [
    "CHAT_TASKS",
    "KINDS",
    "TASKS",
    "ChatTask",
    "Doc",
    "FewshotSampler",
    "GenerateUntilTask",
    "Instance",
    "MultipleChoiceTask",
    "Request",
    "Schema",
    "Scored",
    "Settings",
    "Task",
    "TaskData",
    "get_task",
    "load_task",
    "register_task",
    "task_root",
]
