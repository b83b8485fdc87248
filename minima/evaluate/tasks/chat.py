"""LLM-judged chat benchmarks (mt_bench, belle_eval, zbench, vicuna_bench, alpaca_eval): their question files.

The evaluated model answers each question and a judge grades it; the evaluate stage runs them through
:mod:`minima.evaluate.chat` and :mod:`minima.evaluate.judge`, not ``evaluate_model``.
"""

from __future__ import annotations

from minima.evaluate.tasks.base import Task
from minima.evaluate.tasks.registry import register_task


class ChatTask(Task):
    """An LLM-judged chat benchmark.

    ``question_format`` is the judge's question format; ``folders`` are looked up under data_dir and
    ``shared_files`` (relative to data_dir's parent, ../shared/data) are the fallback question files.
    """

    kind = "chat"

    def __init__(
        self,
        name: str,
        question_format: str,
        folders: tuple[str, ...],
        files: tuple[str, ...] = (),
        shared_files: tuple[str, ...] = (),
    ):
        self.name, self.question_format, self.folders = name, question_format, folders
        self.files, self.shared_files = files, shared_files

    @property
    def formats(self):
        return {self.question_format: f"see minima.evaluate.judge ({self.question_format} question set)"}


CHAT_TASKS: dict[str, ChatTask] = {
    t.name: register_task(t)
    for t in (
        ChatTask("mt_bench", "mt_bench", ("mt_bench", "mt-bench"), files=("question.jsonl",)),
        ChatTask(
            "belle_eval",
            "belle",
            ("belle_eval", "belle"),
            files=("eval_set.json", "belle_eval_set.jsonl"),
            shared_files=("instruction/belle_eval_set.jsonl",),
        ),
        ChatTask("zbench", "zbench", ("zbench", "z-bench", "Z-Bench")),
        ChatTask("vicuna_bench", "vicuna", ("vicuna_bench", "vicuna-bench", "vicuna"), files=("question.jsonl",)),
        ChatTask("alpaca_eval", "alpaca_eval", ("alpaca_eval",), files=("alpaca_eval.json",)),
    )
}
