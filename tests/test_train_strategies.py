"""The two training strategies behind the one loop: DeepSpeed and torch FSDP2.

References: DeepSpeed's own WarmupCosineLR / WarmupLR for the lr schedule, the DeepSpeed run of the
same config and seed for FSDP's losses, lrs, grad norms and weights (one process, fp32, so the only
differences are summation order), and the uninterrupted run for kill-and-resume (bitwise).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_engine import SHAPE, ScriptedDevRecipe, max_diff, train_inprocess, weights

from minima.core.errors import ConfigError, TrainingError
from minima.train.metrics import read_metrics
from minima.train.schedule import WarmupCosine
from minima.train.synthetic import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]
SYN = "minima.train.synthetic:SyntheticRecipe"
ONE_THREAD = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}  # 1 thread: far faster on a shared 2-core box


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from minima.testing import tiny_llama

    d = tmp_path_factory.mktemp("strategies") / "model"
    tiny_llama(128, seed=0, **SHAPE).save_pretrained(str(d))
    return d


def cfg_for(model_dir: Path, out: Path, strategy: str, **kw) -> SyntheticConfig:
    """Accumulation 2, a warmup and an active grad clip (norms are ~1): every part of a step is exercised."""
    args = dict(
        model=str(model_dir),
        out_dir=str(out),
        strategy=strategy,
        precision="fp32",
        zero_stage=2 if strategy == "deepspeed" else None,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=8,
        lr=3e-3,
        warmup_proportion=0.25,
        min_lr_ratio=0.1,
        grad_clip=1.0,
        seq_len=32,
        num_examples=256,
    )
    args.update(kw)
    return SyntheticConfig(**args)


def train_rows(d: Path) -> list[dict]:
    return [r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "train"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ------------------------------------------------------------------------------ the lr schedule
@pytest.mark.parametrize("warmup_type", ["linear", "log"])
def test_schedule_equals_deepspeed_warmup_cosine(warmup_type):
    """WarmupCosine as a LambdaLR gives DeepSpeed's WarmupCosineLR lrs exactly, step 1 at iteration 0."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    for total in (1, 2, 5, 37, 400):
        for wp in (0.0, 0.01, 0.1, 0.5):
            for min_ratio in (0.0, 0.1):
                cfg = SyntheticConfig(model="m", warmup_proportion=wp, min_lr_ratio=min_ratio)
                sched = WarmupCosine.from_config(cfg, total)
                sched = dataclasses.replace(sched, warmup_type=warmup_type)
                ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
                ours = sched.build(ours_opt)
                ds_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
                ds = WarmupCosineLR(ds_opt, warmup_type=warmup_type, **sched.ds_params())
                ds.step()  # the loop's pre-step: optimizer step 1 runs at iteration 0
                for _ in range(total + 2):
                    assert ours_opt.param_groups[0]["lr"] == ds_opt.param_groups[0]["lr"], (total, wp, min_ratio)
                    ours.step()
                    ds.step()


# ------------------------------------------------------------------------------ DeepSpeed vs FSDP
@pytest.fixture(scope="module")
def fsdp_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "out"
    return train_inprocess(cfg_for(model_dir, out, "fsdp"))


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_fsdp_matches_deepspeed_on_one_process(fsdp_run, model_dir, tmp_path, zero):
    """Same config and seed: the same losses, lrs, grad norms and final weights (up to summation order)."""
    res_f, dir_f = fsdp_run
    res_d, dir_d = train_inprocess(cfg_for(model_dir, tmp_path / "out", "deepspeed", zero_stage=zero))
    assert res_f["strategy"] == "fsdp" and res_d["strategy"] == "deepspeed" and res_d["zero_stage"] == zero
    f, d = train_rows(dir_f), train_rows(dir_d)
    assert [r["step"] for r in f] == [r["step"] for r in d] == list(range(1, 9))
    assert [r["batch_hash"] for r in f] == [r["batch_hash"] for r in d]
    assert [r["lr"] for r in f] == [r["lr"] for r in d]
    # Warmup of 2 iterations (0, then half the peak), then cosine: step 3 is 1/6 of the way down to 0.1.
    assert f[0]["lr"] == 0.0 and f[1]["lr"] == 1.5e-3
    assert f[2]["lr"] == pytest.approx(3e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi / 6)) / 2), rel=1e-12)
    worst = max(rel(a["loss"], b["loss"]) for a, b in zip(f, d))
    print(f"ZeRO-{zero} vs FSDP: max relative loss difference {worst:.2e}")
    assert worst < 1e-5
    assert f[-1]["loss"] < f[0]["loss"] - 0.1
    if zero > 0:  # DeepSpeed reports no grad norm without ZeRO in fp32
        assert max(rel(a["grad_norm"], b["grad_norm"]) for a, b in zip(f, d)) < 1e-4
    assert max_diff(weights(dir_f), weights(dir_d)) < 1e-5
    assert res_f["train_tokens"] == res_d["train_tokens"]


