"""demo_qa: free-answer questions about the demo world's held-out facts (``eval/demo_qa/{dev,test}.jsonl``).

Every stage is asked the same questions, each in the form it was trained for:

- a base model (no chat template) gets a few-shot completion prompt in the QA-line shape of the demo
  corpus, ``Question: q1 Answer: a1 Question: q Answer:`` (``问题：q1回答：a1问题：q回答：`` in Chinese), the
  shots drawn from the dev split in the question's language;
- a chat model (``chat_template``) gets the bare question as one user turn of its chat template.

The greedy reply is cut at its first sentence and scored by exact match: right when the gold answer occurs
in it more often than in the question (as a whole word for Latin text), so "The orange is orange." is
right and "The orange is red." is not. ``exact_match_en`` and ``exact_match_zh`` score each language.
"""

from __future__ import annotations

import re

from minima.data.demo import SEP, qa_prompt, qa_text
from minima.evaluate import metrics as M
from minima.evaluate.tasks.base import GenerateUntilTask, Instance
from minima.evaluate.tasks.loading import Doc, Schema
from minima.evaluate.tasks.registry import register_task

LANGS = ("en", "zh")
MAX_NEW_TOKENS = 32  # one answer sentence; the evaluate max_new_tokens caps it further


def _doc(row: dict, where: str) -> Doc:
    lang = str(row["lang"])
    if lang not in LANGS:
        raise KeyError("lang")
    return Doc(
        query=str(row["question"]),
        target=str(row["reply"]),
        gold=str(row["answer"]),
        subject=lang,
        raw=row,
        where=where,
    )


def _count(text: str, answer: str) -> int:
    """Occurrences of ``answer`` in ``text``; a Latin-script answer must stand as a whole word or number."""
    if re.search(r"[A-Za-z0-9]", answer):
        return len(re.findall(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", text))
    return text.count(answer)


def first_sentence(text: str) -> str:
    """The reply up to and including its first sentence end (``.`` or ``。``), stripped."""
    m = re.search(r"[.。]", text)
    return (text[: m.end()] if m else text).strip()


def is_correct(question: str, answer: str, reply: str) -> bool:
    """Whether the reply's first sentence gives ``answer``: it holds it more often than the question does."""
    return _count(first_sentence(reply), answer) > _count(question, answer)


class DemoQA(GenerateUntilTask):
    name = "demo_qa"
    default_shots = 3
    has_subjects = True  # the subject is the language: shots come from the same language
    folders = ("demo_qa", "eval/demo_qa")
    schemas = (
        Schema(
            "jsonl",
            ("question", "answer", "reply", "lang"),
            'JSONL {"question", "answer", "reply", "lang": "en"|"zh"} (minima demo corpus)',
            _doc,
        ),
    )
    until = ["\n", "Question:", "问题：", "</s>"]

    def fewshot_text(self, doc):
        return qa_text(doc.query, doc.target, doc.subject)

    def build_context(self, doc, shots, subject):
        sep = SEP[doc.subject]
        return "".join(self.fewshot_text(s) + sep for s in shots) + qa_prompt(doc.query, doc.subject)

    def instances(self, data, settings):
        out = []
        for subject, docs in data.eval.items():
            sampler, docs = self.fewshot_sampler(data, subject, docs, settings)
            for doc in docs:
                if settings.chat_template:  # a chat model: the question alone, as its user turn
                    ctx = settings.render(doc.query)
                else:
                    ctx = self.build_context(doc, sampler.sample(settings.shots, doc), subject)
                out.append(Instance(subject, doc, self.requests(doc, ctx, settings)))
        return out

    def generation_kwargs(self, settings):
        return {**super().generation_kwargs(settings), "max_new_tokens": min(settings.max_new_tokens, MAX_NEW_TOKENS)}

    def score_generation(self, doc, generation):
        ok = is_correct(doc.query, doc.gold, generation)
        record = {"question": doc.query, "gold": doc.gold, "lang": doc.subject, "kind": doc.raw.get("kind")}
        return {"exact_match": float(ok)}, record

    def metric_names(self, settings):
        return ("exact_match",)

    def aggregate(self, scored, settings):
        res = super().aggregate(scored, settings)
        for lang in LANGS:
            vals = [s.metrics["exact_match"] for s in scored if s.subject == lang]
            if vals:
                res[f"exact_match_{lang}"], res[f"exact_match_{lang}_stderr"] = M.mean(vals), M.stderr(vals)
        return res

    def info(self, scored, settings):
        info = super().info(scored, settings)
        if settings.chat_template:
            info["shots"] = 0
        return info


register_task(DemoQA())
