"""LLM-judged chat benchmarks: answer a question set, then grade the answers with a judge model.

Question sets (``question_format``; ``auto`` detects it from the file):

- ``mt_bench``: FastChat ``question.jsonl`` rows ``{question_id, category, turns: [..], reference?: [..]}``
  (multi-turn); reference answers may also come from a FastChat answer file (``references=``);
- ``vicuna``: Vicuna-bench rows, ``{question_id, category, turns}`` or the older ``{question_id, text, category}``;
- ``belle``: the BELLE eval set rows ``{question, std_answer, class}`` (std_answer is the reference);
- ``zbench``: Z-Bench CSV (``Prompt, 任务类型, 参考回答, ...``, an optional title line first) or JSONL
  ``{prompt, task_type, ref_answer}``;
- ``alpaca_eval``: rows ``{instruction, output, generator?, dataset?}``; ``output`` is the baseline answer.

Grading (``mode``):

- ``single``: the judge grades each answer (each turn of a multi-turn question, seeing the earlier
  turns) from 1 to 10, with the reference answer when the set has one;
- ``pairwise``: the judge compares the model with a baseline's answers twice, once in each order;
  the two verdicts combine to win/loss/tie, or ``inconsistent`` when the order changed the verdict
  (counted as a tie, as MT-Bench does).

Answers (FastChat answer-file rows) and judgments go to JSONL files under ``out_dir``, one line per
finished item, so an interrupted run resumes where it stopped. A judge reply without a readable
grade is recorded with ``status: "unparseable"`` and reported as such, not retried. The report is a
table per category (``report.md``) plus ``report.json``.

Library use (``minima evaluate`` calls this)::

    from minima.evaluate.judge import ChatEvalConfig, run_chat_eval
    metrics = run_chat_eval(ChatEvalConfig(questions="mt_bench/question.jsonl", model="runs/x/06_sft",
                                           judge_base_url="http://127.0.0.1:8001/v1", judge_model="judge",
                                           out_dir="runs/x/07_evaluate/mt_bench"))
"""

from __future__ import annotations

import csv
import io
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from minima.core.config import Closed, command_config
from minima.core.errors import ConfigError, DataError, InputError
from minima.core.io import Journal, read_journal, read_rows, str_list, write_json_atomic
from minima.core.logs import get_logger
from minima.infer.api_client import Client

log = get_logger("minima.evaluate.judge")

FORMATS = ("mt_bench", "vicuna", "belle", "zbench", "alpaca_eval")
Chat = Callable[[list[dict]], str]  # messages -> reply text


class ChatEvalConfig(Closed):
    """A chat benchmark run: question set, the answering model, the judge, the grading mode."""

    questions: str = Field(..., description="Question file (see minima.evaluate.judge for the formats).")
    question_format: Literal["auto", "mt_bench", "vicuna", "belle", "zbench", "alpaca_eval"] = Field(
        "auto", description="Question file format."
    )
    references: Optional[str] = Field(
        None, description="MT-Bench reference answers (a FastChat answer JSONL), merged into the questions."
    )
    categories: list[str] = Field(default_factory=list, description="Only these categories (default: all).")
    limit: Optional[int] = Field(None, ge=1, description="At most this many questions per category (in file order).")
    model: Optional[str] = Field(None, description="HF model directory answering in process (or use model_base_url).")
    model_base_url: Optional[str] = Field(
        None, description="OpenAI-compatible endpoint answering the questions instead of a local model."
    )
    model_name: Optional[str] = Field(None, description="Model id at model_base_url.")
    model_api_key_env: str = Field("OPENAI_API_KEY", description="Env var with the answering endpoint's key.")
    model_id: Optional[str] = Field(
        None, description="Name of the model in files and reports (default: the dir name / model_name)."
    )
    answers: Optional[str] = Field(
        None, description="Use this answer file (FastChat answer JSONL) instead of generating answers."
    )
    answer_max_tokens: int = Field(1024, ge=1, description="Reply token limit per turn.")
    answer_temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the answers (0: greedy).")
    mode: Literal["single", "pairwise"] = Field(
        "single", description="single: 1-10 grades; pairwise: against a baseline, both orders."
    )
    use_reference: bool = Field(True, description="Show the judge the reference answer where the set has one.")
    baseline_answers: Optional[str] = Field(
        None, description="pairwise: the baseline's answer file (FastChat answer JSONL)."
    )
    baseline_model: Optional[str] = Field(
        None, description="pairwise: an HF model dir whose answers are generated as the baseline."
    )
    baseline_id: Optional[str] = Field(None, description="pairwise: the baseline's name (default from its file/dir).")
    judge_base_url: Optional[str] = Field(
        None, description="Judge endpoint, e.g. http://127.0.0.1:8001/v1 (default: env OPENAI_BASE_URL)."
    )
    judge_model: Optional[str] = Field(None, description="Judge model id at the endpoint.")
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="Env var with the judge endpoint's key.")
    judge_max_tokens: int = Field(1024, ge=16, description="Judge reply token limit.")
    concurrency: int = Field(
        4, ge=1, description="Requests in flight at once (a local model decodes them as one batch)."
    )
    max_retries: int = Field(6, ge=0, description="Retries per request on 429/5xx/network errors.")
    backoff: float = Field(2.0, ge=0, description="First retry wait in seconds.")
    timeout: float = Field(600.0, gt=0, description="Seconds per request.")
    out_dir: str = Field("chat_eval", description="Where answers/, judgments/ and the report go.")
    seed: int = Field(0, description="Sampling seed of local answers.")

    _lists = field_validator("categories", mode="before")(lambda v: str_list(v))


