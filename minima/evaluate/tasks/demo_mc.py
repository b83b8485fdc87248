"""demo_mc: the demo corpus's multiple-choice questions (``eval/demo_mc/{dev,test}.jsonl`` written by minima.data.demo).

Prompt: ``Question: {question}\\nAnswer:`` plus the answer sentence's stem when given, each choice scored.
"""

from __future__ import annotations

from minima.evaluate.tasks.base import MultipleChoiceTask
from minima.evaluate.tasks.loading import Doc, Schema, gold_index
from minima.evaluate.tasks.registry import register_task


def _doc(row: dict, where: str) -> Doc:
    choices = [str(c) for c in row["choices"]]
    # The answer sentence's stem ("The capital of France is") makes the item a cloze that a
    # base model can score as well as a chat model.
    prefix = f" {row['prefix']}" if row.get("prefix") else ""
    return Doc(
        query=f"Question: {row['question']}\nAnswer:{prefix}",
        choices=choices,
        gold=gold_index(row["gold"], len(choices), where),
        raw=row,
        where=where,
    )


class DemoMC(MultipleChoiceTask):
    name = "demo_mc"
    folders = ("demo_mc", "eval/demo_mc")
    schemas = (
        Schema(
            "jsonl",
            ("question", "choices", "gold"),
            'JSONL {"question", "choices": [...], "gold": int, optional "prefix"} (minima demo corpus)',
            _doc,
            when=lambda row: isinstance(row["choices"], list),
        ),
    )


register_task(DemoMC())
