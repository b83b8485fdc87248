"""Benchmark tasks: the formats each accepts, how a row becomes a doc, and how prompts are built.

Prompts follow lm-eval 0.4 exactly (so scores are the harness's scores): a description, then the
few-shot examples ``question + " " + answer + "\\n\\n"``, then the question; every choice is scored as
the continuation ``" " + choice``. Formats are detected from the first record's keys (or CSV header);
when a file fits no format the error names the formats that were expected.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from minima.core.errors import DataError, InputError
from minima.evaluate import subjects as subj
from minima.evaluate.data import first_row, list_files, read_csv, read_rows, split_of

LETTERS = "ABCDEFGHIJ"


@dataclass
class Doc:
    """One evaluation item.

    For multiple choice, ``query`` is the question text (lm-eval's ``doc_to_text``) and ``choices``
    the continuations; for a multiple-context task (winogrande) ``choices`` are the contexts and
    ``target`` the shared continuation. Generation tasks keep the gold answer in ``target``.
    """

    query: str
    choices: list[str] = field(default_factory=list)
    gold: Any = None
    target: Any = None
    subject: str = ""
    multi_context: bool = False
    raw: dict = field(default_factory=dict)
    where: str = ""  # file:line, for messages and samples.jsonl

    def fewshot_text(self) -> str:
        """The doc as a solved example (without the trailing delimiter)."""
        if self.multi_context:
            return self.choices[self.gold] + " " + self.target
        if self.choices:
            return self.query + " " + self.choices[self.gold]
        return self.query + " " + str(self.target)


@dataclass
class Split:
    docs: list[Doc]
    files: list[str]


@dataclass
class TaskData:
    """Loaded docs by subject ('' for tasks without subjects) for the eval and few-shot pools."""

    eval: dict[str, list[Doc]]
    fewshot: dict[str, list[Doc]]
    eval_split: str
    fewshot_split: Optional[str]
    files: list[str]
    format: str


# ------------------------------------------------------------------------------ format detection
def _need(row: dict, keys: tuple[str, ...]) -> bool:
    return all(k in row for k in keys)


def _gold_index(value, n: int, where: str, labels: Optional[list[str]] = None) -> int:
    """A gold answer given as an int index, a letter A-D, a number '1'-'4' or one of ``labels``."""
    if isinstance(value, bool):
        raise DataError(f"gold answer {value!r} is not an index or a letter", where=where)
    if labels is not None and str(value).strip() in labels:
        return labels.index(str(value).strip())
    if isinstance(value, int):
        idx = value
    else:
        s = str(value).strip()
        if len(s) == 1 and s.upper() in LETTERS:
            idx = LETTERS.index(s.upper())
        elif s.isdigit():
            idx = int(s) - 1 if labels is not None else int(s)
        else:
            raise DataError(
                f"gold answer {value!r} is not an index, a letter or a choice label",
                where=where,
                fix="use A-D, 1-4 or a 0-based index",
            )
    if not 0 <= idx < n:
        raise DataError(f"gold answer {value!r} is out of range for {n} choices", where=where)
    return idx


class Task:
    """A benchmark: name, kind, default shots, few-shot sampler, and its formats."""

    name: str = ""
    kind: str = "mc"  # mc | gen | ppl
    default_shots: int = 0
    sampler: str = "random"  # random (lm-eval's seeded default) | first_n
    has_subjects: bool = False
    folders: tuple[str, ...] = ()
    formats: dict[str, str] = {}  # name -> one-line description, for error messages
    supports_letter_mode: bool = False
    acc_norm: bool = True

    def description(self, subject: str) -> str:
        return ""

    # -- loading
    def detect(self, path: Path, row) -> Optional[str]:
        """The format name of a file whose first record is ``row``, or None if it is not this task's."""
        raise NotImplementedError

    def parse(self, path: Path, fmt: str) -> list[Doc]:
        raise NotImplementedError

    def subject_of(self, path: Path) -> str:
        return ""

    def accept_file(self, path: Path) -> bool:
        return True


# ------------------------------------------------------------------------------------ MMLU family
class _ExamTask(Task):
    """MMLU, C-Eval and CMMLU: four lettered options, one CSV per subject, few-shot from dev in order."""

    default_shots = 5
    sampler = "first_n"
    has_subjects = True
    supports_letter_mode = True
    answer_prompt = "Answer:"
    formats = {
        "mmlu-csv": "CSV without header: question,A,B,C,D,answer (hendrycks/test)",
        "ceval-csv": "CSV with header id,question,A,B,C,D,answer[,explanation] (C-Eval)",
        "cmmlu-csv": "CSV with header ,Question,A,B,C,D,Answer (CMMLU, first column an index)",
        "hf": "JSON/JSONL/parquet rows {question, choices: [4], answer: int|letter[, subject]} (HF cais/mmlu)",
    }

    def detect(self, path, row):
        if isinstance(row, list):
            head = [c.strip().lower() for c in row]
            if head[:7] == ["id", "question", "a", "b", "c", "d", "answer"]:
                return "ceval-csv"
            if (
                len(head) >= 7
                and head[1:7] == ["question", "a", "b", "c", "d", "answer"]
                and head[0] in ("", "index", "unnamed: 0")
            ):
                return "cmmlu-csv"
            if len(row) == 6 and row[5].strip().upper() in ("A", "B", "C", "D"):
                return "mmlu-csv"
            return None
        if _need(row, ("question", "choices", "answer")) and isinstance(row["choices"], list):
            return "hf"
        return None

    def subject_of(self, path):
        stem = path.stem
        for suffix in ("_dev", "_val", "_validation", "_test", "_train"):
            if stem.endswith(suffix):
                return stem[: -len(suffix)]
        return stem

    def parse(self, path, fmt):
        docs = []
        if fmt == "hf":
            for line, row in read_rows(path):
                where = f"{path}:{line}"
                choices = [str(c) for c in row["choices"]]
                if len(choices) != 4:
                    raise DataError(f"expected 4 choices, got {len(choices)}", where=where)
                gold = _gold_index(row["answer"], 4, where)
                subject = str(row.get("subject") or self.subject_of(path))
                docs.append(self._doc(str(row["question"]), choices, gold, subject, row, where))
            return docs
        rows = read_csv(path)
        if fmt in ("ceval-csv", "cmmlu-csv"):
            header = next(rows)[1]
            width = len(header)
        else:
            width = 6
        subject = self.subject_of(path)
        for line, row in rows:
            where = f"{path}:{line}"
            if len(row) != width:
                raise DataError(
                    f"expected {width} columns ({self.formats[fmt]}), got {len(row)}",
                    where=where,
                    fix="quote fields that contain commas; check for a missing or extra column",
                )
            if fmt == "mmlu-csv":
                q, choices, ans = row[0], row[1:5], row[5]
            else:
                q, choices, ans = row[1], row[2:6], row[6]
            raw = {"question": q, "A": choices[0], "B": choices[1], "C": choices[2], "D": choices[3], "answer": ans}
            if not ans.strip():  # unlabeled (C-Eval's public test split)
                docs.append(self._doc(q, choices, None, subject, raw, where))
                continue
            if ans.strip().upper() not in ("A", "B", "C", "D"):
                raise DataError(f"answer {ans!r} is not one of A, B, C, D", where=where)
            docs.append(self._doc(q, choices, "ABCD".index(ans.strip().upper()), subject, raw, where))
        return docs

    def _doc(self, question, options, gold, subject, raw, where):
        text = f"{question.strip()}\nA. {options[0]}\nB. {options[1]}\nC. {options[2]}\nD. {options[3]}\n{self.answer_prompt}"
        return Doc(query=text, choices=list("ABCD"), gold=gold, subject=subject, raw=raw, where=where)


class MMLU(_ExamTask):
    name = "mmlu"
    folders = ("mmlu",)

    def description(self, subject):
        return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


class CEval(_ExamTask):
    name = "ceval"
    folders = ("ceval", "ceval-exam", "ceval_exam")
    answer_prompt = "答案："

    def description(self, subject):
        return f"以下是中国关于{subj.CEVAL_ZH.get(subject, subject.replace('_', ' '))}的单项选择题，请选出其中的正确答案。\n\n"


class CMMLU(_ExamTask):
    name = "cmmlu"
    folders = ("cmmlu",)
    answer_prompt = "答案："

    def description(self, subject):
        return f"以下是关于{subj.CMMLU_ZH.get(subject, subject.replace('_', ' '))}的单项选择题，请直接给出正确答案的选项。\n\n"


# ------------------------------------------------------------------------------------------ ARC
class ARC(Task):
    """AI2 Reasoning Challenge; lm-eval's ``Question: {q}\\nAnswer:`` with each choice text scored."""

    formats = {
        "llmfoundry": 'JSONL {"query": "Question: ...", "choices": [...], "gold": int} (llm-foundry)',
        "original": 'JSONL {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} (AI2 ARC-V1)',
        "hf": 'rows {"question": str, "choices": {"text": [...], "label": [...]}, "answerKey"} (HF allenai/ai2_arc)',
    }

    def __init__(self, name: str):
        self.name = name
        self.variant = name.split("_", 1)[1]
        self.folders = (name, "arc", "ARC-" + self.variant.capitalize(), "ai2_arc")

    def accept_file(self, path):
        other = "challenge" if self.variant == "easy" else "easy"
        return other not in str(path).lower().replace(self.name, "")

    def detect(self, path, row):
        if isinstance(row, list):
            return None
        if _need(row, ("query", "choices", "gold")):
            return "llmfoundry"
        q = row.get("question")
        if isinstance(q, dict) and _need(q, ("stem", "choices")) and "answerKey" in row:
            return "original"
        if isinstance(q, str) and isinstance(row.get("choices"), dict) and "answerKey" in row:
            return "hf"
        return None

    def parse(self, path, fmt):
        docs = []
        for line, row in read_rows(path):
            where = f"{path}:{line}"
            try:
                if fmt == "llmfoundry":
                    q = str(row["query"])
                    q = q[len("Question: ") :] if q.startswith("Question: ") else q
                    choices = [str(c) for c in row["choices"]]
                    gold = _gold_index(row["gold"], len(choices), where)
                else:
                    if fmt == "original":
                        q = row["question"]["stem"]
                        texts = [c["text"] for c in row["question"]["choices"]]
                        labels = [str(c["label"]) for c in row["question"]["choices"]]
                    else:
                        q = row["question"]
                        texts, labels = list(row["choices"]["text"]), [str(x) for x in row["choices"]["label"]]
                    choices = [str(t) for t in texts]
                    gold = _gold_index(row["answerKey"], len(choices), where, labels=labels)
            except (KeyError, TypeError) as e:
                raise DataError(
                    f"missing or malformed field {e} for the {fmt} format ({self.formats[fmt]})", where=where
                ) from None
            docs.append(Doc(query=f"Question: {q}\nAnswer:", choices=choices, gold=gold, raw=row, where=where))
        return docs


# ------------------------------------------------------------------------------------ HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: WikiHow ``[title]`` markers and bracketed artifacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(Task):
    name = "hellaswag"
    folders = ("hellaswag",)
    formats = {
        "original": 'JSONL {"activity_label", "ctx_a", "ctx_b", "endings": [4], "label"} (rowanz/hellaswag and HF Rowan/hellaswag)',
        "llmfoundry": 'JSONL {"query", "choices", "gold"} (llm-foundry, already preprocessed)',
    }

    def detect(self, path, row):
        if isinstance(row, list):
            return None
        if _need(row, ("activity_label", "ctx_a", "ctx_b", "endings")):
            return "original"
        if _need(row, ("query", "choices", "gold")):
            return "llmfoundry"
        return None

    def parse(self, path, fmt):
        docs = []
        for line, row in read_rows(path):
            where = f"{path}:{line}"
            if fmt == "original":
                ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
                query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
                choices = [hellaswag_preprocess(e) for e in row["endings"]]
                label = row.get("label")
                gold = None if label in (None, "") else _gold_index(int(label), len(choices), where)
            else:
                query, choices = str(row["query"]), [str(c) for c in row["choices"]]
                gold = _gold_index(row["gold"], len(choices), where)
            docs.append(Doc(query=query, choices=choices, gold=gold, raw=row, where=where))
        return docs


# ----------------------------------------------------------------------------------- Winogrande
class Winogrande(Task):
    """Two contexts (the blank filled with each option) scored on the shared rest of the sentence."""

    name = "winogrande"
    folders = ("winogrande",)
    acc_norm = True  # lm-eval lists only acc; acc_norm (over context lengths, as lm-eval would) is extra
    formats = {
        "llmfoundry": 'JSONL {"context_options": [2], "continuation", "gold"} (llm-foundry)',
        "original": 'JSONL {"sentence" with "_", "option1", "option2", "answer": "1"|"2"} (allenai winogrande, HF)',
    }

    def detect(self, path, row):
        if isinstance(row, list):
            return None
        if _need(row, ("context_options", "continuation", "gold")):
            return "llmfoundry"
        if _need(row, ("sentence", "option1", "option2", "answer")):
            return "original"
        return None

    def parse(self, path, fmt):
        docs = []
        for line, row in read_rows(path):
            where = f"{path}:{line}"
            if fmt == "llmfoundry":
                contexts, cont = [str(c) for c in row["context_options"]], str(row["continuation"]).strip()
                gold = _gold_index(row["gold"], len(contexts), where)
            else:
                s = row["sentence"]
                if "_" not in s:
                    raise DataError("sentence has no '_' blank", where=where)
                i = s.index("_")
                contexts = [s[:i] + row["option1"], s[:i] + row["option2"]]
                cont = s[i + 1 :].strip()
                ans = str(row["answer"]).strip()
                gold = None if ans == "" else _gold_index(ans, 2, where, labels=["1", "2"])
            docs.append(
                Doc(query="", choices=contexts, gold=gold, target=cont, multi_context=True, raw=row, where=where)
            )
        return docs


# ----------------------------------------------------------------------------------- demo_mc
class DemoMC(Task):
    name = "demo_mc"
    folders = ("demo_mc", "eval/demo_mc")
    formats = {"jsonl": 'JSONL {"question", "choices": [...], "gold": int, optional "prefix"} (minima demo corpus)'}

    def detect(self, path, row):
        if isinstance(row, dict) and _need(row, ("question", "choices", "gold")) and isinstance(row["choices"], list):
            return "jsonl"
        return None

    def parse(self, path, fmt):
        docs = []
        for line, row in read_rows(path):
            where = f"{path}:{line}"
            choices = [str(c) for c in row["choices"]]
            # The answer sentence's stem ("The capital of France is") makes the item a cloze that a
            # base model can score as well as a chat model.
            prefix = f" {row['prefix']}" if row.get("prefix") else ""
            docs.append(
                Doc(
                    query=f"Question: {row['question']}\nAnswer:{prefix}",
                    choices=choices,
                    gold=_gold_index(row["gold"], len(choices), where),
                    raw=row,
                    where=where,
                )
            )
        return docs


# ------------------------------------------------------------------------------------ generation
GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


class GSM8K(Task):
    """Grade-school math, 8-shot chain of thought from the train split (fixed order)."""

    name = "gsm8k"
    kind = "gen"
    default_shots = 8
    sampler = "first_n"
    folders = ("gsm8k", "grade_school_math")
    formats = {"jsonl": 'JSONL {"question", "answer": "... #### N"} (openai/grade-school-math, HF openai/gsm8k)'}
    stop = ["Question:", "</s>", "<|im_end|>"]  # lm-eval's gsm8k.yaml

    def detect(self, path, row):
        if isinstance(row, dict) and _need(row, ("question", "answer")) and "####" in str(row["answer"]):
            return "jsonl"
        return None

    def parse(self, path, fmt):
        docs = []
        for line, row in read_rows(path):
            where = f"{path}:{line}"
            ans = str(row["answer"])
            if "####" not in ans:
                raise DataError("answer has no '#### N' final line", where=where)
            docs.append(
                Doc(
                    query=f"Question: {row['question']}\nAnswer:",
                    target=ans,
                    gold=ans.split("####")[-1].strip(),
                    raw=row,
                    where=where,
                )
            )
        return docs


class BBH(Task):
    """BIG-Bench Hard: one JSON per subtask; 3-shot chain of thought when ``cot-prompts/<task>.txt`` exists."""

    name = "bbh"
    kind = "gen"
    default_shots = 3
    sampler = "first_n"
    has_subjects = True
    folders = ("bbh", "BIG-Bench-Hard")
    formats = {
        "bbh": 'JSON {"examples": [{"input", "target"}]} or JSONL {"input", "target"} (suzgun/BIG-Bench-Hard, HF lukaemon/bbh)'
    }
    stop = ["</s>", "Q", "\n\n"]  # lm-eval's bbh few-shot config

    def detect(self, path, row):
        if isinstance(row, dict) and _need(row, ("input", "target")):
            return "bbh"
        return None

    def subject_of(self, path):
        return path.stem

    def parse(self, path, fmt):
        docs = []
        for line, row in read_rows(path):
            docs.append(
                Doc(
                    query=f"Q: {row['input']}\nA:",
                    target=str(row["target"]),
                    gold=str(row["target"]),
                    subject=path.stem,
                    raw=row,
                    where=f"{path}:{line}",
                )
            )
        return docs


class DROP(Task):
    """DROP reading comprehension; lm-eval's ``{passage} {question}`` prompt, generation until '.'."""

    name = "drop"
    kind = "gen"
    default_shots = 3
    folders = ("drop",)
    formats = {
        "hf": 'rows {"passage", "question", "answer": {number, date, spans}, "validated_answers"} (HF EleutherAI/drop)',
        "spans": 'rows {"passage", "question", "answers_spans": {"spans": [...]}} (HF ucinlp/drop)',
        "original": 'JSON {passage_id: {"passage", "qa_pairs": [{"question", "answer", "validated_answers"}]}} (allennlp DROP)',
    }
    stop = ["."]

    def detect(self, path, row):
        if not isinstance(row, dict):
            return None
        if _need(row, ("passage", "question", "answer")):
            return "hf"
        if _need(row, ("passage", "question", "answers_spans")):
            return "spans"
        if _need(row, ("passage", "qa_pairs")):
            return "original"
        return None

    def parse(self, path, fmt):
        from minima.evaluate.metrics import drop_parse_answer

        docs = []
        for line, row in read_rows(path):
            where = f"{path}:{line}"
            items = []
            if fmt == "original":
                for qa in row["qa_pairs"]:
                    items.append((qa["question"], [qa["answer"], *qa.get("validated_answers", [])]))
            elif fmt == "hf":
                va = row.get("validated_answers") or {"number": [], "date": [], "spans": []}
                flat = [
                    {"number": va["number"][i], "date": va["date"][i], "spans": va["spans"][i]}
                    for i in range(len(va["number"]))
                ]
                items.append((row["question"], [row["answer"], *flat]))
            else:
                items.append(
                    (
                        row["question"],
                        [
                            {
                                "number": "",
                                "date": {"day": "", "month": "", "year": ""},
                                "spans": list(row["answers_spans"]["spans"]),
                            }
                        ],
                    )
                )
            for question, cands in items:
                answers = []
                for c in cands:
                    a = drop_parse_answer(c)
                    if a not in answers:
                        answers.append(a)
                docs.append(
                    Doc(
                        query=f"{row['passage']} {question}",
                        target=answers,
                        gold=answers,
                        raw={"question": question},
                        where=where,
                    )
                )
        return docs


class HumanEval(Task):
    name = "humaneval"
    kind = "gen"
    default_shots = 0
    folders = ("humaneval", "human-eval", "openai_humaneval")
    formats = {"jsonl": 'JSONL {"task_id", "prompt", "test", "entry_point"} (openai/human-eval, HF openai_humaneval)'}
    stop = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]

    def detect(self, path, row):
        if isinstance(row, dict) and _need(row, ("prompt", "test", "entry_point")):
            return "jsonl"
        return None

    def parse(self, path, fmt):
        return [
            Doc(
                query=row["prompt"],
                target=row["test"],
                gold=row["entry_point"],
                raw={"task_id": row.get("task_id", line)},
                where=f"{path}:{line}",
            )
            for line, row in read_rows(path)
        ]