# ------------------------------------------------------------------------------ questions
def _norm_category(value: Any) -> str:
    text = str(value or "general").replace("\xa0", " ")
    return " ".join(text.split()) or "general"


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """Rows of a JSON array or JSON Lines file (whatever its suffix), numbered by record or line."""
    return read_rows(path, kind="json")


def _zbench_csv(path: Path) -> list[tuple[int, dict]]:
    lines = path.read_text(encoding="utf-8-sig").splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines[:3]) if line.lower().startswith("prompt,")), None)
    if start is None:
        raise DataError(
            "not a Z-Bench CSV: no 'Prompt,...' header in the first lines",
            where=f"{path}:1",
            fix="use a Z-Bench *.samples.csv file or JSONL {prompt, task_type, ref_answer}",
        )
    reader = csv.reader(io.StringIO("".join(lines[start:])))
    header = [h.strip() for h in next(reader)]
    col = {name: i for i, name in enumerate(header)}
    rows = []
    for n, rec in enumerate(reader, start + 2):
        if not rec or not rec[0].strip():
            continue
        get = lambda *names, rec=rec: next((rec[col[x]] for x in names if x in col and col[x] < len(rec)), "")
        rows.append(
            (
                n,
                {
                    "prompt": rec[0],
                    "task_type": get("任务类型", "task_type"),
                    "ref_answer": get("参考回答", "ref_answer"),
                },
            )
        )
    return rows


