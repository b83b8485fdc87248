"""Winogrande: fill a sentence's blank with one of two options; JSONL in the llm-foundry or allenai layout.

Prompt (lm-eval's partial evaluation): two contexts, the sentence up to the blank filled with each option,
each scored on the shared rest of the sentence; acc_norm (over the contexts' lengths) is an extra metric.
"""

from __future__ import annotations

from minima.core.errors import DataError
from minima.evaluate.tasks.base import MultipleChoiceTask, Request
from minima.evaluate.tasks.loading import Doc, Schema, gold_index
from minima.evaluate.tasks.registry import register_task


def _llmfoundry(row: dict, where: str) -> Doc:
    contexts = [str(c) for c in row["context_options"]]
    gold = gold_index(row["gold"], len(contexts), where)
    return Doc(query="", choices=contexts, gold=gold, target=str(row["continuation"]).strip(), raw=row, where=where)


def _original(row: dict, where: str) -> Doc:
    s = row["sentence"]
    if "_" not in s:
        raise DataError("sentence has no '_' blank", where=where)
    i = s.index("_")
    ans = str(row["answer"]).strip()
    gold = None if ans == "" else gold_index(ans, 2, where, labels=["1", "2"])
    contexts = [s[:i] + row["option1"], s[:i] + row["option2"]]
    return Doc(query="", choices=contexts, gold=gold, target=s[i + 1 :].strip(), raw=row, where=where)


class Winogrande(MultipleChoiceTask):
    """The choices are contexts: each shot is the right context and the continuation, and each context is scored."""

    name = "winogrande"
    folders = ("winogrande",)
    schemas = (
        Schema(
            "llmfoundry",
            ("context_options", "continuation", "gold"),
            'JSONL {"context_options": [2], "continuation", "gold"} (llm-foundry)',
            _llmfoundry,
        ),
        Schema(
            "original",
            ("sentence", "option1", "option2", "answer"),
            'JSONL {"sentence" with "_", "option1", "option2", "answer": "1"|"2"} (allenai winogrande, HF)',
            _original,
        ),
    )

    def fewshot_text(self, doc):
        return doc.choices[doc.gold] + " " + doc.target

    def build_context(self, doc, shots, subject):
        prefix = super().build_context(doc, shots, subject)  # the query is empty: description and shots
        return [prefix + c for c in doc.choices]

    def requests(self, doc, context, settings):
        delim = self.target_delimiter(settings)
        return [Request("loglikelihood", (c, delim + doc.target)) for c in context]


register_task(Winogrande())