def test_fsdp_checkpoint_layout_and_export(fsdp_run):
    from transformers import AutoModelForCausalLM

    res, d = fsdp_run
    assert res["precision"] == "fp32" and "zero_stage" not in res
    ckpt = d / "checkpoints" / "step_00000008"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "scheduler.pt").is_file()
    assert json.loads((ckpt / "COMPLETE").read_text())["strategy"] == "fsdp"
    assert not (d / "ds_config.resolved.json").exists()
    assert AutoModelForCausalLM.from_pretrained(str(d)).config.hidden_size == 64
    assert (d / "loss_curve.png").is_file() and any((d / "tensorboard").iterdir())


def test_explicit_deepspeed_scheduler_wins(model_dir, tmp_path):
    """A WarmupCosineLR block's explicit values, and another scheduler type, are what DeepSpeed runs."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    from minima.train.ds_config import DEFAULT_DS_CONFIG

    cosine = copy.deepcopy(DEFAULT_DS_CONFIG)
    cosine["scheduler"]["params"].update(warmup_num_steps=3, warmup_min_ratio=0.1, cos_min_ratio=0.5, warmup_type="log")
    warm = copy.deepcopy(DEFAULT_DS_CONFIG)
    warm["scheduler"] = {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": "auto", "warmup_num_steps": 4, "warmup_type": "linear"},
    }
    got = {}
    for name, ds in (("cosine", cosine), ("warm", warm)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(ds))
        _, d = train_inprocess(cfg_for(model_dir, tmp_path / name, "deepspeed", ds_config=str(path), max_steps=6))
        got[name] = [r["lr"] for r in train_rows(d)]
    want = WarmupCosine(total_steps=6, warmup_steps=3, warmup_min_ratio=0.1, min_ratio=0.5, warmup_type="log")
    assert got["cosine"] == [3e-3 * want.ratio(i) for i in range(6)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    ref = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=3e-3, warmup_num_steps=4, warmup_type="linear")
    lrs = []
    for _ in range(6):
        ref.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert got["warm"] == lrs and got["warm"][-1] == got["warm"][-2] == 3e-3


# ------------------------------------------------------------------------------ kill and resume
DRIVER = """import json, sys
from minima.train import train_stage
from minima.train.synthetic import SyntheticConfig
cfg = SyntheticConfig.model_validate(json.loads(open(sys.argv[1]).read()))
train_stage(cfg, {}, "minima.train.synthetic:SyntheticRecipe")
"""


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_kill_and_resume_is_bitwise(model_dir, tmp_path, strategy):
    """SIGKILL a run after its step-4 checkpoint; the rerun resumes there and ends bitwise equal to an
    uninterrupted run (fp32 on CPU, one thread), with every batch, loss and lr exactly once."""
    common = dict(save_steps=2, keep_last=2, dev_examples=16, eval_steps=4)
    _, ref = train_inprocess(cfg_for(model_dir, tmp_path / "ref", strategy, **common))

    cfg = cfg_for(model_dir, tmp_path / "killed", strategy, **common)
    spec, driver = tmp_path / "cfg.json", tmp_path / "driver.py"
    spec.write_text(json.dumps(cfg.model_dump(mode="json")))
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_STEP_DELAY_S="0.3", PYTHONPATH=str(ROOT), **ONE_THREAD)
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(spec)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    partial = tmp_path / "killed.partial"
    marker = partial / "checkpoints" / "step_00000004" / "COMPLETE"
    deadline = time.time() + 180
    while not marker.is_file():
        assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    steps_before = [r["step"] for r in train_rows(partial)]
    assert 4 <= max(steps_before) < 8 and not (tmp_path / "killed" / "manifest.json").exists()

    res, out = train_inprocess(cfg)
    assert res["steps"] == 8
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    r_rows, g_rows = train_rows(ref), train_rows(out)
    assert [r["step"] for r in g_rows] == list(range(1, 9))
    for key in ("batch_hash", "loss", "lr"):
        assert [r[key] for r in g_rows] == [r[key] for r in r_rows], key
    dev_ref = [r["dev_loss"] for r in read_metrics(ref / "metrics.jsonl") if r["split"] == "dev"]
    dev_got = [r["dev_loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "dev"]
    assert dev_got == dev_ref and len(dev_ref) == 2


# ------------------------------------------------------------------------------ two processes
def test_fsdp_two_processes_match_one(model_dir, tmp_path):
    """torchrun, 2 gloo ranks x micro-batch 2 = the 1-process global batch: the same losses and grad norms,
    and the best checkpoint, reloaded from its 2-rank DCP shards, exports the 1-process run's weights.

    Dev losses follow test_train_engine's script (3.0, 2.0, 2.5, 2.6 at steps 2-8: best step 4, stop at 8).
    """
    recipe = f"{ScriptedDevRecipe.__module__}:ScriptedDevRecipe"
    patience = dict(max_steps=20, eval_steps=2, patience=2, dev_examples=16, keep_last=1)
    ScriptedDevRecipe.evals, ScriptedDevRecipe._last = 0, None
    res_one, one = train_inprocess(cfg_for(model_dir, tmp_path / "one", "fsdp", **patience), recipe=recipe)
    assert res_one["best_step"] == 4 and res_one["steps"] == 8

    cfg = cfg_for(model_dir, tmp_path / "two", "fsdp", micro_batch_size=2, launch={"nproc_per_node": 2}, **patience)
    spec, driver = tmp_path / "cfg.json", tmp_path / "driver.py"
    spec.write_text(json.dumps(cfg.model_dump(mode="json")))
    driver.write_text(DRIVER.replace(SYN, recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # the workers import the recipe
    env.pop("MINIMA_INPROCESS", None)
    proc = subprocess.run(
        [sys.executable, str(driver), str(spec)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two = tmp_path / "two"
    res_two = json.loads((two / "manifest.json").read_text())["metrics"]
    assert res_two["world_size"] == 2 and res_two["strategy"] == "fsdp"
    assert res_two["best_step"] == 4 and res_two["steps"] == 8
    assert len(list((two / "checkpoints" / "step_00000004" / "dcp").glob("*.distcp"))) == 2  # one file per rank
    one_rows, two_rows = train_rows(one), train_rows(two)
    assert [r["step"] for r in two_rows] == list(range(1, 9))
    for a, b in zip(one_rows, two_rows):
        assert rel(a["loss"], b["loss"]) < 1e-5 and rel(a["grad_norm"], b["grad_norm"]) < 1e-4
    assert max_diff(weights(one), weights(two)) < 1e-5


# ------------------------------------------------------------------------------ config and checkpoint checks
def test_strategy_config_and_checks(tmp_path):
    from pydantic import ValidationError

    from minima.core.config import AdaptConfig, DistillConfig, SftConfig
    from minima.train.checkpoint import Checkpointer
    from minima.train.strategies import get_strategy

    for cls in (AdaptConfig, DistillConfig, SftConfig, SyntheticConfig):
        assert cls().strategy == "deepspeed" and cls(strategy="fsdp").strategy == "fsdp"
    with pytest.raises(ValidationError, match="bf16 or fp32"):
        AdaptConfig(strategy="fsdp", precision="fp16")
    with pytest.raises(ConfigError, match="deepspeed, fsdp"):
        get_strategy("megatron")
    # A checkpoint written by the other strategy is refused with the way out.
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 1, "strategy": "deepspeed"}))
    with pytest.raises(TrainingError, match="strategy=deepspeed") as e:
        Checkpointer(ckpt.parent, 0, 1, 2, lambda: None).load(get_strategy("fsdp"), ckpt)
    assert "resume with strategy=deepspeed" in str(e.value)
