"""``minima self-instruct``: parsing, filters (planted near-duplicates), HTTP retries, resume after a kill."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import _chat_server as cs
import pytest
from conftest import shared
from fastapi import Request

from minima.infer.api_client import ApiError, Client, Reply
from minima.stages.self_instruct import (
    SelfInstructConfig,
    build_prompt,
    lcs_length,
    load_seed_tasks,
    main,
    parse_tasks,
    rouge_l,
    run_self_instruct,
    tokenize,
)

SEEDS = [
    {
        "instruction": "Give three tips for staying healthy.",
        "instances": [{"input": "", "output": "Eat well, sleep, move."}],
    },
    {
        "instruction": "Write a short poem about the ocean at night.",
        "instances": [{"input": "", "output": "Dark water hums."}],
    },
    {
        "instruction": "Classify the sentiment of the given sentence as positive or negative.",
        "instances": [{"input": "I love this film.", "output": "positive"}],
    },
    {
        "instruction": "Explain the difference between a virus and a bacterium.",
        "instances": [{"input": "", "output": "Size and life."}],
    },
    {"instruction": "给出下面词语的同义词", "instances": [{"input": "惊人地", "output": "令人惊奇地"}]},
    {"instruction": "请以下面词语为主题写一首诗", "instances": [{"input": "夏天", "output": "夏日长"}]},
]

EN_REPLY = """4. Instruction: Write a short poem about the sea at night.
4. Input:
<noinput>
4. Output:
The waves are silver under the moon.
###
5. Instruction: Draw a picture of a cat sitting on a mat.
5. Input:
<noinput>
5. Output:
(a drawing)
###
6. Instruction: Sing.
6. Input:
<noinput>
6. Output:
La la la.
###
7. Instruction: List four countries in South America and their capitals.
7. Input:
<noinput>
7. Output:
Brazil: Brasilia; Peru: Lima; Chile: Santiago; Colombia: Bogota.
###
8. Instruction: List four countries in South America and their capitals.
8. Input:
<noinput>
8. Output:
Argentina: Buenos Aires.
###
9. Instruction: Summarize the following paragraph in one sentence.
9. Input:
The committee met on Monday. It approved the budget after a long debate.
9. Output:
After a long debate on Monday, the committee approved the budget.
###
10. Instruction: Translate the given sentence into French.
10. Input:
I like apples.
10. Output:
J'aime les"""

ZH_REPLY = """4. 指令：给出下面词语的反义词
4. 输入：
高兴
4. 输出：
难过
###
5. 指令：请描述这张图片中的内容。
5. 输入：
<无输入>
5. 输出：
图片里有一只猫。
###
6. 指令：请用一句话解释什么是光合作用。
6. 输入：
<无输入>
6. 输出：
光合作用是植物利用光能把二氧化碳和水变成有机物并释放氧气的过程。"""


@pytest.fixture()
def seeds_file(tmp_path) -> Path:
    p = tmp_path / "seeds.jsonl"
    p.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SEEDS), encoding="utf-8")
    return p


