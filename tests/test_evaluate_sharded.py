"""Evaluation of a model sharded over 2 ranks (DeepSpeed ZeRO-3, FSDP2; torchrun, gloo on CPU): the ranks split
the requests, call the model in lock step (the rank with less to do pads), and get the one-process numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    from minima.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("sharded_eval") / "model", tiny_tokenizer_dir, seed=0, **TINY)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The requests scored by one process holding the whole model (batch 2, as the ranks)."""
    import torch
    from _sharded_eval import score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.evaluate.lm import LM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return score(LM(model, AutoTokenizer.from_pretrained(str(model_dir)), batch_size=2, max_length=64))


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(a))


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["zero3", "fsdp"])
def test_sharded_model_splits_requests_in_lock_step(arm, model_dir, reference, tmp_path):
    from _sharded_eval import requests

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    out = tmp_path / arm
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    proc = subprocess.run(
        cmd + [str(TESTS / "_sharded_eval.py"), str(model_dir), arm, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    req = requests()
    for got in ranks:
        assert got["sharded"] and got["lockstep"]
        # the same numbers, in request order, on every rank
        assert len(got["ll"]) == len(req["ll"])
        for (lp, greedy), (ref_lp, ref_greedy) in zip(got["ll"], reference["ll"]):
            assert close(ref_lp, lp) and greedy == ref_greedy
        assert [n for _, n in got["rolling"]] == [n for _, n in reference["rolling"]]
        assert all(close(a, b) for (a, _), (b, _) in zip(reference["rolling"], got["rolling"]))
        assert got["gen"] == reference["gen"]
    # lock step: both ranks make the same number of model calls, half of the one-process run's, not all of them
    for kind in ("ll", "rolling", "gen"):
        assert ranks[0][f"{kind}_calls"] == ranks[1][f"{kind}_calls"], kind
    assert ranks[0]["ll_calls"] == math.ceil(reference["ll_calls"] / 2)
    assert ranks[0]["rolling_calls"] == math.ceil(reference["rolling_calls"] / 2)
    # generation: one generate call per batch; 5 contexts are 3 batches of 2 in one process, 2 per rank here
    assert ranks[0]["gen_calls"] == 2
    # the split is uneven (7 contexts, 19 windows, 5 generations): rank 1 pads to keep in step
    assert ranks[1]["rolling_pads"] > 0 and ranks[1]["gen_pads"] == 1 and ranks[1]["ll_pads"] > 0
