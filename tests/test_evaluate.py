"""Stage evaluate: formats, scorers vs lm-eval's own code, the sandbox, the engine vs direct forwards,
the artifact, compare and the training callback. (lm-eval parity on real benchmarks: test_evaluate_parity.py.)"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared

from minima.core.errors import DataError, InputError
from minima.evaluate import metrics as M
from minima.evaluate.tasks import get_task, load_task
from minima.evaluate.tasks.drop import drop_metrics, drop_score
from minima.evaluate.tasks.gsm8k import IGNORE as GSM8K_IGNORE
from minima.evaluate.tasks.gsm8k import extract as gsm8k_extract

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random Llama; the wide init (std 0.5) spreads its predictions over the choices."""
    from minima.testing import tiny_llama

    torch.set_num_threads(1)
    return tiny_llama(len(tok), seed=0, initializer_range=0.5, **TINY)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows) -> Path:
    return _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ------------------------------------------------------------------------------ formats
def test_every_format_of_a_benchmark_gives_the_same_items(tmp_path):
    """Original, HF and llm-foundry layouts of the same questions parse to identical docs."""
    q = [
        ("What is 2+2?", ["3", "4", "5", "6"], 1),
        ("Sky colour, None of the above?", ["red", "blue", "None", "NA"], 3),
    ]
    # MMLU: hendrycks CSV (no header) vs C-Eval header vs CMMLU index column vs HF jsonl
    import csv

    def csv_file(path, header, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if header:
                w.writerow(header)
            for r in rows:
                w.writerow(r)
        return path

    variants = {
        "mmlu-csv": csv_file(tmp_path / "a/val/astronomy_val.csv", None, [[t, *c, "ABCD"[g]] for t, c, g in q]),
        "ceval-csv": csv_file(
            tmp_path / "b/val/astronomy_val.csv",
            ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
            [[i, t, *c, "ABCD"[g], "why"] for i, (t, c, g) in enumerate(q)],
        ),
        "cmmlu-csv": csv_file(
            tmp_path / "c/test/astronomy.csv",
            ["", "Question", "A", "B", "C", "D", "Answer"],
            [[i, t, *c, "ABCD"[g]] for i, (t, c, g) in enumerate(q)],
        ),
        "hf": _jsonl(
            tmp_path / "d/test.jsonl",
            [{"question": t, "choices": c, "answer": g, "subject": "astronomy"} for t, c, g in q],
        ),
    }
    mmlu = get_task("mmlu")
    parsed = {}
    for fmt, f in variants.items():
        td = load_task(mmlu, f.parent.parent if fmt != "hf" else f.parent)
        assert td.format == fmt, fmt
        parsed[fmt] = [(d.query, d.choices, d.gold, d.subject) for d in td.eval["astronomy"]]
    assert len({json.dumps(v) for v in parsed.values()}) == 1, parsed
    assert parsed["hf"][1][0].endswith("D. NA\nAnswer:") and parsed["hf"][1][2] == 3  # 'None'/'NA' stay text

    # ARC: llm-foundry vs AI2 original (labels 1-4 and A-D) vs HF
    arc = get_task("arc_easy")
    rows = {
        "llmfoundry": [{"query": f"Question: {t}", "choices": c, "gold": g} for t, c, g in q],
        "original": [
            {
                "id": str(i),
                "question": {
                    "stem": t,
                    "choices": [{"text": x, "label": str(j + 1) if i else "ABCD"[j]} for j, x in enumerate(c)],
                },
                "answerKey": str(g + 1) if i else "ABCD"[g],
            }
            for i, (t, c, g) in enumerate(q)
        ],
        "hf": [
            {"id": "x", "question": t, "choices": {"text": c, "label": list("ABCD")}, "answerKey": "ABCD"[g]}
            for t, c, g in q
        ],
    }
    got = []
    for fmt, rs in rows.items():
        td = load_task(arc, _jsonl(tmp_path / f"arc_{fmt}" / "ARC-Easy-Test.jsonl", rs))
        assert td.format == fmt
        got.append([(d.query, d.choices, d.gold) for d in td.eval[""]])
    assert got[0] == got[1] == got[2] and got[0][0][0] == "Question: What is 2+2?\nAnswer:"

    # Winogrande: llm-foundry vs original
    wg = get_task("winogrande")
    a = load_task(
        wg,
        _jsonl(
            tmp_path / "wg1.jsonl",
            [{"context_options": ["Ann gave Bo", "Ann gave Cy"], "continuation": "a book.", "gold": 1}],
        ),
    )
    b = load_task(
        wg,
        _jsonl(
            tmp_path / "wg2.jsonl",
            [{"sentence": "Ann gave _ a book.", "option1": "Bo", "option2": "Cy", "answer": "2"}],
        ),
    )
    da, db = a.eval[""][0], b.eval[""][0]
    assert (
        (da.choices, da.target, da.gold)
        == (db.choices, db.target, db.gold)
        == (["Ann gave Bo", "Ann gave Cy"], "a book.", 1)
    )


def test_hellaswag_preprocessing_is_lm_evals():
    from lm_eval.tasks.hellaswag.utils import preprocess

    f = shared("eval/hellaswag/hellaswag_val_500.jsonl")
    td = load_task(get_task("hellaswag"), f)
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    assert td.eval_split == "val" and len(td.eval[""]) == 500
    for d, r in zip(td.eval[""], rows):
        assert d.query == preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        assert d.choices == [preprocess(e) for e in r["endings"]] and d.gold == int(r["label"])


def test_bad_rows_name_file_and_line(tmp_path):
    bad_csv = _write(tmp_path / "mmlu/val/law_val.csv", 'q1,a,b,c,d,A\nq2,a,b,c,D\n"q3,a,b,c,d,B\n')
    with pytest.raises(DataError) as e:
        load_task(get_task("mmlu"), tmp_path / "mmlu")
    assert f"{bad_csv}:2" in str(e.value) and "expected 6 columns" in str(e.value)

    bad_json = _write(
        tmp_path / "arc/test.jsonl", '{"query": "Question: a", "choices": ["x", "y"], "gold": 0}\n\n{"query": oops}\n'
    )
    with pytest.raises(DataError) as e:
        load_task(get_task("arc_easy"), bad_json)
    assert f"{bad_json}:3" in str(e.value)

    other = _jsonl(tmp_path / "wg/test.jsonl", [{"text": "hello"}])
    with pytest.raises(InputError) as e:
        load_task(get_task("winogrande"), other.parent)
    assert "context_options" in e.value.fix and "sentence" in e.value.fix  # names the formats it expected

    gold = _jsonl(tmp_path / "demo/test.jsonl", [{"question": "q", "choices": ["a", "b"], "gold": 5}])
    with pytest.raises(DataError, match=rf"{gold}:1.*out of range"):
        load_task(get_task("demo_mc"), gold)


def test_model_without_tokenizer_is_a_clear_error(tmp_path, tiny_model_dir):
    import shutil

    from minima.core.config import EvaluateConfig
    from minima.stages.evaluate import run

    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / f, d / f)
    with pytest.raises(InputError, match="has no tokenizer") as e:
        run(EvaluateConfig(model=str(d), tasks=["perplexity"], out_dir=str(tmp_path / "out")))
    assert "save_pretrained" in e.value.fix and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ scorers vs lm-eval