def detect_format(path: str | Path) -> str:
    """Guess the question format from the file's first record."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        return "zbench"
    rows = _read_rows(p)
    if not rows:
        raise DataError("the question file is empty", where=str(p))
    n, r = rows[0]
    if not isinstance(r, dict):
        raise DataError("a question must be a JSON object", where=f"{p}:{n}")
    if "turns" in r:
        return "mt_bench" if len(r["turns"]) > 1 or "reference" in r else "vicuna"
    if "text" in r and "question_id" in r:
        return "vicuna"
    if "question" in r and ("std_answer" in r or "class" in r):
        return "belle"
    if "prompt" in r and ("task_type" in r or "ref_answer" in r):
        return "zbench"
    if "instruction" in r:
        return "alpaca_eval"
    raise DataError(
        f"cannot tell the question format from keys {sorted(r)[:8]}",
        where=f"{p}:{n}",
        fix=f"set question_format to one of {', '.join(FORMATS)}",
    )


def load_questions(
    path: str | Path,
    fmt: str = "auto",
    references: Optional[str | Path] = None,
    categories: Iterable[str] = (),
    limit: Optional[int] = None,
) -> list[dict]:
    """Questions as ``{question_id, category, turns: [str], reference: [str] | None, baseline: [str] | None}``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"question file not found: {p}", where="questions")
    fmt = detect_format(p) if fmt == "auto" else fmt
    rows = _zbench_csv(p) if fmt == "zbench" and p.suffix.lower() == ".csv" else _read_rows(p)
    out = []
    for n, r in rows:
        where = f"{p}:{n}"
        if not isinstance(r, dict):
            raise DataError("a question must be a JSON object", where=where)
        q: dict = {"question_id": r.get("question_id", n), "reference": None, "baseline": None}
        if fmt in ("mt_bench", "vicuna"):
            turns = r.get("turns") if "turns" in r else [r.get("text")]
            q["category"] = r.get("category")
            q["reference"] = r.get("reference")
        elif fmt == "belle":
            turns, q["category"], ref = [r.get("question")], r.get("class"), r.get("std_answer")
            q["reference"] = [ref] if ref else None
        elif fmt == "zbench":
            turns, ref = [r.get("prompt")], r.get("ref_answer")
            tags = re.findall(r"`([^`]+)`", r.get("task_type") or "")
            q["category"] = tags[0] if tags else r.get("task_type")
            q["reference"] = [ref] if ref and ref.strip() else None
        else:  # alpaca_eval
            turns, q["category"] = [r.get("instruction")], r.get("dataset")
            q["baseline"] = [r["output"]] if isinstance(r.get("output"), str) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError(f"question has no text ({fmt} format)", where=where, fix="check question_format")
        q["turns"], q["category"] = turns, _norm_category(q["category"])
        out.append(q)
    if references:
        refs = load_answers(references)
        for q in out:
            q["reference"] = refs.get(str(q["question_id"]), q["reference"])
    wanted = {_norm_category(c) for c in categories}
    if wanted:
        out = [q for q in out if q["category"] in wanted]
    if limit:
        seen: dict[str, int] = {}
        kept = []
        for q in out:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            if seen[q["category"]] <= limit:
                kept.append(q)
        out = kept
    if not out:
        raise InputError("no questions left after the category/limit filters", where=str(p))
    ids = [str(q["question_id"]) for q in out]
    if len(set(ids)) != len(ids):
        raise DataError("question ids repeat", where=str(p), fix="give each question a unique question_id")
    return out


