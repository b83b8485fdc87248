"""LLM-judged chat benchmarks: question formats, score/verdict parsing, swap logic, resume, a real judge over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import _chat_server as cs
import pytest
from conftest import shared

from minima.evaluate.judge import (
    ChatEvalConfig,
    combine_swap,
    load_questions,
    pairwise_outcomes,
    parse_score,
    parse_verdict,
    report_pairwise,
    run_chat_eval,
    single_prompt,
)

MT = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
    {
        "question_id": 111,
        "category": "math",
        "turns": ["What is 12 * 12?", "And 13 * 13?"],
        "reference": ["144", "169"],
    },
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_parse_score_and_verdict():
    assert parse_score("Clear and correct.\nGrade: [[8]]") == 8
    assert parse_score("I first thought [[4]] but on reflection [[6]]") == 6  # the last one counts
    assert parse_score("Rating: [[7.5]]") == 7.5 and parse_score("Grade: [[9/10]]") == 9
    assert parse_score("Grade: 3") == 3 and parse_score("评分：5") == 5
    assert parse_score("Grade: [[11]]") is None and parse_score("Grade: [[0]]") is None
    assert parse_score("It is fine, I guess.") is None and parse_score("") is None
    assert parse_verdict("A is more accurate. [[A]]") == "A" and parse_verdict("[[B]]") == "B"
    assert (
        parse_verdict("Both fine: [[C]]") == "tie" and parse_verdict("say [[A]], [[B]] or [[C]]... I pick [[B]]") == "B"
    )
    assert parse_verdict("A is better") is None


def test_pairwise_swap_logic_on_hand_made_judgments():
    # (verdict with the model shown as A, verdict with the model shown as B) -> outcome for the model
    table = {
        ("A", "B"): "win",
        ("B", "A"): "loss",
        ("tie", "tie"): "tie",
        ("A", "A"): "inconsistent",
        ("B", "B"): "inconsistent",  # the judge always picks one position
        ("A", "tie"): "inconsistent",
        ("tie", "B"): "inconsistent",
        ("A", None): "error",
        (None, "tie"): "error",
    }
    for (first, second), want in table.items():
        assert combine_swap(first, second) == want, (first, second)

    def rows(qid, cat, first, second):
        return [
            {"question_id": qid, "category": cat, "turn": 1, "order": "model_first", "verdict": first},
            {"question_id": qid, "category": cat, "turn": 1, "order": "model_second", "verdict": second},
        ]

    hand = (
        rows(1, "math", "A", "B")
        + rows(2, "math", "A", "B")
        + rows(3, "math", "B", "A")
        + rows(4, "math", "A", "A")
        + rows(5, "writing", "tie", "tie")
        + rows(6, "writing", None, "B")
        + rows(7, "writing", "B", "A")
    )
    assert sorted(o["outcome"] for o in pairwise_outcomes(hand)) == [
        "error",
        "inconsistent",
        "loss",
        "loss",
        "tie",
        "win",
        "win",
    ]
    metrics, md = report_pairwise(hand)
    per = metrics["per_category"]
    assert per["math"]["win_rate"] == pytest.approx((2 + 0.5) / 4)  # win, win, loss, inconsistent
    assert (
        per["writing"]["win_rate"] == pytest.approx(0.5 / 2) and per["writing"]["error"] == 1
    )  # tie, loss; error left out
    assert metrics["win_rate"] == pytest.approx((2 + 0.5 + 0.5) / 6) and metrics["unparseable"] == 1
    assert "| math | 4 | 2 | 0 | 1 | 1 | 0 | 62.5% |" in md and "| **all** | 7 | 2 | 1 | 2 | 1 | 1 | 50.0% |" in md


def test_question_formats(tmp_path):
    qs = load_questions(_jsonl(tmp_path / "mt.jsonl", MT))
    assert [q["turns"] for q in qs] == [MT[0]["turns"], MT[1]["turns"]] and qs[1]["reference"] == ["144", "169"]
    refs = _jsonl(
        tmp_path / "ref.jsonl",
        [{"question_id": 81, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["r1", "r2"]}]}],
    )
    assert load_questions(tmp_path / "mt.jsonl", references=refs)[0]["reference"] == ["r1", "r2"]
    old = load_questions(
        _jsonl(tmp_path / "vicuna.jsonl", [{"question_id": 1, "text": "How do I relax?", "category": "generic"}])
    )
    assert old[0]["turns"] == ["How do I relax?"] and old[0]["category"] == "generic"
    belle = load_questions(
        _jsonl(tmp_path / "b.jsonl", [{"question": "写一首诗", "std_answer": "春眠不觉晓", "class": "closed\xa0qa"}])
    )
    assert belle[0] == {
        "question_id": 1,
        "category": "closed qa",
        "turns": ["写一首诗"],
        "reference": ["春眠不觉晓"],
        "baseline": None,
    }
    z = tmp_path / "common.samples.csv"
    z.write_text(
        "common.samples\nPrompt,任务类型,参考回答,GPT3.5,GPT4\n"
        '谁是蝙蝠侠,`事实问答`,,a,b\n"第一行\n第二行",`分类` `情绪感知`,正面,c,d\n',
        encoding="utf-8",
    )
    zq = load_questions(z)
    assert [q["turns"][0] for q in zq] == ["谁是蝙蝠侠", "第一行\n第二行"]
    assert (
        [q["category"] for q in zq] == ["事实问答", "分类"]
        and zq[0]["reference"] is None
        and zq[1]["reference"] == ["正面"]
    )
    ae = load_questions(
        _jsonl(tmp_path / "ae.jsonl", [{"instruction": "Say hi.", "output": "Hi!", "dataset": "helpful_base"}])
    )
    assert ae[0]["baseline"] == ["Hi!"] and ae[0]["category"] == "helpful_base"
    limited = load_questions(
        _jsonl(tmp_path / "mt2.jsonl", MT + [dict(MT[0], question_id=82)]), limit=1, categories=["writing"]
    )
    assert [q["question_id"] for q in limited] == [81]


def test_belle_eval_set_loads_with_its_categories():
    real = load_questions(shared("instruction/belle_eval_set.jsonl"))
    assert len(real) == 1000 and sum(q["reference"] is not None for q in real) == 631  # 369 have an empty std_answer
    assert sorted({q["category"] for q in real}) == [
        "brainstorming",
        "classification",
        "closed qa",
        "code",
        "extract",
        "generation",
        "math",
        "open qa",
        "rewrite",
        "summarization",
    ]


def test_single_grading_resumes_and_records_unparseable(tmp_path):
    qfile = _jsonl(tmp_path / "q.jsonl", MT)
    answered, judged = [], []

    def answer(messages):
        answered.append(messages)
        return f"reply {len(messages) // 2 + 1} to {messages[-1]['content']}"

    def judge(messages):
        judged.append(messages[-1]["content"])
        if len(judged) == 3 and crash["on"]:
            raise RuntimeError("judge endpoint went away")
        prompt = messages[-1]["content"]
        if "haiku" in prompt and "snow" not in prompt:
            return "I would rather not say."  # unparseable
        return "Correct per the reference. Grade: [[9]]" if "[Reference answer" in prompt else "Fine. Grade: [[6]]"

    crash = {"on": True}
    cfg = ChatEvalConfig(
        questions=str(qfile), model_id="m", judge_model="j", out_dir=str(tmp_path / "out"), concurrency=1
    )
    with pytest.raises(RuntimeError):
        run_chat_eval(cfg, answer_chat=answer, judge_chat=judge)
    assert len(answered) == 4  # 2 questions x 2 turns, answered in one conversation each
    assert answered[1][1] == {"role": "assistant", "content": "reply 1 to Write a haiku about rain."}
    crash["on"] = False
    res = run_chat_eval(cfg, answer_chat=answer, judge_chat=judge)
    assert len(answered) == 4 and len(judged) == 3 + 2  # the rerun asks only for the 2 judgments not yet written
    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments" / "single_m.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    by = {(r["question_id"], r["turn"]): r for r in rows}
    assert (
        by[(81, 1)]["status"] == "unparseable"
        and by[(81, 1)]["score"] is None
        and by[(81, 1)]["judgment"] == "I would rather not say."
    )
    assert by[(81, 2)]["score"] == 6 and by[(111, 1)]["score"] == 9 and by[(111, 2)]["score"] == 9
    turn2 = next(p for p in judged if "And 13 * 13?" in p)
    assert (
        "reply 1 to What is 12 * 12?" in turn2 and "[Assistant - the reply to grade]\nreply 2 to And 13 * 13?" in turn2
    )
    assert "[Reference answer to the last user message]\n169" in turn2
    assert res["score"] == pytest.approx((6 + 9 + 9) / 3) and res["unparseable"] == 1
    assert res["per_category"]["writing"]["turn1"] is None and res["per_category"]["math"]["turn2"] == 9
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| math | 1 | 9.00 | 9.00 | 9.00 | 0 |" in md and "| writing | 1 | - | 6.00 | 6.00 | 1 |" in md
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers" / "m.jsonl").read_text().splitlines()]
    assert {a["question_id"] for a in answers} == {81, 111} and answers[0]["choices"][0]["turns"][0].startswith(
        "reply 1"
    )


def test_pairwise_position_swap_cancels_a_biased_judge(tmp_path):
    qfile = _jsonl(
        tmp_path / "ae.jsonl",
        [{"instruction": f"Task {i}", "output": f"baseline {i}", "dataset": "d"} for i in range(4)],
    )

    def answer(messages):
        return "GOOD " + messages[-1]["content"]

    def always_a(messages):
        return "The first one. [[A]]"

    def prefers_good(messages):
        text = messages[-1]["content"]
        a = text.split("<<Conversation with assistant A>>")[1].split("<<End of A>>")[0]
        return "[[A]]" if "GOOD" in a else "[[B]]"

    base = dict(questions=str(qfile), mode="pairwise", model_id="m", concurrency=2)
    biased = run_chat_eval(
        ChatEvalConfig(out_dir=str(tmp_path / "biased"), **base), answer_chat=answer, judge_chat=always_a
    )
    assert biased["per_category"]["all"]["inconsistent"] == 4 and biased["win_rate"] == 0.5
    # All ties (the swap cancels the bias): the LC win rate is the raw one, 50%.
    assert biased["lc_win_rate"] == pytest.approx(0.5) and "Length-controlled win rate" in biased["report"]
    fair = run_chat_eval(
        ChatEvalConfig(out_dir=str(tmp_path / "fair"), **base), answer_chat=answer, judge_chat=prefers_good
    )
    assert (
        fair["per_category"]["all"]["win"] == 4 and fair["win_rate"] == 1.0 and fair["baseline"] == "reference_outputs"
    )
    rows = [json.loads(line) for line in Path(fair["judgments_file"]).read_text().splitlines()]
    assert sorted((r["order"], r["verdict"]) for r in rows)[::4] == [("model_first", "A"), ("model_second", "B")]
    with pytest.raises(Exception, match="baseline"):
        run_chat_eval(
            ChatEvalConfig(
                questions=str(_jsonl(tmp_path / "mt.jsonl", MT)),
                mode="pairwise",
                model_id="m",
                out_dir=str(tmp_path / "x"),
            ),
            answer_chat=answer,
            judge_chat=always_a,
        )


_HF: dict = {}


def _hf_greedy(model_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy continuation by transformers' own generate, cut at EOS, special tokens dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "model" not in _HF:
        _HF["tok"] = AutoTokenizer.from_pretrained(str(model_dir))
        _HF["model"] = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok, model = _HF["tok"], _HF["model"]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer_dir):
    model_dir = cs.chat_model_dir(tmp_path_factory, tiny_tokenizer_dir)
    return cs.server(model_dir), model_dir


def test_judge_flow_against_minima_serve(tmp_path, served):
    """A tiny random model answers (in process) and judges (over HTTP); every grade is parsed or marked unparseable."""
    srv, model_dir = served
    qfile = _jsonl(tmp_path / "q.jsonl", MT)
    common = dict(
        questions=str(qfile),
        judge_base_url=srv.base_url,
        judge_model=model_dir.name,
        judge_api_key_env=cs.KEY_ENV,
        judge_max_tokens=16,
        concurrency=2,
    )
    res = run_chat_eval(
        ChatEvalConfig(
            model=str(model_dir), answer_max_tokens=12, answer_temperature=0, out_dir=str(tmp_path / "single"), **common
        )
    )
    rows = [json.loads(line) for line in Path(res["judgments_file"]).read_text().splitlines()]
    assert len(rows) == 4 and all(r["judgment"] for r in rows)
    answers = Path(res["answers_file"])
    first = [json.loads(line) for line in answers.read_text().splitlines()]
    assert all(len(a["choices"][0]["turns"]) == 2 and a["model_id"] == model_dir.name for a in first)
    # The answers and the judgments over HTTP are HF greedy generations of the same model on the same
    # prompts (the chat template applied by the tokenizer, not by minima).
    replies = {str(a["question_id"]): a["choices"][0]["turns"] for a in first}
    by_id = {str(q["question_id"]): dict(q, category=q["category"]) for q in MT}
    for qid, turns in replies.items():
        history = []
        for i, user in enumerate(by_id[qid]["turns"]):
            history.append({"role": "user", "content": user})
            assert turns[i] == _hf_greedy(model_dir, history, 12), (qid, i)
            history.append({"role": "assistant", "content": turns[i]})
    for r in rows:
        q = by_id[str(r["question_id"])]
        want = _hf_greedy(model_dir, single_prompt(q, replies[str(r["question_id"])], r["turn"] - 1), 16)
        assert r["judgment"] == want, r["key"]
    scored = [r["score"] for r in rows if r["score"] is not None]
    assert res["unparseable"] == 4 - len(scored) and res["unparseable"] == sum(r["status"] != "ok" for r in rows)
    assert "| **all** | 2 |" in (tmp_path / "single" / "report.md").read_text()

    pair = run_chat_eval(
        ChatEvalConfig(
            answers=str(answers),
            mode="pairwise",
            baseline_answers=str(answers),
            model_id="self",
            out_dir=str(tmp_path / "pair"),
            **common,
        )
    )
    rows = [json.loads(line) for line in Path(pair["judgments_file"]).read_text().splitlines()]
    assert len(rows) == 8 and all(r["verdict"] == parse_verdict(r["judgment"]) for r in rows)
    assert pair["pairs"] == 4