GOLD_NUMBERS = ["72", "1234.5", "-5", "13", "0", "1000", "5", "42", "7", "3500", "-2", "0.5"]
GENERATIONS = [
    "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72",
    "The total is $1,234.50 dollars.\n#### $1,234.50",
    "#### -5",
    "She has 3 apples, then 10 more: 13. The answer is 13.",
    "no digits at all",
    "#### 1,000\n\nQuestion: next",
    "Costs 5 dollars each so 5 x 3 = 15 and 20 - 15 = 5.",
    "#### 42.",
    "answer #### 7 and later #### 8",
    "It is 3.5 km, i.e. 3,500 m",
    "x = -2.",
    "#### .5",
]


def test_gsm8k_extraction_and_scoring_match_lm_eval():
    import lm_eval
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    cfg_text = (Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text()
    cfg = yaml.safe_load(cfg_text)
    filters = {f["name"]: f["filter"][0] for f in cfg["filter_list"]}
    metric = cfg["metric_list"][0]
    # gsm8k-style gold answers (worked solution, then "#### number"): the test needs no data files
    golds = [{"answer": f"She computes <<{v}={v}>>{v} in total.\n#### {v}"} for v in GOLD_NUMBERS]
    for gen, gold in zip(GENERATIONS, golds):
        mine = gsm8k_extract(gen)
        for name, f in filters.items():
            ref = RegexFilter(regex_pattern=f["regex_pattern"], group_select=f.get("group_select", 0)).apply(
                [[gen]], [None]
            )
            ref = list(ref)[0][0]
            assert mine[name] == ref, (gen, name)
            for target in (gold["answer"], f"... #### {ref}"):  # a real gold answer, and one this extraction matches
                want = exact_match_hf_evaluate(
                    [ref],
                    [target],
                    regexes_to_ignore=metric["regexes_to_ignore"],
                    ignore_case=metric["ignore_case"],
                    ignore_punctuation=metric["ignore_punctuation"],
                )
                assert M.exact_match(mine[name], target, GSM8K_IGNORE, ignore_case=True) == want["exact_match"]
    assert gsm8k_extract(GENERATIONS[1]) == {
        "strict-match": "[invalid]",
        "flexible-extract": "$1,234.50",
    }  # no $ in strict
    assert gsm8k_extract(GENERATIONS[4])["strict-match"] == "[invalid]"


DROP_CASES = [
    ("4", [("4",)]),
    ("four", [("4",)]),
    ("The Eagles", [("Eagles",)]),
    ("Eagles and Bears", [("Eagles", "Bears")]),
    ("1997", [("12 May 1997",)]),
    ("26-yard", [("26",), ("26-yard",)]),
    ("Bears", [("Eagles", "Bears")]),
    ("3.0 touchdowns", [("3",)]),
    ("", [("5",)]),
    ("Tom Brady threw", [("Brady",), ("Tom Brady",)]),
]


def test_drop_f1_and_em_match_lm_eval():
    from lm_eval.tasks.drop.utils import get_metrics, process_results

    for pred, golds in DROP_CASES:
        for g in golds:
            assert drop_metrics([pred], g) == get_metrics([pred], g), (pred, g)
        assert drop_score(pred, golds) == process_results({"answers": golds}, [pred]), pred


def test_pass_at_k_is_the_unbiased_estimator():
    from math import comb

    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 10), (5, 5, 2), (100, 17, 10)]:
        assert M.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_stderr_and_group_aggregation_match_lm_eval():
    from lm_eval.api.metrics import mean_stderr, pooled_sample_stderr

    a, b = [1, 0, 0, 1, 1], [0, 0, 1, 0, 0, 0, 1, 1]
    assert M.stderr(a) == pytest.approx(mean_stderr(a))
    assert M.pooled_stderr([M.stderr(a), M.stderr(b)], [5, 8]) == pytest.approx(
        pooled_sample_stderr([M.stderr(a), M.stderr(b)], [5, 8])
    )


