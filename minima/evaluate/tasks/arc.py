"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge): JSONL of the llm-foundry, AI2 original or HF layout.

Prompt (lm-eval): ``Question: {question}\\nAnswer:``, each choice text scored; shots drawn at random (seed 1234).
"""

from __future__ import annotations

from minima.evaluate.tasks.base import MultipleChoiceTask
from minima.evaluate.tasks.loading import Doc, Schema, gold_index
from minima.evaluate.tasks.registry import register_task


def _doc(question: str, choices: list, gold, labels, row: dict, where: str) -> Doc:
    texts = [str(t) for t in choices]
    return Doc(
        query=f"Question: {question}\nAnswer:",
        choices=texts,
        gold=gold_index(gold, len(texts), where, labels=labels),
        raw=row,
        where=where,
    )


def _llmfoundry(row: dict, where: str) -> Doc:
    q = str(row["query"])
    return _doc(q.removeprefix("Question: "), row["choices"], row["gold"], None, row, where)


def _original(row: dict, where: str) -> Doc:
    q = row["question"]
    labels = [str(c["label"]) for c in q["choices"]]
    return _doc(q["stem"], [c["text"] for c in q["choices"]], row["answerKey"], labels, row, where)


def _hf(row: dict, where: str) -> Doc:
    labels = [str(x) for x in row["choices"]["label"]]
    return _doc(row["question"], list(row["choices"]["text"]), row["answerKey"], labels, row, where)


SCHEMAS = (
    Schema(
        "llmfoundry",
        ("query", "choices", "gold"),
        'JSONL {"query": "Question: ...", "choices": [...], "gold": int} (llm-foundry)',
        _llmfoundry,
    ),
    Schema(
        "original",
        ("question", "answerKey"),
        'JSONL {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} (AI2 ARC-V1)',
        _original,
        when=lambda row: isinstance(row["question"], dict) and all(k in row["question"] for k in ("stem", "choices")),
    ),
    Schema(
        "hf",
        ("question", "choices", "answerKey"),
        'rows {"question": str, "choices": {"text": [...], "label": [...]}, "answerKey"} (HF allenai/ai2_arc)',
        _hf,
        when=lambda row: isinstance(row["question"], str) and isinstance(row["choices"], dict),
    ),
)


class ARC(MultipleChoiceTask):
    schemas = SCHEMAS

    def __init__(self, name: str):
        self.name = name
        self.variant = name.split("_", 1)[1]
        self.folders = (name, "arc", "ARC-" + self.variant.capitalize(), "ai2_arc")

    def accept_file(self, path):
        other = "challenge" if self.variant == "easy" else "easy"
        return other not in str(path).lower().replace(self.name, "")


register_task(ARC("arc_easy"))
register_task(ARC("arc_challenge"))
