"""Generation-based evaluation on a real tiny model: the batched, left-padded ``generate_until`` behind
gsm8k, bbh, drop and humaneval gives, context by context, what Hugging Face greedy ``generate`` gives on
that context alone with the output cut before the task's stop strings; humaneval's pass@k is what
running the reference completions' programs gives."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
MAX_NEW = 24

# An item that passes whatever the completion is (the completion lands inside a raw string that the test
# closes), and one that fails whatever it is: pass@1 is 1/2 unless a completion breaks the string.
HE_ITEMS = [
    {
        "task_id": "t/0",
        "prompt": 'def add(a, b):\n    return a + b\n\n\nNOTE = r"""',
        "test": '"""\n\n\ndef check(f):\n    assert f(2, 3) == 5\n',
        "entry_point": "add",
    },
    {
        "task_id": "t/1",
        "prompt": 'def neg(x):\n    return x\n\n\nNOTE = r"""',
        "test": '"""\n\n\ndef check(f):\n    assert f(3) == -3\n',
        "entry_point": "neg",
    },
]
BBH = [
    {"input": "True and False is", "target": "False"},
    {"input": "not False is", "target": "True"},
    {"input": "True or False is", "target": "True"},
]
DROP = [
    {
        "passage": "The Eagles scored 4 touchdowns in the first half and 2 in the second.",
        "question": "How many touchdowns did the Eagles score?",
        "query_id": "q1",
        "answer": {"number": "6", "date": {"day": "", "month": "", "year": ""}, "spans": []},
        "validated_answers": {"number": [], "date": [], "spans": []},
    },
    {
        "passage": "Brady threw to Moss for the winning score.",
        "question": "Who threw?",
        "query_id": "q2",
        "answer": {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["Brady"]},
        "validated_answers": {"number": [], "date": [], "spans": []},
    },
    {
        "passage": "The river is 40 miles long and flows north.",
        "question": "Which way does the river flow?",
        "query_id": "q3",
        "answer": {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["north"]},
        "validated_answers": {"number": [], "date": [], "spans": []},
    },
]


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def model(tok):
    """A random tiny Llama whose head favours '.', 'Q' and newline, so the stop strings of drop and bbh occur."""
    from minima.testing import tiny_llama

    torch.set_num_threads(1)
    m = tiny_llama(len(tok), seed=1, initializer_range=0.2, **SHAPE)
    favour = {tok.encode(t, add_special_tokens=False)[-1] for t in (" .", " Q", "\n")}
    with torch.no_grad():
        for t in favour:
            m.lm_head.weight[t] *= 3.0
    return m


def hf_reference(model, tok, ids: list[int], until: list[str], max_new: int) -> str:
    """HF greedy generate on one unpadded context, decoded, cut before EOS and then before each stop string."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id
        )
    new = out[0, len(ids) :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    text = tok.decode(new, skip_special_tokens=True)
    for stop in until:  # lm-eval's rule: split at each stop string in turn, keep the head
        if stop:
            text = text.split(stop)[0]
    return text


def test_generate_until_tasks_equal_hf_greedy(tmp_path, model, tok, monkeypatch):
    from minima.evaluate import core, sandbox
    from minima.evaluate.lm import LM

    gsm = shared("eval/gsm8k")
    he = _jsonl(tmp_path / "humaneval/HumanEval.jsonl", HE_ITEMS)
    bbh = tmp_path / "bbh/boolean_expressions.json"
    bbh.parent.mkdir(parents=True)
    bbh.write_text(json.dumps({"examples": BBH}))
    drop = _jsonl(tmp_path / "drop/validation.jsonl", DROP)

    calls = []  # (contexts, until, generations) of every generate_until call, as the tasks made them
    real = LM.generate_until

    def spy(self, contexts, until, **kw):
        out = real(self, contexts, until, **kw)
        calls.append((list(contexts), list(until), kw, out, self))
        return out

    monkeypatch.setattr(LM, "generate_until", spy)
    samples: list = []
    unsafe = contextlib.nullcontext() if sandbox.namespaces_available() else sandbox.allowing_unsafe_code()
    if not sandbox.namespaces_available():
        print(f"WARNING: humaneval runs without namespace isolation: {sandbox.namespace_status()[1]}")
    with unsafe:
        res = core.evaluate_model(
            model,
            tok,
            {
                "gsm8k": {"path": str(gsm), "limit": 3, "shots": 1},
                "bbh": {"path": str(bbh.parent), "shots": 1},
                "drop": {"path": str(drop.parent), "shots": 1},
                "humaneval": {"path": str(he.parent)},
            },
            batch_size=2,  # several batches, each left-padded to its longest context
            max_new_tokens=MAX_NEW,
            samples=samples,
        )
    assert len(calls) == 4
    n_ctx, n_cut = 0, 0
    for contexts, until, kw, got, lm in calls:
        assert kw["max_new_tokens"] == MAX_NEW and not kw.get("do_sample")
        keep = lm.max_length - MAX_NEW
        for ctx, out in zip(contexts, got):
            ids = lm.tok_encode(ctx)[-keep:]
            want = hf_reference(model, tok, ids, until, MAX_NEW)
            assert out == [want], (ctx[-80:], until)
            n_ctx += 1
            n_cut += want != hf_reference(model, tok, ids, [], MAX_NEW)
    assert n_ctx == 3 + 2 + 3 + 2  # gsm8k limit 3; bbh's first item is its shot; drop's shot is another split
    print(f"{n_ctx} contexts equal HF greedy; {n_cut} of them cut at a stop string")
    assert n_cut >= 3  # the stop strings are exercised, not only max_new_tokens and EOS

    # humaneval's pass@1 is what running the programs of the reference completions gives (plain python)
    from minima.evaluate.tasks.humaneval import humaneval_program

    he_call = next(c for c in calls if "\ndef" in c[1])
    passed = []
    for item, ctx, out in zip(HE_ITEMS, he_call[0], he_call[3]):
        assert ctx == item["prompt"]
        prog = humaneval_program(item["prompt"], out[0], item["test"], item["entry_point"])
        passed.append(subprocess.run([sys.executable, "-c", prog], capture_output=True, timeout=30).returncode == 0)
    assert res["humaneval"]["pass@1"] == sum(passed) / len(passed)
    he_samples = [s for s in samples if s["task"] == "humaneval"]
    assert [s["completions"] for s in he_samples] == list(he_call[3])
    # the generations the tasks scored are the ones generated, item by item
    for task, call in zip(("gsm8k", "bbh", "drop"), calls):
        assert [s["generation"] for s in samples if s["task"] == task] == [out[0] for out in call[3]], task
