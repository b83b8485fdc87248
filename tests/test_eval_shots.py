"""Per-task shots in training evals: ``eval_shots: {mmlu: 2, arc_easy: 1}`` gives each task its own count,
the same scores as evaluate_model run task by task with that count; an int still sets every task."""

from __future__ import annotations

import pytest
from conftest import shared

from minima.core.config import AdaptConfig
from minima.core.errors import ConfigError
from minima.evaluate import callback as cb


def test_eval_shots_per_task_config_and_specs():
    cfg = AdaptConfig(eval_tasks=["mmlu", "gsm8k"], eval_shots={"mmlu": 5, "gsm8k": 8})
    assert cfg.eval_shots == {"mmlu": 5, "gsm8k": 8}
    assert AdaptConfig(eval_tasks=["mmlu"], eval_shots=3).eval_shots == 3
    with pytest.raises(ValueError, match="eval_tasks does not list"):
        AdaptConfig(eval_tasks=["mmlu"], eval_shots={"gsm8k": 8})
    with pytest.raises(ValueError, match=">= 0"):
        AdaptConfig(eval_tasks=["mmlu"], eval_shots={"mmlu": -1})
    # a task left out keeps its standard count (no shots in its spec); a task's own spec wins
    assert cb.per_task_shots(["mmlu", "arc_easy"], {"mmlu": 5}) == ({"mmlu": {"shots": 5}, "arc_easy": {}}, None)
    assert cb.per_task_shots({"mmlu": {"shots": 1}}, {"mmlu": 5}) == ({"mmlu": {"shots": 1}}, None)
    assert cb.per_task_shots(["mmlu"], 3) == (["mmlu"], 3)
    with pytest.raises(ConfigError, match="gsm8k"):
        cb.per_task_shots(["mmlu"], {"gsm8k": 8})


def test_callback_runs_each_task_with_its_shots(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = shared("eval")
    net = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    seen = []
    real = cb.evaluate_model

    def spy(*a, **kw):
        res = real(*a, **kw)
        seen.append(res)
        return res

    monkeypatch.setattr(cb, "evaluate_model", spy)
    shots = {"mmlu": 2, "arc_easy": 1}
    call = cb.EvalCallback(["mmlu", "arc_easy"], shots=shots, tokenizer=tok, data_dir=str(data), limit=2)
    flat = call.on_eval(1, net)
    got = seen[-1]
    assert {t: got[t]["info"]["shots"] for t in shots} == shots
    for t, n in shots.items():
        ref = real(net, tok, [t], data_dir=data, shots=n, limit=2)[t]
        assert flat[f"eval/{t}/acc"] == ref["acc"] and got[t]["info"]["n"] == ref["info"]["n"]
    # an int still sets every task
    cb.EvalCallback(["mmlu", "arc_easy"], shots=0, tokenizer=tok, data_dir=str(data), limit=2).on_eval(1, net)
    assert {t: seen[-1][t]["info"]["shots"] for t in shots} == {"mmlu": 0, "arc_easy": 0}