def load_answers(path: str | Path) -> dict[str, list[str]]:
    """``question_id -> turns`` from a FastChat answer file (``choices[0].turns``) or rows with ``turns``/``answer``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"answer file not found: {p}")
    out = {}
    for n, r in _read_rows(p):
        if not isinstance(r, dict) or "question_id" not in r:
            raise DataError("an answer row needs a question_id", where=f"{p}:{n}")
        if "choices" in r:
            turns = r["choices"][0]["turns"]
        elif "turns" in r:
            turns = r["turns"]
        elif "answer" in r:
            turns = [r["answer"]]
        else:
            raise DataError("an answer row needs choices[0].turns, turns or answer", where=f"{p}:{n}")
        out[str(r["question_id"])] = [str(t) for t in turns]
    return out


# ------------------------------------------------------------------------------ answering
def endpoint_chat(
    base_url: Optional[str],
    model: Optional[str],
    api_key_env: str = "OPENAI_API_KEY",
    *,
    what: str = "",
    max_tokens: int = 1024,
    temperature: float = 0.0,
    **client_kw,
) -> Chat:
    """``messages -> text`` through an OpenAI-compatible endpoint."""
    client = Client.from_env(base_url, model, api_key_env, what=what, **client_kw)

    def chat(messages: list[dict]) -> str:
        return client.chat(messages, max_tokens=max_tokens, temperature=temperature).text

    return chat


def local_chat(model_dir: str | Path, max_tokens: int = 1024, temperature: float = 0.0, seed: int = 0) -> Chat:
    """``messages -> text`` with the model loaded in this process; calls from several threads decode as one batch."""
    from minima.infer.engine import Engine

    engine = Engine.from_dir(model_dir)

    def chat(messages: list[dict]) -> str:
        return engine.chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)

    return chat


def _run_jobs(
    jobs: list[tuple[str, Callable[[], Any]]], concurrency: int, on_done: Callable[[str, Any], None], desc: str
) -> None:
    """Run ``(key, fn)`` jobs, at most ``concurrency`` at once; ``on_done(key, result)`` runs in this thread.

    After a failure no new job starts, the ones in flight still get recorded, then the error is raised.
    """
    if not jobs:
        return
    t0 = time.time()
    done_n = 0
    todo = iter(jobs)
    error: Optional[BaseException] = None
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="chat-eval") as pool:
        pending: dict = {}

        def fill() -> None:
            while error is None and len(pending) < concurrency:
                job = next(todo, None)
                if job is None:
                    return
                pending[pool.submit(job[1])] = job[0]

        fill()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                key = pending.pop(fut)
                try:
                    result = fut.result()
                except BaseException as e:
                    error = error or e
                    continue
                on_done(key, result)
                done_n += 1
            log.info("%s: %d/%d | %.0f s", desc, done_n, len(jobs), time.time() - t0)
            fill()
    if error is not None:
        raise error


def generate_answers(
    questions: list[dict], chat: Chat, out_path: str | Path, model_id: str, concurrency: int = 1
) -> dict[str, list[str]]:
    """Answer every question (all its turns, in one conversation); resumes from ``out_path``.

    Returns:
        ``question_id -> reply per turn`` for all questions.
    """
    path = Path(out_path)
    answers = {str(r["question_id"]): r["choices"][0]["turns"] for r in read_journal(path)}
    journal = Journal(path)

    def answer(q: dict) -> list[str]:
        messages: list[dict] = []
        replies = []
        for turn in q["turns"]:
            messages.append({"role": "user", "content": turn})
            reply = chat(list(messages))
            messages.append({"role": "assistant", "content": reply})
            replies.append(reply)
        return replies

    by_id = {str(q["question_id"]): q for q in questions}

    def done(key: str, replies: list[str]) -> None:
        q = by_id[key]
        journal.write(
            {
                "question_id": q["question_id"],
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "category": q["category"],
                "choices": [{"index": 0, "turns": replies}],
                "tstamp": time.time(),
            }
        )
        answers[key] = replies

    todo = [(key, (lambda q=q: answer(q))) for key, q in by_id.items() if key not in answers]
    try:
        _run_jobs(todo, concurrency, done, f"answers {model_id}")
    finally:
        journal.close()
    return answers


# ------------------------------------------------------------------------------ judge prompts
JUDGE_SYSTEM = (
    "You are an impartial expert who grades the replies of AI assistants and follows the grading rules exactly."
)

_RULES = (
    "- Decide first whether the reply is correct and does what the user asked; then how helpful, relevant and "
    "complete it is; then how clear it is.\n"
    "- Length earns nothing by itself: a short reply that fully answers deserves a high grade.\n"
    "- The conversation may be in Chinese or in English; a reply in a language the user would not expect is a flaw.\n"
)
_REFERENCE_RULE = (
    "- An expert's reference answer is included. Use it to check facts and final results: a reply "
    "that contradicts it deserves a low grade, however well written.\n"
)

SINGLE_TEMPLATE = (
    "Grade the AI assistant's reply to the last user message in the conversation below.\n\n"
    "How to grade:\n{rules}"
    "Write a short justification (at most five sentences). Then end with the grade on its own line, an integer "
    "from 1 (useless or wrong) to 10 (excellent), in exactly this form: Grade: [[N]]\n\n"
    "{conversation}"
)
PAIR_TEMPLATE = (
    "Two AI assistants, A and B, had the same conversation with a user. Decide whose reply to the last user message "
    "is better.\n\n"
    "How to judge:\n{rules}"
    "- Neither the order in which the two appear, nor their length, nor their names may influence you.\n"
    "- If they are equally good or equally bad, call it a tie.\n"
    "Write a short comparison (at most five sentences). Then end with your verdict on its own line in exactly one "
    "of these forms: [[A]] if A is better, [[B]] if B is better, [[C]] for a tie.\n\n"
    "{conversation}"
)


def _dialogue(turns: list[str], replies: list[str], upto: int, name: str = "Assistant") -> str:
    parts = []
    for i in range(upto + 1):
        parts.append(f"[User]\n{turns[i]}")
        label = f"[{name}]" if i < upto else f"[{name} - the reply to grade]"
        parts.append(f"{label}\n{replies[i]}")
    return "\n\n".join(parts)


def single_prompt(q: dict, replies: list[str], turn: int, use_reference: bool = True) -> list[dict]:
    """Judge messages grading turn ``turn`` (0-based) of ``replies`` to question ``q``."""
    ref = q["reference"][turn] if use_reference and q.get("reference") and turn < len(q["reference"]) else None
    conversation = _dialogue(q["turns"], replies, turn)
    if ref:
        conversation += f"\n\n[Reference answer to the last user message]\n{ref}"
    rules = _RULES + (_REFERENCE_RULE if ref else "")
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": SINGLE_TEMPLATE.format(rules=rules, conversation=conversation)},
    ]


def pair_prompt(
    q: dict, replies_a: list[str], replies_b: list[str], turn: int, use_reference: bool = True
) -> list[dict]:
    """Judge messages comparing A and B on turn ``turn`` (0-based)."""
    ref = q["reference"][turn] if use_reference and q.get("reference") and turn < len(q["reference"]) else None
    conversation = (
        "<<Conversation with assistant A>>\n"
        + _dialogue(q["turns"], replies_a, turn, "Assistant A")
        + "\n<<End of A>>\n\n<<Conversation with assistant B>>\n"
        + _dialogue(q["turns"], replies_b, turn, "Assistant B")
        + "\n<<End of B>>"
    )
    if ref:
        conversation += f"\n\n[Reference answer to the last user message]\n{ref}"
    rules = _RULES.replace("the reply", "a reply") + (_REFERENCE_RULE if ref else "")
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": PAIR_TEMPLATE.format(rules=rules, conversation=conversation)},
    ]


_SCORE_BRACKETS = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_SCORE_LABEL = re.compile(r"(?:grade|rating|score|评分|分数|得分)\s*[:：]?\s*\[?\[?\s*(\d+(?:\.\d+)?)", re.I)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_score(text: str) -> Optional[float]:
    """The 1-10 grade in a judge reply (the last ``[[N]]``, else the last ``Grade: N``); None if absent or invalid."""
    for pattern in (_SCORE_BRACKETS, _SCORE_LABEL):
        found = pattern.findall(text or "")
        if found:
            value = float(found[-1])
            return value if 1 <= value <= 10 else None
    return None


def parse_verdict(text: str) -> Optional[str]:
    """``"A"``, ``"B"`` or ``"tie"`` from the last ``[[A]]``/``[[B]]``/``[[C]]`` in a judge reply; None if absent."""
    found = _VERDICT.findall(text or "")
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def combine_swap(model_first: Optional[str], model_second: Optional[str]) -> str:
    """Outcome for the model from the two orders.

    Args:
        model_first: verdict when the model was A (``"A"``, ``"B"``, ``"tie"`` or None if unparseable).
        model_second: verdict when the model was B.

    Returns:
        ``win``, ``loss`` or ``tie`` when both orders agree; ``inconsistent`` when the order changed the
        verdict (position bias; scored as a tie); ``error`` when either verdict is missing.
    """
    if model_first is None or model_second is None:
        return "error"
    a = {"A": "win", "B": "loss", "tie": "tie"}[model_first]
    b = {"A": "loss", "B": "win", "tie": "tie"}[model_second]
    return a if a == b else "inconsistent"


# ------------------------------------------------------------------------------ judging
def judge_single(
    questions: list[dict],
    answers: dict[str, list[str]],
    judge: Chat,
    out_path: str | Path,
    model_id: str,
    judge_id: str,
    use_reference: bool = True,
    concurrency: int = 1,
) -> list[dict]:
    """Grade every turn of every answer 1-10; resumes from ``out_path``; returns all judgment rows."""
    path = Path(out_path)
    rows = {r["key"]: r for r in read_journal(path)}
    jobs, meta = [], {}
    for q in questions:
        replies = answers.get(str(q["question_id"]))
        if replies is None:
            raise DataError(
                f"no answer for question {q['question_id']}", where=str(out_path), fix="generate the answers first"
            )
        for turn in range(len(q["turns"])):
            key = f"single|{model_id}|{judge_id}|{q['question_id']}|{turn + 1}"
            if key in rows:
                continue
            messages = single_prompt(q, replies, turn, use_reference)
            meta[key] = (q, turn)
            jobs.append((key, (lambda m=messages: judge(m))))

    def row(key: str, text: str) -> dict:
        q, turn = meta[key]
        score = parse_score(text)
        return {
            **_row_head(key, "single", q, turn, model_id, judge_id),
            "score": score,
            "status": "ok" if score is not None else "unparseable",
            "judgment": text,
            "tstamp": time.time(),
        }

    return _run_journaled(path, rows, jobs, row, concurrency, f"judge {model_id}")


def judge_pairwise(
    questions: list[dict],
    answers: dict[str, list[str]],
    baseline: dict[str, list[str]],
    judge: Chat,
    out_path: str | Path,
    model_id: str,
    baseline_id: str,
    judge_id: str,
    use_reference: bool = True,
    concurrency: int = 1,
) -> list[dict]:
    """Compare model and baseline per turn in both orders; resumes from ``out_path``; returns one row per order."""
    path = Path(out_path)
    rows = {r["key"]: r for r in read_journal(path)}
    jobs, meta = [], {}
    for q in questions:
        qid = str(q["question_id"])
        if qid not in answers or qid not in baseline:
            who = model_id if qid not in answers else baseline_id
            raise DataError(f"no answer of {who} for question {q['question_id']}", where=str(out_path))
        for turn in range(len(q["turns"])):
            for order in ("model_first", "model_second"):
                key = f"pair|{model_id}|{baseline_id}|{judge_id}|{q['question_id']}|{turn + 1}|{order}"
                if key in rows:
                    continue
                a, b = (answers[qid], baseline[qid]) if order == "model_first" else (baseline[qid], answers[qid])
                messages = pair_prompt(q, a, b, turn, use_reference)
                meta[key] = (q, turn, order)
                jobs.append((key, (lambda m=messages: judge(m))))

    def row(key: str, text: str) -> dict:
        q, turn, order = meta[key]
        verdict = parse_verdict(text)
        return {
            **_row_head(key, "pairwise", q, turn, model_id, judge_id),
            "baseline": baseline_id,
            "order": order,
            "verdict": verdict,
            "status": "ok" if verdict else "unparseable",
            "judgment": text,
            "tstamp": time.time(),
        }

    return _run_journaled(path, rows, jobs, row, concurrency, f"judge {model_id} vs {baseline_id}")


def _row_head(key: str, mode: str, q: dict, turn: int, model_id: str, judge_id: str) -> dict:
    return {
        "key": key,
        "mode": mode,
        "question_id": q["question_id"],
        "category": q["category"],
        "turn": turn + 1,
        "model": model_id,
        "judge": judge_id,
    }


def _run_journaled(
    path: Path, rows: dict, jobs: list, make_row: Callable[[str, str], dict], concurrency: int, desc: str
) -> list[dict]:
    """Run the judge jobs, appending each finished judgment's row to the journal at ``path`` as it lands."""
    journal = Journal(path)

    def done(key: str, text: str) -> None:
        r = make_row(key, text)
        journal.write(r)
        rows[key] = r

    try:
        _run_jobs(jobs, concurrency, done, desc)
    finally:
        journal.close()
    return list(rows.values())


