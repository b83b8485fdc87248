"""DROP: reading comprehension with discrete reasoning; HF EleutherAI/drop or ucinlp/drop rows, or allennlp's JSON.

Prompt (lm-eval): ``{passage} {question}`` after solved examples (``{passage} {question}{answer}``), generation
until '.'; scored as allennlp's drop_eval: max exact match and bag-of-words F1 over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from minima.evaluate import metrics as M
from minima.evaluate.tasks.base import GenerateUntilTask
from minima.evaluate.tasks.loading import Doc, Schema
from minima.evaluate.tasks.registry import register_task

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_NO_DATE = {"day": "", "month": "", "year": ""}


# ----------------------------------------------------------------------------------- answers
def parse_answer(answer: dict) -> tuple[str, ...]:
    """A DROP answer dict as a tuple of strings: the number, else the spans, else 'day month year'."""
    if str(answer.get("number", "")) != "":
        return (str(answer["number"]),)
    if answer.get("spans"):
        return tuple(answer["spans"])
    d = answer.get("date") or {}
    return (" ".join([str(d.get("day", "")), str(d.get("month", "")), str(d.get("year", ""))]).strip(),)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _normalize(answer: str) -> str:
    out = []
    for token in re.split(" |-", answer):
        t = token.lower()
        if not _is_number(t):
            t = "".join(ch for ch in t if ch not in string.punctuation)
        if _is_number(t):
            t = str(float(t))
        t = " ".join(_ARTICLES.sub(" ", t).split())
        if t.strip():
            out.append(t)
    return " ".join(out).strip()


def _bags(answer) -> tuple[list[str], list[set[str]]]:
    spans = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    norm = [_normalize(s) for s in spans]
    return norm, [set(n.split()) for n in norm]


def _numbers_agree(gold: set, pred: set) -> bool:
    g = {w for w in gold if _is_number(w)}
    return not g or bool(g & {w for w in pred if _is_number(w)})


def _best_alignment(scores: list[list[float]]) -> list[float]:
    """Per gold bag, its score under the 1-1 assignment of gold to predicted bags that maximises the total."""
    rows, cols = len(scores), len(scores[0]) if scores else 0
    best = [0.0] * max(rows, cols)
    if not rows or not cols:
        return best
    try:
        import numpy as np
        from scipy.optimize import linear_sum_assignment

        r_ind, c_ind = linear_sum_assignment(-np.asarray(scores))
        pairs = list(zip(r_ind.tolist(), c_ind.tolist()))
    except ImportError:  # tiny bags: brute force over assignments
        import itertools

        if rows <= cols:
            cands = [list(zip(range(rows), p)) for p in itertools.permutations(range(cols), rows)]
        else:
            cands = [list(zip(p, range(cols))) for p in itertools.permutations(range(rows), cols)]
        pairs = max(cands, key=lambda ps: sum(scores[r][c] for r, c in ps))
    for r, c in pairs:
        best[r] = max(best[r], scores[r][c])
    return best


def drop_metrics(pred, gold) -> tuple[float, float]:
    """(exact match, F1) of a predicted answer (a string or spans) against one gold answer, as drop_eval."""
    p_norm, p_bags = _bags(pred)
    g_norm, g_bags = _bags(gold)
    em = float(set(p_norm) == set(g_norm) and len(p_norm) == len(g_norm))
    scores = [[M.f1(p, g) if _numbers_agree(g, p) else 0.0 for p in p_bags] for g in g_bags]
    per = _best_alignment(scores)
    return em, round(sum(per) / len(per), 2)


def drop_score(prediction: str, golds: Sequence[tuple[str, ...]]) -> dict[str, float]:
    """Max EM and F1 of a generation over a question's gold answers (empty golds are skipped)."""
    em = f1 = 0.0
    for g in golds:
        e, f = drop_metrics([prediction], g)
        if g[0].strip():
            em, f1 = max(em, e), max(f1, f)
    return {"em": em, "f1": f1}


# ------------------------------------------------------------------------------------- rows
def _docs(passage: str, items: list[tuple[str, list[dict]]], where: str) -> list[Doc]:
    docs = []
    for question, cands in items:
        answers: list[tuple[str, ...]] = []
        for c in cands:
            a = parse_answer(c)
            if a not in answers:
                answers.append(a)
        docs.append(
            Doc(query=f"{passage} {question}", target=answers, gold=answers, raw={"question": question}, where=where)
        )
    return docs


def _hf(row: dict, where: str) -> list[Doc]:
    va = row.get("validated_answers") or {"number": [], "date": [], "spans": []}
    flat = [
        {"number": va["number"][i], "date": va["date"][i], "spans": va["spans"][i]} for i in range(len(va["number"]))
    ]
    return _docs(row["passage"], [(row["question"], [row["answer"], *flat])], where)


def _spans(row: dict, where: str) -> list[Doc]:
    answer = {"number": "", "date": dict(_NO_DATE), "spans": list(row["answers_spans"]["spans"])}
    return _docs(row["passage"], [(row["question"], [answer])], where)


def _original(row: dict, where: str) -> list[Doc]:
    items = [(qa["question"], [qa["answer"], *qa.get("validated_answers", [])]) for qa in row["qa_pairs"]]
    return _docs(row["passage"], items, where)


class DROP(GenerateUntilTask):
    name = "drop"
    default_shots = 3
    folders = ("drop",)
    in_shared_data = False
    fewshot_delimiter = ""
    schemas = (
        Schema(
            "hf",
            ("passage", "question", "answer"),
            'rows {"passage", "question", "answer": {number, date, spans}, "validated_answers"} (HF EleutherAI/drop)',
            _hf,
        ),
        Schema(
            "spans",
            ("passage", "question", "answers_spans"),
            'rows {"passage", "question", "answers_spans": {"spans": [...]}} (HF ucinlp/drop)',
            _spans,
        ),
        Schema(
            "original",
            ("passage", "qa_pairs"),
            'JSON {passage_id: {"passage", "qa_pairs": [{"question", "answer", "validated_answers"}]}} (allennlp DROP)',
            _original,
        ),
    )
    until = ["."]

    def fewshot_target(self, doc):
        return ",".join(doc.gold[0]) if doc.gold else ""

    def score_generation(self, doc, generation):
        return drop_score(generation, doc.gold), {"gold": [list(a) for a in doc.gold]}

    def metric_names(self, settings):
        return ("em", "f1")


register_task(DROP())
