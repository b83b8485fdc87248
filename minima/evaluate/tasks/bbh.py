"""BIG-Bench Hard: one JSON/JSONL file of ``{input, target}`` examples per subtask (the file name is the subject).

Prompt (lm-eval's bbh few-shot): ``Q: {input}\\nA:`` after the first 3 examples of the file, which are then
not scored (or shots from a dev split); generation until a blank line; exact match after trimming.
"""

from __future__ import annotations

from minima.evaluate.tasks.base import FewshotSampler, GenerateUntilTask
from minima.evaluate.tasks.loading import Doc, Schema
from minima.evaluate.tasks.registry import register_task


def _doc(row: dict, where: str) -> Doc:
    return Doc(query=f"Q: {row['input']}\nA:", target=str(row["target"]), gold=str(row["target"]), raw=row, where=where)


class BBH(GenerateUntilTask):
    name = "bbh"
    default_shots = 3
    sampler = "first_n"
    has_subjects = True
    folders = ("bbh", "BIG-Bench-Hard")
    in_shared_data = False
    schemas = (
        Schema(
            "bbh",
            ("input", "target"),
            'JSON {"examples": [{"input", "target"}]} or JSONL {"input", "target"} '
            "(suzgun/BIG-Bench-Hard, HF lukaemon/bbh)",
            _doc,
        ),
    )
    until = ["</s>", "Q", "\n\n"]

    def subject_of(self, path):
        return path.stem

    def fewshot_sampler(self, data, subject, docs, settings):
        if data.fewshot_split is not None:
            return super().fewshot_sampler(data, subject, docs, settings)
        # One split: its first `shots` items are the examples and are not scored.
        n = settings.shots
        return FewshotSampler(docs[:n], "first_n", settings.fewshot_seed, same_split=False), docs[n:]

    def score_generation(self, doc, generation):
        return {"exact_match": float(generation.strip() == str(doc.gold).strip())}, {"gold": doc.gold}

    def metric_names(self, settings):
        return ("exact_match",)


register_task(BBH())