def pairwise_outcomes(rows: Iterable[dict]) -> list[dict]:
    """Join the two orders of each (question, turn): ``{question_id, category, turn, outcome}``."""
    pairs: dict[tuple, dict] = {}
    for r in rows:
        k = (str(r["question_id"]), r["turn"])
        pairs.setdefault(k, {"question_id": r["question_id"], "category": r["category"], "turn": r["turn"]})[
            r["order"]
        ] = r["verdict"]
    return [dict(p, outcome=combine_swap(p.get("model_first"), p.get("model_second"))) for p in pairs.values()]


def length_controlled(rows: list[dict], answers: dict[str, list[str]], baseline: dict[str, list[str]]):
    """AlpacaEval 2's LC win rate over the decided (question, turn) pairs; None with fewer than two."""
    from minima.evaluate.length_control import length_controlled_win_rate, preference_of

    prefs, lens_model, lens_base = [], [], []
    for o in pairwise_outcomes(rows):
        pref = preference_of(o["outcome"])
        qid, t = str(o["question_id"]), o["turn"] - 1
        if pref is None or qid not in answers or qid not in baseline:
            continue
        prefs.append(pref)
        lens_model.append(len(answers[qid][t]) if t < len(answers[qid]) else 0)
        lens_base.append(len(baseline[qid][t]) if t < len(baseline[qid]) else 0)
    if len(prefs) < 2:
        return None
    return length_controlled_win_rate(prefs, lens_model, lens_base)


