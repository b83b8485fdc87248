"""Stage evaluate: benchmarks with lm-eval's numbers, computed faster, from local files.

- ``run(cfg, force=False)``: the stage (``minima evaluate model=DIR tasks=[mmlu,gsm8k] ...``) writing
  ``results.json``, ``samples.jsonl`` and ``report.md``.
- ``compare_main(argv)``: ``minima evaluate compare A B``.
- ``evaluate_model(model, tokenizer, tasks, ...)``: in-process scores, no files (pipeline, notebooks).
- ``EvalCallback(tasks, shots, every_n_steps)``: ``on_eval(step, model, ctx)`` during training;
  ``training_callbacks(cfg)`` turns a train config's ``eval_tasks`` into ``train_stage(callbacks=...)``.

Tasks: mmlu ceval cmmlu arc_easy arc_challenge hellaswag winogrande demo_mc (multiple choice),
gsm8k bbh drop humaneval (generation), perplexity (rolling windows over text files); mt_bench belle_eval
zbench vicuna_bench alpaca_eval (LLM-judged chat, stage only; see ``chat.py``).
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
