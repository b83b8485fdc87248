"""Parity with the task configs lm-eval ships: its own YAMLs for mmlu, ceval, cmmlu, arc, hellaswag, winogrande,
gsm8k and wikitext (rolling loglikelihood), loaded with lm-eval's YAML loader and pointed at the local files
in ../shared/data (``dataset_path``/``data_files`` overridden; no hub), then run by lm-eval's ``HFLM``.

Per item, the requests lm-eval builds from its templates (contexts and continuations, few-shot included) must
be exactly the requests minima's evaluate sends, and their loglikelihoods equal to float noise; gsm8k's
contexts must be minima's, and wikitext's per-document loglikelihood and word/byte perplexity must equal
minima's perplexity task on the same (detokenized) documents.

Where the local file is not in the layout the shipped YAML reads (ARC and Winogrande are llm-foundry JSONL,
MMLU is hendrycks CSV), a ``process_docs`` rebuilds the HF rows losslessly; the templates, targets, choices,
descriptions and few-shot settings stay lm-eval's.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import shared

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
LL_TOL = 1e-3  # batched (minima, KV-cache reuse) vs one sequence per request (lm-eval): float noise only


@pytest.fixture(scope="module")
def model_tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minima.testing import tiny_llama

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    return tiny_llama(len(tok), seed=0, initializer_range=0.5, **TINY), tok


def shipped(rel: str) -> dict:
    """The config lm-eval ships at ``lm_eval/tasks/<rel>``, its includes and ``!function``s resolved."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / rel
    if not path.is_file():
        pytest.skip(f"the installed lm-eval ships no {rel}")
    cfg = load_yaml(path, resolve_func=True)
    for k in ("tag", "group", "task_alias"):
        cfg.pop(k, None)
    return cfg


def local(rel: str, name: str, dataset_path: str, data_files: dict, **kw) -> dict:
    """The shipped config ``rel`` as task ``name``, reading ``data_files`` instead of the hub."""
    cfg = shipped(rel)
    kwargs = {"data_files": {k: str(v) for k, v in data_files.items()}}
    kwargs.update(kw.pop("dataset_kwargs", {}))
    cfg.update(task=name, dataset_path=dataset_path, dataset_name=None, dataset_kwargs=kwargs, **kw)
    return cfg


# ------------------------------------------------------------------------------ local layout -> HF rows
def _mmlu_rows(ds):
    """Hendrycks CSV columns (question, A-D, letter) -> cais/mmlu rows (question, choices, answer index)."""
    ds = ds.map(
        lambda d: {"choices": [d["A"], d["B"], d["C"], d["D"]], "index": "ABCD".index(d["answer"])},
        remove_columns=["A", "B", "C", "D", "answer"],
    )
    return ds.rename_column("index", "answer")  # a fresh int column (mapped onto 'answer' it stays a string)


def _arc_rows(ds):
    """llm-foundry ARC (query 'Question: ..', choices, gold) -> ai2_arc rows (question, choices, answerKey)."""

    def row(d):
        assert d["query"].startswith("Question: ")
        labels = list("ABCDE"[: len(d["choices"])])
        return {
            "question": d["query"][len("Question: ") :],
            "choices": {"text": d["choices"], "label": labels},
            "answerKey": labels[d["gold"]],
        }

    return ds.map(row, remove_columns=["query", "gold"])


def _winogrande_rows(ds):
    """llm-foundry Winogrande (the two contexts, the continuation, gold) -> winogrande rows (sentence with '_',
    option1, option2, answer): the shared prefix + '_' + the continuation, so lm-eval rebuilds both contexts."""
    import os

    def row(d):
        a, b = d["context_options"]
        prefix = os.path.commonprefix([a, b])
        return {
            "sentence": prefix + "_ " + d["continuation"],
            "option1": a[len(prefix) :],
            "option2": b[len(prefix) :],
            "answer": str(d["gold"] + 1),
        }

    return ds.map(row)


def _drop_column(src: Path, column: str, dst: Path) -> Path:
    import csv

    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(dst, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, [c for c in rows[0] if c != column])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k != column} for r in rows)
    return dst


