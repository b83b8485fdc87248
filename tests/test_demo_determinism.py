"""Same seed, same machine -> same numbers: two tiny training runs give bit-identical weights and the same
demo_qa and held-out perplexity; another seed gives other weights (so the comparison can fail)."""

from __future__ import annotations

import os

import pytest

from minima.core.config import AdaptConfig

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
ONE_THREAD = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_data_dir, tiny_tokenizer_dir):
    from minima.testing import lm_records, save_tiny_model

    d = tmp_path_factory.mktemp("determinism")
    rec = lm_records(d, demo_data_dir / "text" / "*.txt", tiny_tokenizer_dir)
    return d, save_tiny_model(d / "model", tiny_tokenizer_dir, seed=0, **SHAPE), rec


def _train_and_score(d, model, rec, name: str, seed: int, demo_data_dir):
    from minima.evaluate.core import evaluate_model
    from minima.models.loader import load_model_and_tokenizer
    from minima.stages.adapt import run

    old = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        art = run(
            AdaptConfig(
                model=str(model),
                records=str(rec),
                out_dir=str(d / name),
                seed=seed,
                precision="fp32",
                max_steps=4,
                eval_steps=4,
                micro_batch_size=4,
                lr=3e-3,
            )
        )
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    m, tok = load_model_and_tokenizer(str(art.path), dtype="auto", device="cpu")
    tasks = {
        "demo_qa": {"path": str(demo_data_dir / "eval/demo_qa"), "limit": 4},
        "perplexity": {"path": str(demo_data_dir / "heldout"), "limit": 20, "max_length": 32},
    }
    res = evaluate_model(m, tok, tasks, max_new_tokens=8)
    scores = {
        "demo_qa": {k: v for k, v in res["demo_qa"].items() if k.startswith("exact_match")},
        "perplexity": {k: res["perplexity"][k] for k in ("token_perplexity", "bits_per_byte")},
        "dev_loss": art.metrics["dev_loss"],
    }
    return scores, {k: v.clone() for k, v in m.state_dict().items()}


def test_two_runs_same_numbers_another_seed_other_weights(inputs, demo_data_dir):
    import torch

    d, model, rec = inputs
    a, wa = _train_and_score(d, model, rec, "a", 0, demo_data_dir)
    b, wb = _train_and_score(d, model, rec, "b", 0, demo_data_dir)
    c, wc = _train_and_score(d, model, rec, "c", 1, demo_data_dir)
    assert a == b  # exactly, not approximately
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["perplexity"] != c["perplexity"]