class Perplexity(Task):
    """Token perplexity of text files with a sliding window (see ``lm.rolling_loglikelihood``)."""

    name = "perplexity"
    kind = "ppl"
    folders = ("perplexity",)
    formats = {"text": "plain text files (.txt), or JSONL/JSON rows with a 'text' field"}


class ChatTask(Task):
    """An LLM-judged chat benchmark (run by the evaluate stage through :mod:`minima.evaluate.judge`, not by ``evaluate_model``).

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
        self.formats = {question_format: f"see minima.evaluate.judge ({question_format} question set)"}


CHAT_TASKS: dict[str, ChatTask] = {
    t.name: t
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

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        MMLU(),
        CEval(),
        CMMLU(),
        ARC("arc_easy"),
        ARC("arc_challenge"),
        HellaSwag(),
        Winogrande(),
        DemoMC(),
        GSM8K(),
        BBH(),
        DROP(),
        HumanEval(),
        Perplexity(),
        *CHAT_TASKS.values(),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, list(TASKS), n=1)
        raise InputError(
            f"unknown task '{name}'", fix=f"did you mean '{close[0]}'?" if close else f"tasks: {', '.join(TASKS)}"
        )
    return TASKS[name]


# ----------------------------------------------------------------------------------- discovery
def task_root(task: Task, data_dir: Optional[Path], path: Optional[str]) -> Path:
    """Where a task's files live: its ``path`` override, else the first existing ``data_dir/<folder>``."""
    if path:
        p = Path(path).expanduser()
        if not p.exists() and not any(ch in path for ch in "*?["):
            raise InputError(
                f"{task.name}: path {p} does not exist",
                where=f"tasks.{task.name}.path",
                fix="point it at the benchmark folder or file",
            )
        return p
    if data_dir is None:
        raise InputError(
            f"{task.name}: no data_dir and no tasks.{task.name}.path",
            fix=f"set data_dir=DIR (one folder per benchmark) or tasks.{task.name}.path=...",
        )
    for folder in task.folders:
        if (data_dir / folder).exists():
            return data_dir / folder
    raise InputError(
        f"{task.name}: none of {', '.join(task.folders)} found under {data_dir}",
        fix=f"set tasks.{task.name}.path=... (these files are not in ../shared/data)"
        if task.name in ("bbh", "drop", "humaneval")
        else f"set tasks.{task.name}.path=...",
    )


