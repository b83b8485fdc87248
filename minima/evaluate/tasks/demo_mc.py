"""demo_mc: the demo corpus's multiple-choice questions (``eval/demo_mc/{dev,test}.jsonl`` written by minima.data.demo).

Prompt: ``Question: {question}\\nAnswer:`` plus the answer sentence's stem when given, each choice scored.
"""

from __future__ import annotations

from minima.evaluate.tasks.base import Instance, MultipleChoiceTask
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

    def instances(self, data, settings):
        if not settings.chat_template:
            return super().instances(data, settings)
        out = []  # a chat model: the question as its user turn, the stem as the start of its reply
        for subject, docs in data.eval.items():
            for doc in docs:
                stem = doc.raw.get("prefix") or ""
                ctx = settings.render(str(doc.raw["question"])) + (f" {stem}" if stem else "")
                out.append(Instance(subject, doc, self.requests(doc, ctx, settings)))
        return out

    def target_delimiter(self, settings):
        return " "  # the context ends in the stem, never in a chat template's tag


register_task(DemoMC())
