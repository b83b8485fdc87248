"""MMLU, C-Eval and CMMLU: four-option exams, one CSV per subject (dev/val/test), 5 shots from dev in order.

Prompt (lm-eval): ``description(subject)``, then ``{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` (答案：
for the Chinese sets); the letters are scored, or with ``mode=letter`` the next-token A/B/C/D logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from minima.core.errors import DataError
from minima.evaluate import metrics as M
from minima.evaluate.data import read_csv
from minima.evaluate.tasks.base import MultipleChoiceTask, Request
from minima.evaluate.tasks.loading import Doc, Schema, gold_index
from minima.evaluate.tasks.mmlu_subjects import CEVAL_CATEGORIES, CEVAL_ZH, CMMLU_CATEGORIES, CMMLU_ZH, MMLU_CATEGORIES
from minima.evaluate.tasks.registry import register_task

OPTIONS = "ABCD"


@dataclass(frozen=True)
class CsvSchema:
    """A CSV layout: the accepted names of its first header column (None: no header) and its description.

    With a header the columns are ``<first>,question,A,B,C,D,answer[,...]``; without one, ``question,A,B,C,D,answer``.
    """

    name: str
    first_column: Optional[tuple[str, ...]]
    describe: str

    def matches(self, row: list[str]) -> bool:
        head = [c.strip().lower() for c in row]
        if self.first_column is None:
            return len(row) == 6 and row[5].strip().upper() in OPTIONS
        return (
            len(head) >= 7 and head[0] in self.first_column and head[1:7] == ["question", "a", "b", "c", "d", "answer"]
        )


CSV_SCHEMAS = (
    CsvSchema("ceval-csv", ("id",), "CSV with header id,question,A,B,C,D,answer[,explanation] (C-Eval)"),
    CsvSchema(
        "cmmlu-csv",
        ("", "index", "unnamed: 0"),
        "CSV with header ,Question,A,B,C,D,Answer (CMMLU, first column an index)",
    ),
    CsvSchema("mmlu-csv", None, "CSV without header: question,A,B,C,D,answer (hendrycks/test)"),
)


class ExamTask(MultipleChoiceTask):
    """The MMLU family: same prompt and scoring, a per-dataset description, answer cue and category table."""

    default_shots = 5
    sampler = "first_n"
    has_subjects = True
    modes = ("loglikelihood", "letter")
    answer_prompt = "Answer:"
    category_table: dict = {}

    def __init__(self):
        self.schemas = (
            Schema(
                "hf",
                ("question", "choices", "answer"),
                "JSON/JSONL/parquet rows {question, choices: [4], answer: int|letter[, subject]} (HF cais/mmlu)",
                self._from_row,
                when=lambda row: isinstance(row["choices"], list),
            ),
        )

    @property
    def formats(self):
        return {**{s.name: s.describe for s in CSV_SCHEMAS}, **super().formats}

    def detect(self, path, row):
        if isinstance(row, list):
            return next((s.name for s in CSV_SCHEMAS if s.matches(row)), None)
        return super().detect(path, row)

    def subject_of(self, path):
        stem = path.stem
        for suffix in ("_dev", "_val", "_validation", "_test", "_train"):
            if stem.endswith(suffix):
                return stem[: -len(suffix)]
        return stem

    def parse(self, path, fmt):
        if fmt not in {s.name for s in CSV_SCHEMAS}:
            return super().parse(path, fmt)
        rows = read_csv(path)
        header = fmt != "mmlu-csv"
        width = len(next(rows)[1]) if header else 6
        q_col = 1 if header else 0  # question, then the four options, then the answer
        subject, docs = self.subject_of(path), []
        for line, row in rows:
            where = f"{path}:{line}"
            if len(row) != width:
                raise DataError(
                    f"expected {width} columns ({self.formats[fmt]}), got {len(row)}",
                    where=where,
                    fix="quote fields that contain commas; check for a missing or extra column",
                )
            q, choices, ans = row[q_col], row[q_col + 1 : q_col + 5], row[q_col + 5]
            raw = {"question": q, "A": choices[0], "B": choices[1], "C": choices[2], "D": choices[3], "answer": ans}
            if not ans.strip():  # unlabeled (C-Eval's public test split)
                docs.append(self._doc(q, choices, None, subject, raw, where))
                continue
            if ans.strip().upper() not in OPTIONS:
                raise DataError(f"answer {ans!r} is not one of A, B, C, D", where=where)
            docs.append(self._doc(q, choices, OPTIONS.index(ans.strip().upper()), subject, raw, where))
        return docs

    def _from_row(self, row: dict, where: str) -> Doc:
        choices = [str(c) for c in row["choices"]]
        if len(choices) != 4:
            raise DataError(f"expected 4 choices, got {len(choices)}", where=where)
        subject = str(row.get("subject") or "")
        return self._doc(str(row["question"]), choices, gold_index(row["answer"], 4, where), subject, row, where)

    def _doc(self, question, options, gold, subject, raw, where) -> Doc:
        text = f"{question.strip()}\n" + "".join(f"{o}. {t}\n" for o, t in zip(OPTIONS, options)) + self.answer_prompt
        return Doc(query=text, choices=list(OPTIONS), gold=gold, subject=subject, raw=raw, where=where)

    def categories(self, subject):
        cats = self.category_table.get(subject, [])
        return [cats] if isinstance(cats, str) else list(cats)

    # -- letter mode: the next token's A/B/C/D logprobs (hendrycks' 'Answer: X')
    def requests(self, doc, context, settings):
        if settings.mode == "letter":
            return [Request("next_token", (context, tuple(OPTIONS)))]
        return super().requests(doc, context, settings)

    def process_results(self, doc, outputs, settings):
        if settings.mode != "letter":
            return super().process_results(doc, outputs, settings)
        lp = outputs[0]
        pred = M.argmax(lp)
        return {"acc": float(pred == doc.gold)}, {"gold": doc.gold, "pred": pred, "logprobs": lp}

    def metric_names(self, settings):
        return ("acc",) if settings.mode == "letter" else super().metric_names(settings)


class MMLU(ExamTask):
    name = "mmlu"
    folders = ("mmlu",)
    category_table = MMLU_CATEGORIES  # hendrycks/lm-eval: a category's score is over its questions

    def description(self, subject):
        return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


class CEval(ExamTask):
    name = "ceval"
    folders = ("ceval", "ceval-exam", "ceval_exam")
    answer_prompt = "答案："
    category_table = CEVAL_CATEGORIES
    category_weighting = "subjects"  # the official average is the mean over subjects

    def description(self, subject):
        return (
            f"以下是中国关于{CEVAL_ZH.get(subject, subject.replace('_', ' '))}的单项选择题，请选出其中的正确答案。\n\n"
        )


class CMMLU(ExamTask):
    name = "cmmlu"
    folders = ("cmmlu",)
    answer_prompt = "答案："
    category_table = CMMLU_CATEGORIES  # a subject may count in two categories
    category_weighting = "subjects"

    def description(self, subject):
        return (
            f"以下是关于{CMMLU_ZH.get(subject, subject.replace('_', ' '))}的单项选择题，请直接给出正确答案的选项。\n\n"
        )


for _task in (MMLU(), CEval(), CMMLU()):
    register_task(_task)