# ------------------------------------------------------------------------------ sandbox
HE_PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
HE_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def _isolations():
    from minima.evaluate.sandbox import namespaces_available

    return ["python"] + (["namespace"] if namespaces_available() else [])


@pytest.mark.parametrize("isolation", _isolations())
def test_humaneval_sandbox(tmp_path, isolation):
    """A correct solution passes; wrong, looping, allocating and escaping code fails, and nothing leaks out."""
    from minima.evaluate.sandbox import run_program
    from minima.evaluate.tasks.humaneval import humaneval_program

    victim = tmp_path / "outside"
    victim.mkdir()
    completions = {
        "correct": "    return a + b\n",
        "wrong": "    return a - b\n",
        "loop": "    while True:\n        pass\n",
        "alloc": "    x = []\n    while True:\n        x.append(bytearray(10**7))\n",
        "open": f"    open({str(victim / 'a')!r}, 'w').write('x')\n    return a + b\n",
        "system": f"    import os\n    os.system('touch {victim / 'b'}')\n    return a + b\n",
        "subprocess": f"    import subprocess\n    subprocess.run(['touch', {str(victim / 'c')!r}])\n"
        "    return a + b\n",
        "ctypes": f"    import ctypes\n    ctypes.CDLL(None).creat({str(victim / 'd').encode()!r}, 0o644)\n"
        "    return a + b\n",
        "rename": f"    import os\n    open('t', 'w').write('x')\n    os.replace('t', {str(victim / 'e')!r})\n"
        "    return a + b\n",
        "chdir": f"    import os\n    os.chdir({str(victim)!r})\n    open('f', 'w').write('x')\n    return a + b\n",
        "socket": "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    return a + b\n",
        "inside": "    open('scratch.txt', 'w').write('ok')\n    return a + b\n",  # its own temp dir is writable
    }
    # generous wall time except for the loop (a shared CI box can be slow); the memory cap is what stops "alloc"
    results = {
        k: run_program(
            humaneval_program(HE_PROMPT, c, HE_TEST, "add"),
            timeout_s=2 if k == "loop" else 20,
            memory_mb=256,
            isolation=isolation,
        )
        for k, c in completions.items()
    }
    status = {k: r.status for k, r in results.items()}
    assert status["correct"] == "passed" and status["inside"] == "passed", results
    assert status["loop"] == "timeout" and "MemoryError" in results["alloc"].detail, results
    for k in completions:
        if k not in ("correct", "inside"):
            assert not results[k].passed, (k, results[k])
    assert list(victim.iterdir()) == []
    assert {r.isolation for r in results.values()} == {isolation}


