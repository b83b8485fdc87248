"""demo_qa: the free-answer task on the demo world's held-out facts (scoring, prompts, per-language scores)."""

import json

import pytest

from minima.evaluate.tasks import Settings, get_task
from minima.evaluate.tasks.demo_qa import first_sentence, is_correct


@pytest.mark.parametrize(
    "question, answer, reply, ok",
    [
        ("What is the capital of China?", "Beijing", "The capital of China is Beijing.", True),
        ("What is the capital of China?", "Beijing", " The capital of Mexico is Mexico City.", False),
        # the gold answer must be given, not just repeated from the question
        ("What color is the orange?", "orange", "The orange is orange.", True),
        ("What color is the orange?", "orange", "The orange is red.", False),
        # numbers and Latin words count as whole words only
        ("What is 3 plus 5?", "8", "3 plus 5 equals 18.", False),
        ("What is 3 plus 5?", "8", "3 plus 5 equals 8.", True),
        ("3加5等于几？", "8", "3加5等于8。", True),
        ("巴西的首都是哪里？", "巴西利亚", "巴西的首都是巴西利亚。", True),
        ("巴西的首都是哪里？", "巴西利亚", "巴西的首都是利马。", False),
        # only the first sentence is the answer
        ("What is the capital of China?", "Beijing", "The capital of Japan is Tokyo. Beijing.", False),
    ],
)
def test_is_correct(question, answer, reply, ok):
    assert is_correct(question, answer, reply) is ok


def test_first_sentence():
    assert first_sentence(" The sky is blue. The sea is blue.") == "The sky is blue."
    assert first_sentence("天空是蓝色的。大海是蓝色的。") == "天空是蓝色的。"
    assert first_sentence("no end") == "no end"


def _rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def qa_dir(tmp_path):
    d = tmp_path / "demo_qa"
    _rows(
        d / "dev.jsonl",
        [
            {"question": "What is 1 plus 1?", "answer": "2", "reply": "1 plus 1 equals 2.", "lang": "en"},
            {"question": "1加1等于几？", "answer": "2", "reply": "1加1等于2。", "lang": "zh"},
        ],
    )
    _rows(
        d / "test.jsonl",
        [
            {"question": "What is the capital of China?", "answer": "Beijing", "reply": "x", "lang": "en"},
            {"question": "What is 2 plus 2?", "answer": "4", "reply": "x", "lang": "en"},
            {"question": "中国的首都是哪里？", "answer": "北京", "reply": "x", "lang": "zh"},
        ],
    )
    return d


def _contexts(qa_dir, **settings):
    task = get_task("demo_qa")
    s = Settings(shots=1, spec={"path": str(qa_dir)}, **settings)
    return [inst.requests[0].args[0] for inst in task.instances(task.load(None, s), s)]


def test_base_prompt_is_few_shot_in_the_question_language(qa_dir):
    assert _contexts(qa_dir) == [
        "Question: What is 1 plus 1? Answer: 1 plus 1 equals 2. Question: What is the capital of China? Answer:",
        "Question: What is 1 plus 1? Answer: 1 plus 1 equals 2. Question: What is 2 plus 2? Answer:",
        "问题：1加1等于几？回答：1加1等于2。问题：中国的首都是哪里？回答：",
    ]


def test_chat_prompt_is_the_bare_question_in_the_template(qa_dir):
    got = _contexts(qa_dir, chat_template=True, render=lambda q: f"<user>{q}</user><assistant>")
    assert got == [
        "<user>What is the capital of China?</user><assistant>",
        "<user>What is 2 plus 2?</user><assistant>",
        "<user>中国的首都是哪里？</user><assistant>",
    ]


def test_scores_per_language(qa_dir):
    task = get_task("demo_qa")
    s = Settings(shots=1, spec={"path": str(qa_dir)})
    inst = task.instances(task.load(None, s), s)
    replies = {"Beijing": " The capital of China is Beijing.", "4": " 2 plus 2 equals 5.", "北京": "中国的首都是北京。"}
    scored = task.score(inst, [[[replies[i.doc.gold]]] for i in inst], s)
    res = task.aggregate(scored, s)
    assert (res["exact_match_en"], res["exact_match_zh"]) == (0.5, 1.0)
    assert res["exact_match"] == pytest.approx(2 / 3)
    assert [task.sample(x)["question"] for x in scored][0] == "What is the capital of China?"


def test_evaluate_model_runs_demo_qa_greedy(tiny_model_dir, demo_data_dir):
    """Through the runner: one reply per item, and the greedy replies are the same on a second call."""
    from minima.evaluate.core import evaluate_model
    from minima.models.loader import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_dir), dtype="auto", device="cpu")
    tasks = {"demo_qa": {"path": str(demo_data_dir / "eval/demo_qa"), "limit": 3}}
    a, b = [], []
    ra = evaluate_model(model, tok, tasks, samples=a, max_new_tokens=8)["demo_qa"]
    rb = evaluate_model(model, tok, tasks, samples=b, max_new_tokens=8)["demo_qa"]
    assert rb["exact_match"] == ra["exact_match"]
    assert ra["info"]["n"] == 6 and {"exact_match_en", "exact_match_zh"} <= set(ra)
    assert [s["generation"] for s in a] == [s["generation"] for s in b]
    assert ra["exact_match"] == pytest.approx(sum(s["exact_match"] for s in a) / 6)