def load_task(
    task: Task,
    root: Path,
    split: Optional[str] = None,
    fmt: Optional[str] = None,
    limit: Optional[int] = None,
    subjects: Optional[list[str]] = None,
) -> TaskData:
    """Find the task's files under ``root`` by schema, parse them, and pick the eval and few-shot splits."""
    base = root if root.is_dir() else None
    found: dict[str, list[tuple[Path, str]]] = {}
    seen = []
    for f in list_files(root):
        if not task.accept_file(f):
            continue
        row = first_row(f)
        if row is None:
            continue
        got = task.detect(f, row)
        if fmt and got and got != fmt:
            got = fmt if fmt in task.formats else None
        if got is None:
            seen.append(f)
            continue
        found.setdefault(split_of(f, base) or "test", []).append((f, got))
    if not found:
        expected = "; ".join(f"{k}: {v}" for k, v in task.formats.items())
        what = f"found {len(seen)} data file(s) in another format, e.g. {seen[0]}" if seen else "found no data files"
        raise InputError(
            f"{task.name}: no file under {root} has a format this task reads ({what})",
            where=str(seen[0]) if seen else str(root),
            fix=f"expected one of: {expected}",
        )

    def parse_split(name: str) -> dict[str, list[Doc]]:
        out: dict[str, list[Doc]] = {}
        for f, got in found[name]:
            for d in task.parse(f, got):
                out.setdefault(d.subject or (task.subject_of(f) if task.has_subjects else ""), []).append(d)
        return out

    order = [split] if split else ["test", "val", "dev"]
    if split and split not in found:
        raise InputError(
            f"{task.name}: no '{split}' split under {root} (found: {', '.join(sorted(found))})",
            where=f"tasks.{task.name}.split",
        )
    eval_split, eval_docs = None, None
    for name in order:
        if name not in found:
            continue
        docs = parse_split(name)
        if any(d.gold is not None for ds in docs.values() for d in ds):
            eval_split, eval_docs = name, docs
            break
    if eval_docs is None:
        raise InputError(
            f"{task.name}: no labelled split to evaluate under {root} (found: {', '.join(sorted(found))})",
            fix="point the task at a split with answers (C-Eval's public test split has none; use val)",
        )
    eval_docs = {s: [d for d in ds if d.gold is not None] for s, ds in eval_docs.items()}
    if subjects:
        missing = sorted(set(subjects) - set(eval_docs))
        if missing:
            import difflib

            close = difflib.get_close_matches(missing[0], list(eval_docs), n=1)
            raise InputError(
                f"{task.name}: no subject {missing[0]!r} under {root}",
                where=f"tasks.{task.name}.subjects",
                fix=f"did you mean {close[0]!r}?" if close else f"subjects: {', '.join(sorted(eval_docs))}",
            )
        eval_docs = {s: eval_docs[s] for s in subjects}
    fs_split = next((s for s in ("dev", "train", "val") if s in found and s != eval_split), None)
    # With no other split, shots come from the eval split itself (the full one, as in lm-eval).
    fewshot = parse_split(fs_split) if fs_split else {s: list(ds) for s, ds in eval_docs.items()}
    fewshot = {s: [d for d in ds if d.gold is not None] for s, ds in fewshot.items()}
    if limit:
        eval_docs = {s: ds[:limit] for s, ds in eval_docs.items()}
    files = [str(f) for name in found for f, _ in found[name]]
    fmts = sorted({g for name in found for _, g in found[name]})
    return TaskData(
        eval=dict(sorted(eval_docs.items())),
        fewshot=fewshot,
        eval_split=eval_split,
        fewshot_split=fs_split,
        files=files,
        format=",".join(fmts),
    )