def test_sandbox_namespace_layer_alone_blocks_writes_and_network(tmp_path):
    from minima.evaluate.sandbox import namespaces_available, run_program

    if not namespaces_available():
        pytest.skip("bubblewrap cannot create namespaces on this machine")
    target = tmp_path / "x"  # the host's /tmp is not in the sandbox at all
    w = run_program(f"open({str(target)!r}, 'w').write('x')", timeout_s=5, isolation="namespace", audit_hook=False)
    assert not w.passed and "No such file or directory" in w.detail and not target.exists()
    r = run_program("open('/x', 'w').write('x')", timeout_s=5, isolation="namespace", audit_hook=False)
    assert not r.passed and "Read-only file system" in r.detail
    n = run_program(
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)",
        timeout_s=5,
        isolation="namespace",
        audit_hook=False,
    )
    assert not n.passed and "unreachable" in n.detail.lower()


# ------------------------------------------------------------------------------ the engine
def _direct_ll(model, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    pos = range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    return sum(lp[p, t].item() for p, t in zip(pos, cont_ids))


def test_shared_context_kv_cache_and_prefix_match_direct_forwards(model, tok):
    """The cached/prefix-shared path gives each request's loglikelihood of an unpadded forward."""
    from minima.evaluate.lm import LM

    shots = (
        "Question: Which city is the capital of France?\nAnswer: Paris\n\n"
        "Question: What colour is the sky?\nAnswer: blue\n\n"
    )
    reqs = []
    for q, choices in [
        ("What colour is grass?", ["green", "red and yellow", "blue"]),
        ("Capital of Japan?", ["Tokyo", "Kyoto city"]),
        ("What colour is snow on a mountain in winter?", ["white", "black", "grey"]),
    ]:
        reqs += [(shots + f"Question: {q}\nAnswer:", " " + c) for c in choices]
    reqs += [("", "hello world"), ("The cat ", "sat on the mat")]  # empty context, trailing space
    lm = LM(model, tok, batch_size=3)
    got = lm.loglikelihood(reqs)
    calls = lm.forward_calls
    for (ctx, cont), (ll, _) in zip(reqs, got):
        c, k = lm.encode_pair(ctx, cont)
        assert ll == pytest.approx(_direct_ll(model, c, k), abs=2e-4)
    plain = LM(model, tok, batch_size=3)
    plain.cache_ok = False  # lm-eval's one-sequence-per-request scheme
    assert [g for _, g in plain.loglikelihood(reqs)] == [g for _, g in got]
    assert calls < 2 * math.ceil(len(reqs) / 3)


def test_truncation_keeps_the_last_max_length_tokens(model, tok):
    from minima.evaluate.lm import LM

    lm = LM(model, tok, batch_size=2, max_length=24)
    ctx, cont = "one two three four five six seven eight nine ten " * 3 + "Answer:", " eleven twelve"
    c, k = lm.encode_pair(ctx, cont)
    assert len(c) + len(k) > 25
    ((ll, _),) = lm.loglikelihood([(ctx, cont)])
    kept = (c + k)[-25:]
    assert ll == pytest.approx(_direct_ll(model, kept[: -len(k)], k), abs=2e-4)


def test_letter_mode_and_perplexity_match_hand_computation(model, tok):
    from minima.evaluate.lm import LM

    lm = LM(model, tok, batch_size=2)
    ctxs = [
        "Q: 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:",
        "Q: colour of snow?\nA. red\nB. white\nC. blue\nD. black\nAnswer:",
        "x",
    ]
    ids = [tok.encode(x, add_special_tokens=False)[-1] for x in "ABCD"]
    got = lm.next_token_logprobs(ctxs, ids)
    for c, lp in zip(ctxs, got):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([tok.encode(c)])).logits[0, -1].float(), -1)[ids]
        assert lp == pytest.approx(ref.tolist(), abs=1e-4)

    text = " ".join(f"The sky is blue and the grass is green number {i}." for i in range(30))
    toks = lm.tok_encode(text)
    for window, stride in [(64, 63), (64, 16), (50, 37)]:
        nll, n = lm.rolling_nll(toks, window=window, stride=stride)
        # Hugging Face's perplexity recipe, one window at a time, labels masked to the tokens not yet scored
        ref, prev_end, count = 0.0, 0, 0
        for begin in range(0, len(toks), stride):
            end = min(begin + window, len(toks))
            trg = end - max(prev_end, begin + 1)
            ids_ = torch.tensor([toks[begin:end]])
            labels = ids_.clone()
            labels[:, : ids_.shape[1] - trg] = -100
            with torch.no_grad():
                loss = model(ids_, labels=labels).loss  # mean over the trg unmasked (shifted) labels
            ref += loss.item() * trg
            count += trg
            prev_end = end
            if end == len(toks):
                break
        assert n == count == len(toks) - 1 and nll == pytest.approx(ref, rel=1e-4)
    assert lm.rolling_nll(toks, window=64, stride=64) == lm.rolling_nll(toks, window=64, stride=63)  # capped