# ------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_matches_rouge_score_and_a_hand_count():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeL"], use_stemmer=False)
    texts = [s["instruction"] for s in SEEDS[:4]] + [
        "Write a short poem about the sea at night.",
        "What's 2+2? Answer: 4!",
        "",
    ]
    for a in texts:
        for b in texts:
            assert rouge_l(tokenize(a), tokenize(b)) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure, abs=1e-12)
    # rouge-score drops CJK text entirely; ours counts each character: LCS 9 of 10 -> F1 0.9.
    assert scorer.score("给出下面词语的同义词", "给出下面词语的反义词")["rougeL"].fmeasure == 0
    assert rouge_l(tokenize("给出下面词语的同义词"), tokenize("给出下面词语的反义词")) == pytest.approx(0.9)
    assert tokenize("用Python写 3 个例子") == ["用", "python", "写", "3", "个", "例", "子"]

    def dp(a, b):
        m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                m[i + 1][j + 1] = m[i][j] + 1 if x == y else max(m[i][j + 1], m[i + 1][j])
        return m[-1][-1]

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randint(0, 4) for _ in range(rng.randint(0, 40))]
        b = [rng.randint(0, 4) for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == dp(a, b)


def test_real_seed_files_load_with_their_language():
    en = load_seed_tasks([shared("instruction/alpaca_seed_tasks.jsonl")])
    zh = load_seed_tasks([shared("instruction/belle_zh_seed_tasks.jsonl")])
    assert len(en) == len(zh) == 175
    assert all(t["lang"] == "en" for t in en)
    assert sum(t["lang"] == "zh" for t in zh) >= 170
    assert en[1] == {
        "instruction": "What is the relation between the given pairs?",
        "input": "Night : Day :: Right : Left",
        "output": "The relation between the given pairs is that they are opposites.",
        "lang": "en",
    }


# ------------------------------------------------------------------------------ prompt + parsing
def test_prompt_and_numbered_list_parsing():
    ex = [
        {"instruction": "Give three tips.", "input": "", "output": "A, B, C."},
        {"instruction": "Sort these.", "input": "3 1 2", "output": "1 2 3"},
    ]
    p = build_prompt(ex, "en", 5)
    assert p.endswith("3. Instruction:") and "until there are 7 in all" in p
    assert "1. Input:\n<noinput>\n" in p and "2. Input:\n3 1 2\n2. Output:\n1 2 3\n###" in p
    assert build_prompt(ex, "zh", 5).endswith("3. 指令：")

    tasks = parse_tasks(EN_REPLY, truncated=True, first_number=4)
    assert len(tasks) == 6  # the 7th (cut by the token limit) is dropped
    assert tasks[0] == {
        "instruction": "Write a short poem about the sea at night.",
        "input": "",
        "output": "The waves are silver under the moon.",
    }
    assert tasks[5]["input"] == "The committee met on Monday. It approved the budget after a long debate."
    assert len(parse_tasks(EN_REPLY, truncated=False)) == 7
    # A completion continues after "4. Instruction:", so the reply starts with the text itself.
    cont = (
        " Name a colour.\n4. Input:\n<noinput>\n4. Output:\nBlue.\n###\n"
        "5. Instruction: Name a fruit.\n5. Output: Apple.\n###\nThanks!"
    )
    assert parse_tasks(cont, first_number=4) == [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
    ]
    zh = parse_tasks(ZH_REPLY)
    assert [t["input"] for t in zh] == ["高兴", "", ""] and zh[2]["instruction"] == "请用一句话解释什么是光合作用。"
    assert parse_tasks("no list here at all")[0]["output"] == ""  # becomes an 'empty' rejection


# ------------------------------------------------------------------------------ filters (planted)
def test_filters_reject_planted_near_duplicates_and_blacklisted_tasks(tmp_path, seeds_file):
    prompts = []

    def generate(prompt: str, lang: str) -> Reply:
        prompts.append((lang, prompt))
        return Reply(EN_REPLY if lang == "en" else ZH_REPLY, "length" if lang == "en" else "stop")

    cfg = SelfInstructConfig(
        seed_tasks=[str(seeds_file)],
        out=str(tmp_path / "si.json"),
        num_instructions_to_generate=3,
        concurrency=1,
        num_prompt_instructions=2,
    )
    res = run_self_instruct(cfg, generate)
    assert res.complete and res.accepted == 3 and res.requests == 2
    assert [lang for lang, _ in prompts] == ["en", "zh"]
    assert "给出下面词语的同义词" in prompts[1][1] or "请以下面词语为主题写一首诗" in prompts[1][1]
    out = json.loads((tmp_path / "si.json").read_text())
    assert [t["instruction"] for t in out] == [
        "List four countries in South America and their capitals.",
        "Summarize the following paragraph in one sentence.",
        "请用一句话解释什么是光合作用。",
    ]
    assert set(out[0]) == {"instruction", "input", "output"}
    # The records stage (format=chat) reads the file as it is.
    from minima.data.records.inputs import SourceReader

    docs = list(SourceReader("chat").read(tmp_path / "si.json"))
    assert [{k: m[k] for k in ("role", "content")} for m in docs[1].payload] == [
        {"role": "user", "content": out[1]["instruction"] + "\n" + out[1]["input"]},
        {"role": "assistant", "content": out[1]["output"]},
    ]
    rejected = [json.loads(line) for line in (tmp_path / "si.rejected.jsonl").read_text().splitlines()]
    reasons = {r["instruction"]: r["reason"] for r in rejected}
    assert reasons["Write a short poem about the sea at night."] == "similar"  # planted near-duplicate of a seed
    assert (
        next(r for r in rejected if r["reason"] == "similar" and r["instruction"].startswith("Write"))["similar_to"]
        == "Write a short poem about the ocean at night."
    )
    assert reasons["给出下面词语的反义词"] == "similar"  # Chinese near-duplicate (ROUGE-L 0.9 on characters)
    assert reasons["Draw a picture of a cat sitting on a mat."] == "blacklist"
    assert reasons["请描述这张图片中的内容。"] == "blacklist"
    assert reasons["Sing."] == "length"
    assert sum(r["reason"] == "duplicate" for r in rejected) == 1
    stats = json.loads((tmp_path / "si.stats.json").read_text())
    assert stats["rejected"] == {"similar": 2, "blacklist": 2, "length": 1, "duplicate": 1} and stats["complete"]
    # Already complete: a rerun sends nothing.
    assert run_self_instruct(cfg, lambda p, lang: pytest.fail("no request expected")).accepted == 3


# ------------------------------------------------------------------------------ a stub endpoint
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "su",
    "ta",
    "ri",
    "po",
    "de",
    "vu",
    "zo",
    "ba",
    "fe",
    "gi",
    "hu",
    "jo",
    "qe",
    "wy",
    "xa",
    "ce",
]
WORDS = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES[:5]]