# ------------------------------------------------------------------------------ reports
def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def report_single(rows: list[dict]) -> tuple[dict, str]:
    """Per-category means (per turn and overall) and unparseable counts; ``(metrics, markdown)``."""
    cats = sorted({r["category"] for r in rows})
    max_turn = max((r["turn"] for r in rows), default=1)
    table: dict[str, dict] = {}
    for cat in cats + ["all"]:
        sel = [r for r in rows if cat == "all" or r["category"] == cat]
        scores = [r["score"] for r in sel if r["score"] is not None]
        entry = {
            "questions": len({str(r["question_id"]) for r in sel}),
            "judged": len(sel),
            "mean": _mean(scores),
            "unparseable": sum(r["status"] != "ok" for r in sel),
        }
        for t in range(1, max_turn + 1):
            entry[f"turn{t}"] = _mean([r["score"] for r in sel if r["turn"] == t and r["score"] is not None])
        table[cat] = entry
    turn_cols = [f"turn {t}" for t in range(1, max_turn + 1)] if max_turn > 1 else []
    head = ["category", "questions", *turn_cols, "mean (1-10)", "unparseable"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for cat, e in table.items():
        cells = [f"**{cat}**" if cat == "all" else cat, str(e["questions"])]
        cells += [_fmt(e[f"turn{t}"]) for t in range(1, max_turn + 1)] if turn_cols else []
        cells += [_fmt(e["mean"]), str(e["unparseable"])]
        lines.append("| " + " | ".join(cells) + " |")
    metrics = {
        "score": table["all"]["mean"],
        "unparseable": table["all"]["unparseable"],
        "judged": table["all"]["judged"],
        "per_category": table,
    }
    return metrics, "\n".join(lines)


def report_pairwise(rows: list[dict]) -> tuple[dict, str]:
    """Per-category win/tie/loss/inconsistent/error counts and win rate; ``(metrics, markdown)``.

    Win rate = (wins + (ties + inconsistent) / 2) / (decided pairs), errors left out.
    """
    outcomes = pairwise_outcomes(rows)
    cats = sorted({o["category"] for o in outcomes})
    table: dict[str, dict] = {}
    for cat in cats + ["all"]:
        sel = [o for o in outcomes if cat == "all" or o["category"] == cat]
        c = {k: sum(o["outcome"] == k for o in sel) for k in ("win", "tie", "loss", "inconsistent", "error")}
        decided = len(sel) - c["error"]
        c["win_rate"] = (c["win"] + 0.5 * (c["tie"] + c["inconsistent"])) / decided if decided else None
        c["pairs"] = len(sel)
        table[cat] = c
    head = ["category", "pairs", "win", "tie", "loss", "inconsistent", "unparseable", "win rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for cat, c in table.items():
        cells = [f"**{cat}**" if cat == "all" else cat] + [
            str(c[k]) for k in ("pairs", "win", "tie", "loss", "inconsistent", "error")
        ]
        cells.append("-" if c["win_rate"] is None else f"{100 * c['win_rate']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    metrics = {
        "win_rate": table["all"]["win_rate"],
        "unparseable": table["all"]["error"],
        "pairs": table["all"]["pairs"],
        "per_category": table,
    }
    return metrics, "\n".join(lines)


# ------------------------------------------------------------------------------ the run
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def run_chat_eval(
    cfg: ChatEvalConfig,
    answer_chat: Optional[Chat] = None,
    judge_chat: Optional[Chat] = None,
    baseline_chat: Optional[Chat] = None,
) -> dict:
    """Answer, judge and report. The ``*_chat`` arguments replace the configured models (tests, custom backends).

    Returns:
        metrics: ``score`` (single) or ``win_rate`` and ``lc_win_rate`` (pairwise, the length-controlled
        win rate of AlpacaEval 2, :mod:`minima.evaluate.length_control`), ``unparseable``, ``per_category``,
        ``report`` (markdown) and the file paths.
    """
    out = Path(cfg.out_dir)
    questions = load_questions(cfg.questions, cfg.question_format, cfg.references, cfg.categories, cfg.limit)
    model_id = (
        cfg.model_id
        or (Path(cfg.model).resolve().name if cfg.model else cfg.model_name)
        or ("answers" if cfg.answers else None)
    )
    if not model_id:
        raise ConfigError(
            "nothing to evaluate", where="model", fix="set model=DIR, model_base_url= with model_name=, or answers=FILE"
        )
    model_id = _safe(model_id)
    client_kw = dict(max_retries=cfg.max_retries, backoff=cfg.backoff, timeout=cfg.timeout)
    if cfg.mode == "pairwise" and not (
        cfg.baseline_answers or cfg.baseline_model or baseline_chat or all(q["baseline"] for q in questions)
    ):
        raise ConfigError(
            "pairwise mode needs a baseline",
            where="baseline_answers",
            fix="set baseline_answers=FILE or baseline_model=DIR (alpaca_eval files carry their own)",
        )
    judge = judge_chat or endpoint_chat(
        cfg.judge_base_url,
        cfg.judge_model,
        cfg.judge_api_key_env,
        what="judge_",
        max_tokens=cfg.judge_max_tokens,
        temperature=0.0,
        **client_kw,
    )
    judge_id = _safe(cfg.judge_model or "judge")

    answers_path = out / "answers" / f"{model_id}.jsonl"
    if cfg.answers:
        answers = load_answers(cfg.answers)
    else:
        chat = answer_chat
        concurrency = cfg.concurrency
        if chat is None and cfg.model:
            chat = local_chat(cfg.model, cfg.answer_max_tokens, cfg.answer_temperature, cfg.seed)
        elif chat is None:
            chat = endpoint_chat(
                cfg.model_base_url,
                cfg.model_name,
                cfg.model_api_key_env,
                what="model_",
                max_tokens=cfg.answer_max_tokens,
                temperature=cfg.answer_temperature,
                **client_kw,
            )
        answers = generate_answers(questions, chat, answers_path, model_id, concurrency)

    result: dict = {
        "mode": cfg.mode,
        "model": model_id,
        "judge": judge_id,
        "questions": len(questions),
        "answers_file": str(answers_path),
    }
    if cfg.mode == "single":
        path = out / "judgments" / f"single_{model_id}.jsonl"
        rows = judge_single(questions, answers, judge, path, model_id, judge_id, cfg.use_reference, cfg.concurrency)
        metrics, table = report_single(rows)
        title = f"{model_id}: single-answer grades by {judge_id} ({Path(cfg.questions).name})"
    else:
        if cfg.baseline_answers:
            baseline = load_answers(cfg.baseline_answers)
            baseline_id = cfg.baseline_id or Path(cfg.baseline_answers).stem
        elif cfg.baseline_model or baseline_chat:
            baseline_id = _safe(
                cfg.baseline_id or (Path(cfg.baseline_model).resolve().name if cfg.baseline_model else "baseline")
            )
            chat = baseline_chat or local_chat(
                cfg.baseline_model, cfg.answer_max_tokens, cfg.answer_temperature, cfg.seed
            )
            baseline = generate_answers(
                questions,
                chat,
                out / "answers" / f"{baseline_id}.jsonl",
                baseline_id,
                cfg.concurrency,
            )
        else:
            baseline = {str(q["question_id"]): q["baseline"] for q in questions}
            baseline_id = cfg.baseline_id or "reference_outputs"
        baseline_id = _safe(baseline_id)
        path = out / "judgments" / f"pairwise_{model_id}_vs_{baseline_id}.jsonl"
        rows = judge_pairwise(
            questions,
            answers,
            baseline,
            judge,
            path,
            model_id,
            baseline_id,
            judge_id,
            cfg.use_reference,
            cfg.concurrency,
        )
        metrics, table = report_pairwise(rows)
        lc = length_controlled(rows, answers, baseline)
        if lc is not None:
            metrics["lc_win_rate"] = lc["lc_win_rate"]
            metrics["length_control"] = lc
            table += f"\n\nLength-controlled win rate (AlpacaEval 2 GLM): {100 * lc['lc_win_rate']:.1f}%"
        title = f"{model_id} vs {baseline_id}: pairwise (both orders) by {judge_id} ({Path(cfg.questions).name})"
        result["baseline"] = baseline_id
    report = f"### {title}\n\n{table}\n"
    (out).mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report, encoding="utf-8")
    result.update(metrics, report=report, judgments_file=str(path))
    write_json_atomic(out / "report.json", result)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m minima.evaluate.judge questions=F model=DIR judge_base_url=URL judge_model=NAME [key=value ...]``."""
    cfg = command_config(ChatEvalConfig, argv, __doc__)
    if cfg is None:
        return 0
    res = run_chat_eval(cfg)
    print(res["report"])
    return 0


if __name__ == "__main__":
    from minima.core.errors import MinimaError

    try:
        sys.exit(main(sys.argv[1:]))
    except MinimaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
