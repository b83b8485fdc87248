"""Evaluation: the runner, one file per task family (prompt + scoring), metrics, the sandbox, the judge.

May import minima.compress, minima.train, minima.infer, minima.models, minima.data and minima.core;
the stage that writes results.json lives in :mod:`minima.stages.evaluate`.

- ``evaluate_model(model, tokenizer, tasks, ...)``: in-process scores, no files (pipeline, notebooks).
- ``compare_main(argv)``: ``minima evaluate compare A B``.
- ``EvalCallback(tasks, shots, every_n_steps)``: ``on_eval(step, model, ctx)`` during training;
  ``training_callbacks(cfg)`` turns a train config's ``eval_tasks`` into ``train_stage(callbacks=...)``.
- ``TASKS``: the task registry (:mod:`minima.evaluate.tasks`); ``sandbox.run_program`` runs generated code.
"""

from __future__ import annotations

from minima.evaluate.callback import EvalCallback, callback_factory, training_callbacks
from minima.evaluate.core import evaluate_model
from minima.evaluate.report import compare, compare_main
from minima.evaluate.tasks import TASKS

__all__ = [
    "compare",
    "compare_main",
    "evaluate_model",
    "EvalCallback",
    "callback_factory",
    "training_callbacks",
    "TASKS",
]