# ------------------------------------------------------------------------------ the two runs
def run_lm_eval(model, tok, configs: list[dict], shots: dict, limit: dict, **hflm) -> dict:
    """lm-eval's simple_evaluate on inline configs; {task: [sample]} in doc_id order (the first filter's)."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, **hflm)
    tm = TaskManager(include_defaults=False)
    out = {}
    for cfg in configs:
        name = cfg["task"]
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[cfg],
            num_fewshot=shots.get(name),
            limit=limit.get(name),
            task_manager=tm,
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        first = res["samples"][name][0].get("filter")  # a sample per doc and filter (gsm8k has two)
        out[name] = {
            "samples": sorted((s for s in res["samples"][name] if s.get("filter") == first), key=lambda s: s["doc_id"]),
            "metrics": {k.split(",")[0]: v for k, v in res["results"][name].items() if "," in k},
        }
    return out


def _args(sample) -> list[tuple]:
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
        return [tuple(a[f"arg_{i}"] for i in range(len(a))) for a in args.values()]
    return [tuple(a) for a in args]


def run_minima(model, tok, tasks: dict, data_dir=None, max_length=None):
    """minima's evaluate with every request the tasks send (and its result) recorded."""
    from minima.evaluate import evaluate_model
    from minima.evaluate.lm import LM

    seen = {"loglikelihood": {}, "generate_until": [], "rolling": []}
    orig_ll, orig_gen, orig_roll = LM.loglikelihood, LM.generate_until, LM.rolling_nll_many

    def ll(self, requests, **kw):
        res = orig_ll(self, requests, **kw)
        for r, v in zip(requests, res):
            seen["loglikelihood"][tuple(r)] = v
        return res

    def gen(self, contexts, until, **kw):
        res = orig_gen(self, contexts, until, **kw)
        seen["generate_until"].append((list(contexts), list(until), res))
        return res

    def roll(self, docs, **kw):
        res = orig_roll(self, docs, **kw)
        seen["rolling"].extend(res)
        return res

    mp = pytest.MonkeyPatch()
    mp.setattr(LM, "loglikelihood", ll)
    mp.setattr(LM, "generate_until", gen)
    mp.setattr(LM, "rolling_nll_many", roll)
    try:
        scores = evaluate_model(
            model, tok, tasks, data_dir=data_dir, batch_size=8, max_new_tokens=8, max_length=max_length
        )
    finally:
        mp.undo()
    return scores, seen


def compare_requests(ref: dict, mine: dict, task: str, min_items: int) -> float:
    """Every (context, continuation) lm-eval asked for was asked by minima, with the same loglikelihood."""
    items = ref[task]["samples"]
    assert len(items) >= min_items, (task, len(items))
    worst, preds = 0.0, collections.Counter()
    for s in items:
        lls = []
        for (ctx, cont), resp in zip(_args(s), s["resps"]):
            key = (ctx, cont)
            assert key in mine, f"{task} doc {s['doc_id']}: lm-eval's request is not minima's: {key!r}"[:2000]
            lls.append(mine[key][0])
            worst = max(worst, abs(float(resp[0][0]) - mine[key][0]))
        preds[max(range(len(lls)), key=lls.__getitem__)] += 1
    assert worst < LL_TOL, (task, worst)
    assert len(preds) >= 2, f"{task}: degenerate predictions {preds}: the test would prove little"
    return worst


# ------------------------------------------------------------------------------ multiple choice
MMLU = ["astronomy", "high_school_psychology"]
CEVAL = ["logic", "college_physics"]
CMMLU = ["astronomy", "marketing"]