# --------------------------------------------------------------------------------- few-shot
class FewshotSampler:
    """lm-eval's samplers: ``first_n`` in file order, or ``random.Random(seed).sample`` per doc in order.

    When the pool is the eval split itself, n+1 docs are drawn and the doc being asked is removed,
    exactly as lm-eval does, so the same seed gives the same prompts.
    """

    def __init__(self, pool: list[Doc], kind: str, seed: int, same_split: bool):
        self.pool, self.kind, self.same_split = pool, kind, same_split
        self.rnd = random.Random(seed)

    def sample(self, n: int, doc: Doc) -> list[Doc]:
        if n == 0:
            return []
        if self.kind == "first_n":
            pool = [x for x in self.pool if x.raw != doc.raw] if self.same_split else self.pool
            if n > len(pool):
                raise InputError(f"{n} few-shot examples asked but the pool has {len(pool)}", fix="lower shots")
            return pool[:n]
        if n + self.same_split > len(self.pool):
            raise InputError(f"{n} few-shot examples asked but the pool has {len(self.pool)}", fix="lower shots")
        if not self.same_split:
            return self.rnd.sample(self.pool, n)
        picked = [x for x in self.rnd.sample(self.pool, n + 1) if x.raw != doc.raw][:n]
        if len(picked) < n:
            picked = self.rnd.sample([x for x in self.pool if x.raw != doc.raw], n)
        return picked


def build_context(task: Task, doc: Doc, shots: list[Doc], subject: str) -> str | list[str]:
    """lm-eval's plain-text prompt: description, solved shots joined by blank lines, then the question."""
    prefix = task.description(subject) + "".join(s.fewshot_text() + "\n\n" for s in shots)
    if doc.multi_context:
        return [prefix + c for c in doc.choices]
    return prefix + doc.query


def chat_wrap(tokenizer, context: str) -> str:
    """The context as one user turn in the model's chat template, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "chat_template=true but the tokenizer has no chat template",
            fix="use a chat model (after sft) or set chat_template=false",
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
    )
