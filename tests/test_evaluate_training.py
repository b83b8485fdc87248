"""Benchmark scores during training (the JAX recipe's evaluation_datasets / evaluation_shots): TrainConfig.eval_tasks
makes the engine log eval/<task>/<metric> at every dev evaluation, equal to evaluate_model on the exported model."""

from __future__ import annotations

import json
import os

import pytest

from minima.core.config import AdaptConfig
from minima.core.errors import ConfigError, InputError
from minima.train.metrics import read_metrics

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
ONE_THREAD = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_data_dir, tiny_tokenizer_dir):
    """Tiny lm records (seq 32, with a dev split) from the demo corpus and a tiny Llama (hidden 64, 2 layers)."""
    from minima.testing import lm_records, save_tiny_model

    d = tmp_path_factory.mktemp("train_eval")
    rec = lm_records(d, demo_data_dir / "text" / "pretrain_en.txt", tiny_tokenizer_dir)
    model = save_tiny_model(d / "model", tiny_tokenizer_dir, seed=0, **SHAPE)
    return d, model, rec


def _run_adapt(cfg: AdaptConfig):
    from minima.stages.adapt import run

    old = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        return run(cfg)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_adapt_logs_benchmark_scores_at_each_eval(inputs, demo_data_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.evaluate import evaluate_model

    d, model, rec = inputs
    eval_dir = demo_data_dir / "eval"
    cfg = AdaptConfig(
        model=str(model),
        records=str(rec),
        out_dir=str(d / "adapt"),
        precision="fp32",
        micro_batch_size=4,
        max_steps=6,
        eval_steps=3,
        lr=5e-3,
        eval_tasks=["demo_mc"],
        eval_shots=0,
        eval_limit=12,
        eval_data_dir=str(eval_dir),
    )
    art = _run_adapt(cfg)
    dev = [r for r in read_metrics(art.path / "metrics.jsonl") if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [3, 6]
    for r in dev:
        assert {"dev_loss", "eval/demo_mc/acc", "eval/demo_mc/acc_norm"} <= set(r)
    assert art.metrics["eval/demo_mc/acc"] == dev[-1]["eval/demo_mc/acc"]  # the manifest reports the last eval

    # the step-6 scores are the exported model's scores
    net = AutoModelForCausalLM.from_pretrained(str(art.path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(art.path))
    ref = evaluate_model(net, tok, ["demo_mc"], data_dir=eval_dir, shots=0, limit=12)["demo_mc"]
    assert ref["info"]["n"] == 12
    assert dev[-1]["eval/demo_mc/acc"] == ref["acc"] and dev[-1]["eval/demo_mc/acc_norm"] == ref["acc_norm"]
    # the callback scores the live weights: the choices changed between the two evals (fp32, one thread: deterministic)
    assert dev[0]["eval/demo_mc/acc"] != dev[-1]["eval/demo_mc/acc"]
    cfg_saved = json.loads((art.path / "manifest.json").read_text())["config"]
    assert cfg_saved["eval_tasks"] == ["demo_mc"] and cfg_saved["eval_limit"] == 12


def test_eval_tasks_checked_before_training(inputs, tmp_path, demo_data_dir):
    d, model, rec = inputs
    common = dict(model=str(model), records=str(rec), out_dir=str(tmp_path / "o"), precision="fp32", max_steps=2)
    with pytest.raises(ConfigError, match="chat task"):
        _run_adapt(AdaptConfig(eval_tasks=["mt_bench"], **common))
    with pytest.raises(InputError, match="unknown task 'demo_mcc'"):
        _run_adapt(AdaptConfig(eval_tasks=["demo_mcc"], **common))
    with pytest.raises(InputError, match="none of mmlu found"):
        _run_adapt(AdaptConfig(eval_tasks=["mmlu"], eval_data_dir=str(demo_data_dir / "eval"), **common))
    import shutil

    nodev = tmp_path / "nodev"
    shutil.copytree(rec, nodev)
    shutil.rmtree(nodev / "dev")
    with pytest.raises(ConfigError, match="no dev split"):
        _run_adapt(
            AdaptConfig(
                eval_tasks=["demo_mc"], eval_data_dir=str(demo_data_dir / "eval"), **dict(common, records=str(nodev))
            )
        )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert AdaptConfig(eval_tasks="demo_mc, ceval").eval_tasks == ["demo_mc", "ceval"]  # CLI eval_tasks=a,b


@pytest.mark.slow
def test_fsdp_two_ranks_log_the_one_process_scores(inputs, demo_data_dir, tmp_path):
    """adapt with strategy=fsdp on 2 ranks (torchrun, gloo): the eval callback scores the sharded model with the
    requests split over the ranks in lock step; the logged scores equal one process evaluating the export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.evaluate import evaluate_model
    from minima.stages.adapt import run

    d, model, rec = inputs
    eval_dir = demo_data_dir / "eval"
    cfg = AdaptConfig(
        model=str(model),
        records=str(rec),
        out_dir=str(tmp_path / "adapt"),
        strategy="fsdp",
        precision="fp32",
        micro_batch_size=2,
        max_steps=3,
        eval_steps=3,
        lr=5e-3,
        eval_tasks=["demo_mc"],
        eval_shots=0,
        eval_limit=11,
        eval_data_dir=str(eval_dir),
        launch={"nproc_per_node": 2},
    )
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        art = run(cfg)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    assert art.metrics["world_size"] == 2 and art.metrics["strategy"] == "fsdp"
    dev = [r for r in read_metrics(art.path / "metrics.jsonl") if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [3]
    net = AutoModelForCausalLM.from_pretrained(str(art.path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(art.path))
    ref = evaluate_model(net, tok, ["demo_mc"], data_dir=eval_dir, shots=0, limit=11)["demo_mc"]
    assert ref["info"]["n"] == 11
    assert dev[-1]["eval/demo_mc/acc"] == ref["acc"] and dev[-1]["eval/demo_mc/acc_norm"] == ref["acc_norm"]