def test_shipped_multiple_choice_yamls_match_minima(tmp_path, model_tok):
    """mmlu, ceval-valid, cmmlu, arc_easy, arc_challenge, hellaswag, winogrande: lm-eval's own YAMLs."""
    model, tok = model_tok
    data = shared("eval")
    configs, shots, limit = [], {}, {}
    mcsv = {"dataset_kwargs": {"column_names": ["question", "A", "B", "C", "D", "answer"], "keep_default_na": False}}
    for s in MMLU:
        files = {"test": data / f"mmlu/val/{s}_val.csv", "dev": data / f"mmlu/dev/{s}_dev.csv"}
        cfg = local(f"mmlu/default/mmlu_{s}.yaml", f"lx_mmlu_{s}", "csv", files, process_docs=_mmlu_rows, **mcsv)
        configs.append(cfg)
        shots[cfg["task"]], limit[cfg["task"]] = 1, 15
    for s in CEVAL:
        dev = _drop_column(data / f"ceval/dev/{s}_dev.csv", "explanation", tmp_path / f"{s}_dev.csv")
        files = {"val": data / f"ceval/val/{s}_val.csv", "dev": dev}  # the csv builder wants one set of columns
        kw = {"keep_default_na": False}
        cfg = local(f"ceval/ceval-valid_{s}.yaml", f"lx_ceval_{s}", "csv", files, dataset_kwargs=kw)
        configs.append(cfg)
        shots[cfg["task"]], limit[cfg["task"]] = 1, 15
    for s in CMMLU:  # only the dev split is here: it is the test split, 0-shot
        files = {"test": data / f"cmmlu/dev/{s}.csv"}
        kw = {"keep_default_na": False}
        cfg = local(f"cmmlu/cmmlu_{s}.yaml", f"lx_cmmlu_{s}", "csv", files, dataset_kwargs=kw, fewshot_split="test")
        configs.append(cfg)
        shots[cfg["task"]], limit[cfg["task"]] = 0, None
    for arc in ("arc_easy", "arc_challenge"):  # only a 500-item test file: shots drawn from it
        f = data / f"arc/{arc}_llmfoundry_500.jsonl"
        cfg = local(f"arc/{arc}.yaml", f"lx_{arc}", "json", {"test": f}, process_docs=_arc_rows, fewshot_split="test")
        cfg.pop("training_split", None), cfg.pop("validation_split", None)
        configs.append(cfg)
        shots[cfg["task"]], limit[cfg["task"]] = 1, 40
    f = data / "hellaswag/hellaswag_val_500.jsonl"
    cfg = local("hellaswag/hellaswag.yaml", "lx_hellaswag", "json", {"validation": f})
    cfg.pop("training_split", None)
    configs.append(cfg)
    shots["lx_hellaswag"], limit["lx_hellaswag"] = 0, 30
    f = data / "winogrande/winogrande_llmfoundry_500.jsonl"
    wg_docs = _winogrande_rows
    cfg = local("winogrande/default.yaml", "lx_winogrande", "json", {"test": f}, process_docs=wg_docs)
    cfg.pop("training_split", None), cfg.pop("validation_split", None)
    cfg.update(test_split="test", fewshot_split="test")
    configs.append(cfg)
    shots["lx_winogrande"], limit["lx_winogrande"] = 1, 40

    ref = run_lm_eval(model, tok, configs, shots, limit)
    scores, seen = run_minima(
        model,
        tok,
        {
            "mmlu": {"subjects": MMLU, "limit": 15, "shots": 1, "split": "val"},
            "ceval": {"subjects": CEVAL, "limit": 15, "shots": 1, "split": "val"},
            "cmmlu": {"subjects": CMMLU, "shots": 0, "split": "dev"},
            "arc_easy": {"shots": 1, "limit": 40},
            "arc_challenge": {"shots": 1, "limit": 40},
            "hellaswag": {"shots": 0, "limit": 30},
            "winogrande": {"shots": 1, "limit": 40},
        },
        data_dir=data,
    )
    report = {}
    for cfg in configs:
        n = 5 if "cmmlu" in cfg["task"] else 15  # cmmlu's dev files hold 5 questions each
        report[cfg["task"]] = compare_requests(ref, seen["loglikelihood"], cfg["task"], min_items=n)
    for name, mine_name in (
        ("lx_arc_easy", "arc_easy"),
        ("lx_hellaswag", "hellaswag"),
        ("lx_winogrande", "winogrande"),
    ):
        assert scores[mine_name]["acc"] == pytest.approx(ref[name]["metrics"]["acc"], abs=1e-9), name
    print("max |ll difference| per task:", {k: f"{v:.1e}" for k, v in report.items()})


