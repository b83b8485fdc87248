"""lr_schedule=cosine|linear|constant|wsd: the multipliers equal hand-computed curves, and DeepSpeed
and FSDP runs use exactly those lrs."""

from __future__ import annotations

import math

import pytest
from test_train_engine import train_inprocess
from test_train_strategies import cfg_for, model_dir, train_rows  # noqa: F401 (model_dir is a fixture)

from minima.train.schedule import WarmupCosine
from minima.train.synthetic import SyntheticConfig

# 10 steps, warmup 20% (2 iterations: 0, then half the peak), min_lr_ratio 0.1, wsd decay over the last 30%.
# After warmup p = (i - 1) / 8; wsd decays over iterations 7, 8, 9 (q = 1/3, 2/3, 1).
HAND_10 = {
    "cosine": [0, 0.5] + [0.1 + 0.9 * (1 + math.cos(math.pi * (i - 1) / 8)) / 2 for i in range(2, 10)],
    "linear": [0, 0.5, 0.1 + 0.9 * 7 / 8, 0.1 + 0.9 * 6 / 8, 0.1 + 0.9 * 5 / 8, 0.1 + 0.9 * 4 / 8]
    + [0.1 + 0.9 * 3 / 8, 0.1 + 0.9 * 2 / 8, 0.1 + 0.9 * 1 / 8, 0.1],
    "constant": [0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1],
    "wsd": [0, 0.5, 1, 1, 1, 1, 1, 0.1 + 0.9 * 2 / 3, 0.1 + 0.9 * 1 / 3, 0.1],
}

# The strategy runs: 8 steps, warmup 25% (2 iterations), wsd over the last 25% (iterations 6 and 7).
HAND_8 = {
    "linear": [0, 0.5, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1],
    "constant": [0, 0.5, 1, 1, 1, 1, 1, 1],
    "wsd": [0, 0.5, 1, 1, 1, 1, 0.55, 0.1],
}


@pytest.mark.parametrize("kind", list(HAND_10))
def test_schedule_kinds_equal_hand_computed_curves(kind):
    cfg = SyntheticConfig(model="m", warmup_proportion=0.2, min_lr_ratio=0.1, lr_schedule=kind, decay_proportion=0.3)
    sched = WarmupCosine.from_config(cfg, 10)
    assert [sched.ratio(i) for i in range(10)] == pytest.approx(HAND_10[kind], abs=1e-12)
    # the LambdaLR the strategies build follows the same curve
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    lr = sched.build(opt)
    got = []
    for _ in range(10):
        got.append(opt.param_groups[0]["lr"])
        lr.step()
    assert got == pytest.approx([2.0 * r for r in HAND_10[kind]], abs=1e-12)


def test_schedule_config_is_checked():
    with pytest.raises(ValueError):
        SyntheticConfig(model="m", lr_schedule="step")
    with pytest.raises(ValueError):
        SyntheticConfig(model="m", decay_proportion=0)


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
@pytest.mark.parametrize("kind", list(HAND_8))
def test_both_strategies_run_the_hand_computed_lrs(model_dir, tmp_path, strategy, kind):  # noqa: F811
    cfg = cfg_for(
        model_dir,
        tmp_path / "out",
        strategy,
        lr_schedule=kind,
        decay_proportion=0.25,
        zero_stage=0 if strategy == "deepspeed" else None,
    )
    _, d = train_inprocess(cfg)
    rows = train_rows(d)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * r for r in HAND_8[kind]], rel=1e-12, abs=1e-15)
    if strategy == "deepspeed":  # the saved DeepSpeed config says which schedule its WarmupCosineLR block ran as
        import json

        runs_as = json.loads((d / "ds_config.resolved.json").read_text())["scheduler"]["runs_as"]
        assert runs_as["lr_schedule"] == kind and runs_as.get("decay_proportion") == (0.25 if kind == "wsd" else None)


def test_eval_per_epoch_evaluates_at_each_epoch_end(model_dir, tmp_path):  # noqa: F811
    """36 records, 8 per step, 3 epochs: passes end at steps ceil(4.5)=5, 9 and ceil(13.5)=14 (the last)."""
    cfg = cfg_for(
        model_dir,
        tmp_path / "out",
        "fsdp",
        max_steps=-1,
        epochs=3,
        num_examples=36,
        dev_examples=8,
        eval_per_epoch=True,
        patience=2,
    )
    _, d = train_inprocess(cfg)
    from minima.train.metrics import read_metrics

    dev = [r["step"] for r in read_metrics(d / "metrics.jsonl") if r["split"] == "dev"]
    assert dev == [5, 9, 14]
