"""GSM8K: grade-school math word problems (``test.jsonl``, shots from ``train*.jsonl``), 8-shot chain of thought.

Prompt (lm-eval's gsm8k.yaml): ``Question: {question}\\nAnswer:`` after worked solutions in file order;
generation until ``Question:``; exact match of the ``#### N`` answer (strict) and of the last number (flexible).
"""

from __future__ import annotations

from minima.core.errors import DataError
from minima.evaluate import metrics as M
from minima.evaluate.tasks.base import GenerateUntilTask
from minima.evaluate.tasks.loading import Doc, Schema
from minima.evaluate.tasks.registry import register_task

STRICT = r"#### (\-?[0-9\.\,]+)"  # lm-eval's strict-match filter
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # lm-eval's flexible-extract filter (last match)
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # regexes removed from both sides before exact match


def extract(generation: str) -> dict[str, str]:
    """The strict (``#### N``) and flexible (last number) answers of a GSM8K generation."""
    return {
        "strict-match": M.regex_extract(generation, STRICT, 0),
        "flexible-extract": M.regex_extract(generation, FLEXIBLE, -1),
    }


def _doc(row: dict, where: str) -> Doc:
    ans = str(row["answer"])
    if "####" not in ans:
        raise DataError("answer has no '#### N' final line", where=where)
    return Doc(
        query=f"Question: {row['question']}\nAnswer:",
        target=ans,
        gold=ans.split("####")[-1].strip(),
        raw=row,
        where=where,
    )


class GSM8K(GenerateUntilTask):
    name = "gsm8k"
    default_shots = 8
    sampler = "first_n"
    folders = ("gsm8k", "grade_school_math")
    schemas = (
        Schema(
            "jsonl",
            ("question", "answer"),
            'JSONL {"question", "answer": "... #### N"} (openai/grade-school-math, HF openai/gsm8k)',
            _doc,
            when=lambda row: "####" in str(row["answer"]),
        ),
    )
    until = ["Question:", "</s>", "<|im_end|>"]

    def score_generation(self, doc, generation):
        ext = extract(generation)
        item = {
            "exact_match_strict": M.exact_match(ext["strict-match"], doc.target, IGNORE, ignore_case=True),
            "exact_match_flexible": M.exact_match(ext["flexible-extract"], doc.target, IGNORE, ignore_case=True),
        }
        return item, {"extracted": ext, "gold": doc.gold}

    def metric_names(self, settings):
        return ("exact_match_strict", "exact_match_flexible")


register_task(GSM8K())