class Stub:
    """An OpenAI-style chat endpoint in a thread: fails as planned, then returns fresh numbered tasks."""

    def __init__(self, fail=(), delay=0.0, tasks=4):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.fail, self.delay, self.tasks = list(fail), delay, tasks
        self.calls = 0
        self.counter = 0
        self.lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self.lock:
                self.calls += 1
                status = self.fail.pop(0) if self.fail else 200
                start = self.counter
                self.counter += self.tasks if status == 200 else 0
            if status != 200:
                return JSONResponse(
                    {"error": {"message": "planned failure", "type": "x", "param": None, "code": None}},
                    status_code=status,
                    headers={"Retry-After": "0"} if status == 429 else {},
                )
            if self.delay:
                import asyncio

                await asyncio.sleep(self.delay)
            k = body["messages"][0]["content"].count("###")
            lines = []
            for i in range(self.tasks):
                rng = random.Random(start + i)
                words = " ".join(rng.choice(WORDS) for _ in range(8))
                n = k + 1 + i
                lines.append(
                    f"{n}. Instruction: Explain {words}.\n{n}. Input:\n<noinput>\n"
                    f"{n}. Output:\nAnswer {start + i}.\n###"
                )
            return {
                "id": "x",
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "\n".join(lines)}, "finish_reason": "stop"}
                ],
            }

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture()
def stub():
    made = []

    def make(**kw):
        s = Stub(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_client_backs_off_on_429_and_5xx_and_fails_fast_on_4xx(stub):
    s = stub(fail=[429, 503, 500])
    waits = []
    c = Client(s.url, "stub", backoff=0.5, max_retries=5, sleep=waits.append)
    assert "Instruction" in c.chat([{"role": "user", "content": "hi"}]).text
    assert s.calls == 4 and c.retries == 3
    assert 0.25 <= waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0 and 1.0 <= waits[2] <= 2.0  # doubling, with jitter
    s2 = stub(fail=[500, 500, 500])
    with pytest.raises(ApiError, match="kept failing after 3 attempts"):
        Client(s2.url, "stub", max_retries=2, sleep=lambda t: None).chat([])
    s3 = stub(fail=[400])
    with pytest.raises(ApiError, match="HTTP 400"):
        Client(s3.url, "stub", sleep=lambda t: pytest.fail("a 400 is not retried")).chat([])
    assert s3.calls == 1


def test_generates_n_items_over_http_with_retries(tmp_path, seeds_file, stub, monkeypatch):
    s = stub(fail=[429, 503], tasks=4)
    monkeypatch.setenv("STUB_KEY", "k")
    cfg = SelfInstructConfig(
        base_url=s.url,
        model="stub",
        api_key_env="STUB_KEY",
        seed_tasks=[str(seeds_file)],
        language="en",
        out=str(tmp_path / "out" / "si.json"),
        num_instructions_to_generate=30,
        tasks_per_request=4,
        concurrency=3,
        backoff=0.01,
    )
    res = run_self_instruct(cfg)
    data = json.loads((tmp_path / "out" / "si.json").read_text())
    assert res.complete and len(data) == 30 and len({d["instruction"] for d in data}) == 30
    assert s.calls >= 2 + 30 // 4 and res.requests >= 30 // 4


def test_killed_run_resumes_without_duplicates_or_losses(tmp_path, seeds_file, stub):
    s = stub(delay=0.25, tasks=3)
    out = tmp_path / "si.json"
    args = [
        f"base_url={s.url}",
        "model=stub",
        f"seed_tasks=[{seeds_file}]",
        f"out={out}",
        "num_instructions_to_generate=30",
        "tasks_per_request=3",
        "concurrency=2",
        "language=en",
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "minima.cli", "self-instruct", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    journal = tmp_path / "si.accepted.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not journal.exists() or journal.read_text().count("\n") < 6):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [json.loads(line)["instruction"] for line in journal.read_text().splitlines()]
    assert 6 <= len(first) < 30 and not out.exists()
    with open(journal, "a") as f:
        f.write('{"instruction": "a line torn by the kil')  # as if killed mid-write

    cfg = SelfInstructConfig(
        base_url=s.url,
        model="stub",
        seed_tasks=[str(seeds_file)],
        out=str(out),
        num_instructions_to_generate=30,
        tasks_per_request=3,
        concurrency=2,
        language="en",
    )
    res = run_self_instruct(cfg)
    final = [d["instruction"] for d in json.loads(out.read_text())]
    assert res.complete and len(final) == 30 and len(set(final)) == 30
    assert final[: len(first)] == first  # nothing accepted before the kill is lost
    assert res.requests <= -(-(30 - len(first)) // 3) + 2  # the rerun only asked for what was missing
    assert all(json.loads(line) for line in journal.read_text().splitlines())


# ------------------------------------------------------------------------------ against minima serve
@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer_dir):
    model_dir = cs.chat_model_dir(tmp_path_factory, tiny_tokenizer_dir)
    return cs.server(model_dir), model_dir.name


def test_round_trip_against_minima_serve(tmp_path, seeds_file, served):
    srv, name = served
    out = tmp_path / "si.json"
    args = [
        f"base_url={srv.base_url}",
        f"model={name}",
        f"api_key_env={cs.KEY_ENV}",
        f"seed_tasks=[{seeds_file}]",
        f"out={out}",
        "num_instructions_to_generate=2",
        "tasks_per_request=2",
        "max_tokens=24",
        "temperature=0",
        "max_requests=1",
        "concurrency=1",
        "num_prompt_instructions=2",
    ]
    assert main(args) == 1  # a random tiny model writes no usable task: the run stops short, and says so
    stats = json.loads((tmp_path / "si.stats.json").read_text())
    assert stats["requests"] == 1 and stats["accepted"] == 0 and sum(stats["rejected"].values()) >= 1
    rejected = [json.loads(line) for line in (tmp_path / "si.rejected.jsonl").read_text().splitlines()]
    assert rejected and (rejected[0].get("raw") or rejected[0].get("instruction"))  # the model's reply was recorded
    assert json.loads(out.read_text()) == []
