"""HellaSwag: pick the ending of an activity description; JSONL in the original (rowanz, HF) or llm-foundry layout.

Prompt (lm-eval): ``{activity_label}: {ctx_a} {ctx_b}`` after lm-eval's cleanup, each ending scored; 0 shots.
"""

from __future__ import annotations

import re

from minima.evaluate.tasks.base import MultipleChoiceTask
from minima.evaluate.tasks.loading import Doc, Schema, gold_index
from minima.evaluate.tasks.registry import register_task


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: WikiHow ``[title]`` markers and bracketed artifacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _original(row: dict, where: str) -> Doc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    choices = [hellaswag_preprocess(e) for e in row["endings"]]
    label = row.get("label")
    gold = None if label in (None, "") else gold_index(int(label), len(choices), where)
    return Doc(
        query=hellaswag_preprocess(row["activity_label"] + ": " + ctx), choices=choices, gold=gold, raw=row, where=where
    )


def _llmfoundry(row: dict, where: str) -> Doc:
    choices = [str(c) for c in row["choices"]]
    return Doc(
        query=str(row["query"]),
        choices=choices,
        gold=gold_index(row["gold"], len(choices), where),
        raw=row,
        where=where,
    )


class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    folders = ("hellaswag",)
    schemas = (
        Schema(
            "original",
            ("activity_label", "ctx_a", "ctx_b", "endings"),
            'JSONL {"activity_label", "ctx_a", "ctx_b", "endings": [4], "label"} '
            "(rowanz/hellaswag and HF Rowan/hellaswag)",
            _original,
        ),
        Schema(
            "llmfoundry",
            ("query", "choices", "gold"),
            'JSONL {"query", "choices", "gold"} (llm-foundry, already preprocessed)',
            _llmfoundry,
        ),
    )


register_task(HellaSwag())