# ------------------------------------------------------------------------------ gsm8k
def test_shipped_gsm8k_yaml_contexts_match_minima(tmp_path, model_tok):
    """gsm8k: lm-eval's YAML at 2 shots from the train file: the same contexts, stops and greedy generations.

    minima takes gsm8k's worked solutions in file order (``first_n``) where the shipped YAML draws them with
    its seeded random sampler: the reference is told ``first_n``; everything else is the shipped config."""
    model, tok = model_tok
    data = shared("eval/gsm8k")
    files = {"test": data / "test.jsonl", "train": data / "train_first1000.jsonl"}
    cfg = local("gsm8k/gsm8k.yaml", "lx_gsm8k", "json", files)
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": 8}
    cfg["fewshot_config"] = {"sampler": "first_n"}
    ref = run_lm_eval(model, tok, [cfg], {"lx_gsm8k": 2}, {"lx_gsm8k": 6})
    _, seen = run_minima(model, tok, {"gsm8k": {"path": str(data), "limit": 6, "shots": 2}})
    ((contexts, until, outs),) = seen["generate_until"]
    ref_ctx = [_args(s)[0][0] for s in ref["lx_gsm8k"]["samples"]]
    ref_until = _args(ref["lx_gsm8k"]["samples"][0])[0][1]["until"]
    assert contexts == ref_ctx
    assert until == ref_until
    # generations: lm-eval's HFLM greedy vs minima's engine, both cut at the stop strings
    gens = [s["resps"][0][0] for s in ref["lx_gsm8k"]["samples"]]
    assert [o[0] for o in outs] == gens


# ------------------------------------------------------------------------------ rolling perplexity
def test_shipped_wikitext_rolling_perplexity_matches_minima(tmp_path, model_tok):
    """wikitext's YAML (rolling loglikelihood, word and byte perplexity) on a few C4 documents written as
    wikitext pages; minima's perplexity task on the same documents (after wikitext's detokenizer) gives the
    same per-document loglikelihood, hence the same word/byte perplexity. Documents fit one window.

    lm-eval's HFLM puts its prefix token (BOS) before each rolling text and, with a tokenizer that adds BOS
    itself (Llama's, this one), the tokenizer's BOS too: the text is scored after two BOS tokens. minima
    scores it after one, which is HFLM with ``add_bos_token=False``: the reference is run that way."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    model, tok = model_tok
    src = shared("text/c4_demo.jsonl")
    docs = []
    for line in src.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        if len(text) > 200 and len(tok(wikitext_detokenizer({"page": text}))["input_ids"]) < 500:
            docs.append({"page": text})
        if len(docs) == 6:
            break
    pages = tmp_path / "pages.jsonl"
    pages.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    cfg = local("wikitext/wikitext.yaml", "lx_wikitext", "json", {"test": pages})
    cfg.pop("training_split", None), cfg.pop("validation_split", None)
    ref = run_lm_eval(model, tok, [cfg], {"lx_wikitext": 0}, {}, add_bos_token=False)

    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(wikitext_detokenizer(d), encoding="utf-8")
    scores, seen = run_minima(model, tok, {"perplexity": {"path": str(folder)}})
    assert len(seen["rolling"]) == len(docs)
    ref_ll = [float(s["resps"][0][0]) for s in ref["lx_wikitext"]["samples"]]
    mine_nll = [nll for nll, _ in seen["rolling"]]
    for i, (a, b) in enumerate(zip(ref_ll, mine_nll)):
        assert abs(a + b) < 1e-6 * abs(a) + LL_TOL, (i, a, -b)
    words = sum(len(__import__("re").split(r"\s+", d["page"])) for d in docs)
    nbytes = sum(len(d["page"].encode("utf-8")) for d in docs)
    m = ref["lx_wikitext"]["metrics"]
    assert math.exp(sum(mine_nll) / words) == pytest.approx(m["word_perplexity"], rel=1e-5)
    assert math.exp(sum(mine_nll) / nbytes) == pytest.approx(m["byte_perplexity"], rel=1e-5)
    assert sum(mine_nll) / nbytes / math.log(2) == pytest.approx(m["bits_per_byte"], rel=1e-5)
    print(f"wikitext: word ppl {m['word_perplexity']:.2f}, byte ppl {m['byte_perplexity']:.4f}")