# ------------------------------------------------------------------------------ generation tasks, end to end
def test_generation_tasks_score_canned_generations(tmp_path, model, tok, monkeypatch):
    """gsm8k/bbh/drop/humaneval: loading, prompts, extraction and scoring, with the model's output fixed."""
    from minima.evaluate import core
    from minima.evaluate.lm import LM

    he = _jsonl(
        tmp_path / "humaneval/HumanEval.jsonl",
        [
            {"task_id": "t/0", "prompt": HE_PROMPT, "test": HE_TEST, "entry_point": "add"},
            {
                "task_id": "t/1",
                "prompt": 'def neg(x):\n    """-x"""\n',
                "test": "def check(f):\n    assert f(3) == -3\n",
                "entry_point": "neg",
            },
        ],
    )
    bbh = _write(
        tmp_path / "bbh/boolean_expressions.json",
        json.dumps(
            {
                "examples": [
                    {"input": "True and False is", "target": "False"},
                    {"input": "not False is", "target": "True"},
                    {"input": "True or False is", "target": "True"},
                    {"input": "not True is", "target": "False"},
                ]
            }
        ),
    )
    drop = _jsonl(
        tmp_path / "drop/validation.jsonl",
        [
            {
                "passage": "The Eagles scored 4 touchdowns.",
                "question": "How many touchdowns?",
                "query_id": "q1",
                "answer": {"number": "4", "date": {"day": "", "month": "", "year": ""}, "spans": []},
                "validated_answers": {"number": [], "date": [], "spans": []},
            },
            {
                "passage": "Brady threw to Moss.",
                "question": "Who threw?",
                "query_id": "q2",
                "answer": {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["Brady"]},
                "validated_answers": {
                    "number": [""],
                    "date": [{"day": "", "month": "", "year": ""}],
                    "spans": [["Tom Brady"]],
                },
            },
        ],
    )
    gsm = shared("eval/gsm8k")
    canned = {
        "add": "    return a + b\n",
        "neg": "    return x\n",
        "True and": "False",
        "not False": " True",
        "True or": "yes",
        "not True": "False",
        "Eagles": " 4",
        "Brady threw": " Brady",
    }
    seen = []

    def fake_generate(self, contexts, until, **kw):
        seen.append((contexts, until))
        out = []
        for c in contexts:
            if "Question:" in until:  # gsm8k
                out.append(["The answer is 5.\n#### 5"])
                continue
            last = c.rsplit("\n\n", 1)[-1]
            hit = [v for k, v in canned.items() if k in last]
            out.append([hit[0] if hit else "The answer is 5.\n#### 5"])
        return out

    monkeypatch.setattr(LM, "generate_until", fake_generate)
    samples = []
    res = core.evaluate_model(
        model,
        tok,
        {
            "humaneval": {"path": str(he.parent)},
            "bbh": {"path": str(bbh.parent), "shots": 1},
            "drop": {"path": str(drop.parent), "shots": 1},
            "gsm8k": {"path": str(gsm), "limit": 4, "shots": 2},
        },
        samples=samples,
    )
    assert res["humaneval"]["pass@1"] == 0.5
    assert res["bbh"]["exact_match"] == pytest.approx(2 / 3) and res["bbh"]["info"]["n"] == 3  # first item is the shot
    assert res["drop"]["em"] == 1.0 and res["drop"]["f1"] == 1.0
    golds = [s["gold"] for s in samples if s["task"] == "gsm8k"]
    assert res["gsm8k"]["exact_match_strict"] == sum(g == "5" for g in golds) / 4
    gsm_ctx = seen[-1][0][0]
    assert (
        gsm_ctx.count("Question:") == 3 and gsm_ctx.endswith("\nAnswer:") and "####" in gsm_ctx
    )  # 2 worked shots + question
    assert seen[0][1] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


