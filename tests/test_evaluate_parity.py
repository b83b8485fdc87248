"""lm-eval parity: the same model, items and prompts through lm-evaluation-harness 0.4 and through minima.

lm-eval runs offline on task YAMLs written into tmp (``dataset_path: json``/``csv`` + ``data_files``,
see ``minima/evaluate/reference.py``) with an ``HFLM`` around the same in-memory model. Per item,
the predicted choice (acc and acc_norm) must be identical and the loglikelihoods equal to float noise;
the task scores must agree to 1e-6.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import shared

from minima.evaluate import evaluate_model
from minima.evaluate.metrics import argmax
from minima.evaluate.reference import run_lmeval, write_lmeval_tasks

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
MMLU_SUBJECTS = ["elementary_mathematics", "high_school_psychology", "miscellaneous", "professional_law"]


@pytest.fixture(scope="module")
def model_tok(tiny_tokenizer_dir):
    """A tiny random Llama (hidden 64, 512 positions); the wide init (std 0.5) spreads its predictions."""
    from transformers import AutoTokenizer

    from minima.testing import tiny_llama

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    return tiny_llama(len(tok), seed=0, initializer_range=0.5, **TINY), tok


def _compare(ref: dict, mine: list[dict], min_distinct: int = 2) -> dict:
    """Per item: same prediction (acc and acc_norm), loglikelihoods equal to float noise."""
    assert len(ref["items"]) == len(mine) and mine
    worst = 0.0
    for r, m in zip(ref["items"], mine):
        assert len(r["lls"]) == len(m["loglikelihoods"])
        worst = max(worst, max(abs(a - b) for a, b in zip(r["lls"], m["loglikelihoods"])))
        assert argmax(r["lls"]) == m["pred"], (m["where"], r["lls"], m["loglikelihoods"])
        assert (r["acc"], r["acc_norm"]) == (m["acc"], m["acc_norm"]), m["where"]
    assert worst < 1e-3, worst
    preds = collections.Counter(m["pred"] for m in mine)
    assert len(preds) >= min_distinct, f"degenerate predictions {preds}: the test would prove little"
    return {"max_abs_ll_diff": worst, "preds": dict(preds)}


def test_lm_eval_parity_mmlu_arc_hellaswag_winogrande(tmp_path, model_tok):
    """>= 100 items each; MMLU 1-shot from dev in order, ARC 1-shot drawn with lm-eval's seeded sampler."""
    model, tok = model_tok
    data = shared("eval")
    names = write_lmeval_tasks(tmp_path / "yaml", data, mmlu_subjects=MMLU_SUBJECTS, arc="arc_easy")
    shots = {n: 0 if n.endswith("hellaswag") else 1 for n in names}
    limits = {n: 25 if "_mmlu_" in n else 100 for n in names}
    ref = run_lmeval(model, tok, tmp_path / "yaml", names, shots, limits, batch_size=16)

    samples: list[dict] = []
    mine = evaluate_model(
        model,
        tok,
        {
            "mmlu": {"subjects": MMLU_SUBJECTS, "limit": 25, "shots": 1, "split": "val"},
            "arc_easy": {"shots": 1},
            "hellaswag": {"shots": 0},
            "winogrande": {"shots": 1},
        },
        data_dir=data,
        limit=100,
        batch_size=16,
        samples=samples,
    )
    by = collections.defaultdict(list)
    for s in samples:
        by[(s["task"], s.get("subject", ""))].append(s)

    mmlu_items = []
    for subject in MMLU_SUBJECTS:
        r = ref[f"ref_mmlu_{subject}"]
        _compare(r, by[("mmlu", subject)], min_distinct=1)
        mmlu_items += by[("mmlu", subject)]
        sub = mine["mmlu"]["subjects"][subject]
        assert sub["acc"] == pytest.approx(r["metrics"]["acc"], abs=1e-6)
        assert sub["acc_stderr"] == pytest.approx(r["metrics"]["acc_stderr"], abs=1e-6)
    assert len(mmlu_items) == 100 and len({m["pred"] for m in mmlu_items}) >= 2
    for task in ("arc_easy", "hellaswag", "winogrande"):
        r = ref[f"ref_{task}"]
        _compare(r, by[(task, "")])
        assert mine[task]["info"]["n"] == 100
        for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert mine[task][metric] == pytest.approx(r["metrics"][metric], abs=1e-6), (task, metric)


def test_lm_eval_parity_demo_mc(tmp_path, model_tok, demo_data_dir):
    """The built-in bilingual demo questions (no ../shared needed): 2-shot drawn from dev with lm-eval's seed."""
    model, tok = model_tok
    names = write_lmeval_tasks(
        tmp_path / "yaml",
        demo_data_dir / "eval",
        arc=None,
        hellaswag=False,
        winogrande=False,
        demo_mc=demo_data_dir / "eval/demo_mc",
    )
    ref = run_lmeval(model, tok, tmp_path / "yaml", names, {names[0]: 2}, None, batch_size=8)
    samples: list[dict] = []
    mine = evaluate_model(
        model,
        tok,
        {"demo_mc": {"path": str(demo_data_dir / "eval/demo_mc"), "shots": 2}},
        batch_size=8,
        samples=samples,
    )
    _compare(ref[names[0]], samples)
    for metric in ("acc", "acc_norm"):
        assert mine["demo_mc"][metric] == pytest.approx(ref[names[0]]["metrics"][metric], abs=1e-6)