# ------------------------------------------------------------------------------ stage, report, compare, CLI
def test_run_writes_results_samples_report_and_compare(tmp_path, tiny_model_dir, demo_data_dir, capsys):
    from minima.cli import main
    from minima.core.config import EvaluateConfig
    from minima.stages.evaluate import run

    tasks = {
        "demo_mc": {"path": str(demo_data_dir / "eval/demo_mc"), "shots": 1},
        "perplexity": {"path": str(demo_data_dir / "text"), "limit": 20},
    }
    cfg = EvaluateConfig(
        models={"a": str(tiny_model_dir), "b": str(tiny_model_dir)},
        tasks=tasks,
        batch_size=8,
        out_dir=str(tmp_path / "ev"),
    )
    art = run(cfg)
    res = json.loads((art.path / "results.json").read_text())
    a, b = res["models"]["a"]["tasks"], res["models"]["b"]["tasks"]
    n = len((demo_data_dir / "eval/demo_mc/test.jsonl").read_text().splitlines())
    assert a["demo_mc"]["acc"] == b["demo_mc"]["acc"] and a["demo_mc"]["info"]["n"] == n
    samples = [json.loads(x) for x in (art.path / "samples.jsonl").read_text().splitlines()]
    mc = [s for s in samples if s["model"] == "a" and s["task"] == "demo_mc"]
    assert a["demo_mc"]["acc"] == pytest.approx(sum(s["pred"] == s["gold"] for s in mc) / len(mc))
    assert a["demo_mc"]["acc_stderr"] == pytest.approx(M.stderr([s["acc"] for s in mc]))
    assert (
        1
        < a["perplexity"]["token_perplexity"]
        < 10 * len(json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"])
    )
    report = (art.path / "report.md").read_text()
    assert f"| demo_mc | acc | loglikelihood | 1 | {n} |" in report and "| a | b |" in report
    assert art.metrics["a/demo_mc/acc"] == a["demo_mc"]["acc"]
    assert run(cfg).skipped  # same config and inputs: cached

    single = run(
        EvaluateConfig(
            model=str(tiny_model_dir),
            tasks=["demo_mc"],
            data_dir=str(demo_data_dir / "eval"),
            shots=0,
            out_dir=str(tmp_path / "ev0"),
        )
    )
    capsys.readouterr()
    assert main(["evaluate", "compare", str(art.path), str(single.path)]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | A:a | A:b | B |" in out and "| demo_mc | acc |" in out


def test_category_averages(tmp_path, model, tok):
    """MMLU categories weight subjects by questions; C-Eval/CMMLU average subjects (their official rule)."""
    from minima.evaluate import evaluate_model

    root = shared("eval")
    subs = ["logic", "law", "college_physics"]
    r = evaluate_model(
        model,
        tok,
        {
            "ceval": {"subjects": subs, "limit": 3, "shots": 0},
            "mmlu": {"subjects": ["anatomy", "astronomy", "virology"], "shots": 0},
        },
        data_dir=root,
        limit=6,
    )
    c = r["ceval"]
    assert c["categories"]["Humanities"]["acc"] == pytest.approx(
        (c["subjects"]["logic"]["acc"] + c["subjects"]["law"]["acc"]) / 2
    )
    assert c["categories"]["STEM"]["acc"] == c["subjects"]["college_physics"]["acc"]
    m = r["mmlu"]
    s = m["subjects"]
    n = s["anatomy"]["n"] + s["astronomy"]["n"]
    assert m["categories"]["stem"]["acc"] == pytest.approx(
        (s["anatomy"]["acc"] * s["anatomy"]["n"] + s["astronomy"]["acc"] * s["astronomy"]["n"]) / n
    )
    assert m["categories"]["other"]["acc"] == s["virology"]["acc"]


def test_eval_callback_logs_scores_every_n_steps(tmp_path, model, tok, demo_data_dir, tiny_tokenizer_dir):
    from minima.evaluate import EvalCallback, evaluate_model

    tasks = {"demo_mc": {"path": str(demo_data_dir / "eval/demo_mc")}}
    cb = EvalCallback(tasks, shots=0, every_n_steps=2, limit=6, log_dir=str(tmp_path / "tb"))
    model.train()

    class Ctx:
        tokenizer = tok

    assert cb.on_eval(1, model, Ctx()) == {}
    out = cb.on_eval(2, model, Ctx())
    assert model.training  # restored
    model.eval()
    ref = evaluate_model(model, tok, tasks, shots=0, limit=6)
    assert out == {"eval/demo_mc/acc": ref["demo_mc"]["acc"], "eval/demo_mc/acc_norm": ref["demo_mc"]["acc_norm"]}
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())

    # as the engine calls it: the TrainContext has no tokenizer; the factory loads the starting model's
    from types import SimpleNamespace

    from minima.core.config import AdaptConfig
    from minima.evaluate import callback_factory

    cb2 = callback_factory(
        AdaptConfig(
            model=str(tiny_tokenizer_dir),
            eval_tasks=["demo_mc"],
            eval_shots=0,
            eval_limit=6,
            eval_data_dir=str(demo_data_dir / "eval"),
        )
    )
    assert cb2.on_eval(3, model, SimpleNamespace(rank=0)) == out
    assert callback_factory(AdaptConfig()).on_eval(3, model, None) == {}  # no eval_tasks: a no-op


@pytest.mark.slow
def test_torchrun_splits_requests_and_matches_one_process(tmp_path, tiny_model_dir, demo_data_dir):
    """Two ranks (gloo on CPU) each score half of the requests; the artifact equals a one-process run."""
    import subprocess

    from minima.core.config import EvaluateConfig
    from minima.stages.evaluate import run

    tasks = [
        "tasks.demo_mc.path=" + str(demo_data_dir / "eval/demo_mc"),
        "tasks.demo_mc.limit=20",
        "tasks.perplexity.path=" + str(demo_data_dir / "text"),
        "tasks.perplexity.limit=10",
        "tasks.perplexity.max_length=64",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_NO_PROGRESS="1", MASTER_ADDR="127.0.0.1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29561",
            "-m",
            "minima.cli",
            "evaluate",
            f"model={tiny_model_dir}",
            "batch_size=4",
            f"out_dir={tmp_path / 'two'}",
            *tasks,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[rank 0]" in out.stderr  # the stage really ran as two ranks
    one = run(
        EvaluateConfig.model_validate(
            {
                "model": str(tiny_model_dir),
                "batch_size": 4,
                "out_dir": str(tmp_path / "one"),
                "tasks": {
                    "demo_mc": {"path": str(demo_data_dir / "eval/demo_mc"), "limit": 20},
                    "perplexity": {"path": str(demo_data_dir / "text"), "limit": 10, "max_length": 64},
                },
            }
        )
    )
    r1 = json.loads((one.path / "results.json").read_text())["models"]["tiny"]["tasks"]
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())["models"]["tiny"]["tasks"]
    assert (r1["demo_mc"]["acc"], r1["demo_mc"]["acc_norm"]) == (r2["demo_mc"]["acc"], r2["demo_mc"]["acc_norm"])
    assert r2["perplexity"]["info"]["tokens"] == r1["perplexity"]["info"]["tokens"]
    assert r2["perplexity"]["token_perplexity"] == pytest.approx(r1["perplexity"]["token_perplexity"], rel=1e-5)
    s1 = [json.loads(x) for x in (one.path / "samples.jsonl").read_text().splitlines() if '"demo_mc"' in x]
    s2 = [json.loads(x) for x in (tmp_path / "two" / "samples.jsonl").read_text().splitlines() if '"demo_mc"' in x]
    assert [s["pred"] for s in s1] == [s["pred"] for s in s2]


def test_chat_template_wraps_prompts(model, tok, demo_data_dir, monkeypatch, tmp_path):
    """chat_template=true: one user turn with the generation prompt, continuations without the leading space
    (demo_mc: the question is the user turn and the answer's stem starts the reply)."""
    import copy

    from minima.evaluate import evaluate_model
    from minima.evaluate.lm import LM

    arc = _jsonl(
        tmp_path / "arc/test.jsonl",
        [{"query": f"Question: q{i}?", "choices": ["a", "b", "c"], "gold": i % 3} for i in range(3)],
    )
    tasks = {"arc_easy": {"path": str(arc), "limit": 2, "shots": 1}}
    with pytest.raises(InputError, match="no chat template"):
        evaluate_model(model, tok, tasks, chat_template=True)
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"
    seen = []
    real = LM.loglikelihood
    monkeypatch.setattr(LM, "loglikelihood", lambda self, reqs, progress=None: seen.extend(reqs) or real(self, reqs))
    evaluate_model(model, chat_tok, tasks, chat_template=True)
    ctx, cont = seen[0]
    assert ctx.startswith("<|user|>Question: ") and ctx.count("Question:") == 2
    assert ctx.endswith("\nAnswer:<|end|><|assistant|>")
    assert not cont.startswith(" ")
    seen.clear()
    mc = {"demo_mc": {"path": str(demo_data_dir / "eval/demo_mc"), "limit": 1}}
    evaluate_model(model, chat_tok, mc, chat_template=True)
    first = json.loads((demo_data_dir / "eval/demo_mc/test.jsonl").read_text().splitlines()[0])
    ctx, cont = seen[0]
    assert ctx == f"<|user|>{first['question']}<|end|><|assistant|> {first['prefix']}"
    assert cont == f" {first['choices'][0]}"


def test_perplexity_builds_one_row_of_logits_at_a_time(model, tok):
    """rolling_nll never materialises [batch, window, vocab] logits (nor their fp32 log-softmax): the head
    runs on one window's scored rows at a time; the value is checked against HF in the test above."""
    from minima.evaluate.lm import LM

    lm = LM(model, tok, batch_size=4)
    assert lm.split_head
    shapes = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        text = " ".join(f"The sky is blue and the grass is green number {i}." for i in range(30))
        lm.rolling_nll(lm.tok_encode(text), window=48, stride=24)
    finally:
        hook.remove()
    assert shapes and all(len(s) == 2 and s[0] <= 48 for s in shapes), shapes


def test_sharded_models_split_requests_in_lock_step_and_generate_in_sync(model, tok, monkeypatch):
    """Under ZeRO-3 / FSDP every forward is collective: the requests are split over the ranks, which then call
    the model in lock step, and generation passes synced_gpus (a rank that finishes first keeps stepping).
    Without distributed=True every rank runs every request. (The 2-rank runs: test_evaluate_sharded.py.)"""
    from minima.evaluate import lm as lm_mod

    monkeypatch.setattr(lm_mod, "dist_info", lambda: (1, 2))
    replicated = lm_mod.LM(model, tok, batch_size=2, distributed=True)
    assert (replicated.rank, replicated.world, replicated.synced_gpus, replicated.lockstep) == (1, 2, False, False)
    p = next(model.parameters())
    monkeypatch.setattr(p, "ds_id", 0, raising=False)  # what a ZeRO-3 partitioned parameter carries
    sharded = lm_mod.LM(model, tok, batch_size=2, distributed=True)
    assert (sharded.rank, sharded.world, sharded.synced_gpus, sharded.lockstep) == (1, 2, True, True)
    alone = lm_mod.LM(model, tok, batch_size=2)
    assert (alone.rank, alone.world, alone.synced_gpus, alone.lockstep) == (0, 1, True, False)
    seen = {}
    real = model.generate

    def spy(**kw):
        seen.update(kw)
        kw.pop("synced_gpus", None)  # no process group here
        return real(**kw)

    monkeypatch.setattr(model, "generate", spy)
    out = alone.generate_until(["The sky is", "Grass is"], until=["\n"], max_new_tokens=3)
    assert len(out) == 2 and seen.get("synced_gpus") is True
    monkeypatch.delattr(p, "ds_id")


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_padding_calls_leave_the_results_unchanged(family, model, tok):
    """A rank that other ranks outpace at a step pads every call kind it lacks and runs extra steps of padding
    only; its own results stay those of an unpadded run (one process, the agreement faked)."""
    from minima.evaluate.lm import LM
    from minima.testing import tiny_family_model

    net = model if family == "llama" else tiny_family_model("t5", len(tok), seed=0).eval()
    shot = "Question: what colour is the sky?\nAnswer: blue\n\nQuestion: what colour is grass?\nAnswer: green\n\n"
    reqs = [(shot + f"Question: q{i}?\nAnswer:", c) for i in range(3) for c in (" yes", " no way")]
    reqs += [("The sky is", " blue"), ("Grass", " is green")]
    ctxs = ["The sky is", "Grass is", shot, "One"]
    texts = [list(range(5, 45)), list(range(7, 19))]

    def run(lm):
        out = [lm.loglikelihood(reqs), lm.next_token_logprobs(ctxs, [5, 6, 7])]
        if family == "llama":
            out.append(lm.rolling_nll_many(texts, window=16, stride=8))
        return out

    ref = run(LM(net, tok, batch_size=2))
    padded = LM(net, tok, batch_size=2)
    padded.lockstep, expected = True, []

    def agree(plans, n, kinds):  # the other ranks: every kind at least once per step, and one step more
        needs = [[max(x, 1) for x in p] for p in plans] + [[1] * kinds]
        expected.append(sum(a - b for need, p in zip(needs, plans) for a, b in zip(need, p)) + kinds)
        return needs

    padded._agree = agree
    got = run(padded)
    assert padded.pad_calls == sum(expected) and padded.pad_calls > 3
    for a, b in zip(ref, got):
        assert a == b


def test_training_callback_splits_requests_over_ranks(monkeypatch):
    from minima.evaluate import callback

    seen = {}
    monkeypatch.setattr(callback, "evaluate_model", lambda *a, **kw: seen.update(kw) or {"t": {"acc": 1.0}})
    got = callback.EvalCallback(["t"], tokenizer=object()).on_eval(1, torch.nn.Linear(1, 1), None)
    assert got == {"eval/t/acc": 1.0} and seen["distributed"] is True
