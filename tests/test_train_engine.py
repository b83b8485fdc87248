"""The training engine: exact loss under accumulation, NaN abort, early stopping, ZeRO-2/3 and FSDP, callbacks.

Runs are in-process (MINIMA_INPROCESS=1) on a tiny Llama (hidden 64, 2 layers) with the
synthetic recipe; the subprocess paths (torchrun, 2 processes, 2 nodes) are in test_train_launch.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from minima.core.errors import ConfigError, InputError, TrainingError
from minima.train import LossOut, train_stage
from minima.train.metrics import read_metrics
from minima.train.synthetic import (
    SyntheticConfig,
    SyntheticDataset,
    SyntheticRecipe,
    pad_collate,
)

SYN = "minima.train.synthetic:SyntheticRecipe"
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from minima.testing import tiny_llama

    d = tmp_path_factory.mktemp("engine") / "model"
    tiny_llama(128, seed=0, **SHAPE).save_pretrained(str(d))
    return d


def base_cfg(model_dir: Path, out: Path, **kw) -> SyntheticConfig:
    args = dict(
        model=str(model_dir),
        out_dir=str(out),
        precision="fp32",
        zero_stage=2,
        micro_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=6,
        lr=3e-3,
        warmup_proportion=0.0,
        seq_len=32,
        num_examples=256,
    )
    args.update(kw)
    return SyntheticConfig(**args)


def train_inprocess(cfg, recipe: str = SYN, callbacks=()) -> tuple[dict, Path]:
    """train_stage in this process; returns (metrics, the published run dir)."""
    env = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}  # 1 thread: far faster on a shared 2-core box
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        art = train_stage(cfg, {}, recipe, callbacks=list(callbacks))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return art.metrics, art.path


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def run_mb8(model_dir, tmp_path_factory):
    """One micro-batch of 8 per step (the reference for accumulation, ZeRO-3 and 2-process runs)."""
    out = tmp_path_factory.mktemp("mb8") / "out"
    cfg = base_cfg(model_dir, out)
    res, work = train_inprocess(cfg)
    return cfg, res, work


def reference_step1(model_dir: Path, cfg: SyntheticConfig) -> tuple[float, float]:
    """Step 1 by hand with plain HF: token-weighted mean CE over the first 8 examples, its grad norm."""
    from transformers import AutoModelForCausalLM

    from minima.train import causal_lm_loss_sum

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ds = SyntheticDataset(cfg.num_examples, cfg.seq_len, 128, cfg.seed, 0, 1, True)
    it = iter(ds)
    batch = pad_collate([next(it) for _ in range(8)])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss_sum, n = causal_lm_loss_sum(out.logits, batch["labels"])
    loss = loss_sum / n
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    return loss.item(), norm


def test_gradient_accumulation_is_exact(run_mb8, model_dir, tmp_path):
    """8 x 1 == 2 x 4: same step-1 loss and gradient norm as a hand computation, same final weights."""
    cfg8, res8, work8 = run_mb8
    cfg2 = base_cfg(model_dir, tmp_path / "out", micro_batch_size=2, gradient_accumulation_steps=4)
    res2, work2 = train_inprocess(cfg2)
    ref_loss, ref_norm = reference_step1(model_dir, cfg8)
    m8 = [r for r in read_metrics(work8 / "metrics.jsonl") if r["split"] == "train"]
    m2 = [r for r in read_metrics(work2 / "metrics.jsonl") if r["split"] == "train"]
    # Variable lengths + masked prefixes: a per-micro-batch mean, or scaling by the accumulation twice,
    # would both move these numbers far beyond the tolerance.
    for m in (m8[0], m2[0]):
        assert m["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert [r["batch_hash"] for r in m8] != [] and len(m8) == len(m2) == 6
    for a, b in zip(m8, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    # fp32 sums in a different order: not bitwise, but far below the size of one update.
    assert max_diff(weights(work8), weights(work2)) < 1e-4
    assert res8["train_tokens"] == res2["train_tokens"]


def test_export_loads_and_metrics_written(run_mb8):
    from transformers import AutoModelForCausalLM

    cfg, res, work = run_mb8
    model = AutoModelForCausalLM.from_pretrained(str(work))
    assert model.config.hidden_size == 64
    assert (work / "generation_config.json").is_file()
    assert (work / "loss_curve.png").stat().st_size > 1000
    assert any((work / "tensorboard").iterdir())
    ds = json.loads((work / "ds_config.resolved.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is False
    train = [r for r in read_metrics(work / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert train[-1]["loss"] < train[0]["loss"]
    # TensorBoard holds the same scalars as metrics.jsonl, step by step (stored as float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(work / "tensorboard"), size_guidance={"scalars": 0})
    tb.Reload()
    for key in ("loss", "lr", "grad_norm"):
        got = [(e.step, e.value) for e in tb.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [r["step"] for r in train], key
        assert [v for _, v in got] == pytest.approx([r[key] for r in train], rel=1e-6, abs=1e-12), key
    assert res["steps"] == 6 and res["zero_stage"] == 2
    # keep_last=2 with a checkpoint only at the end: exactly one complete checkpoint
    ckpts = sorted(p.name for p in (work / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006"]


def test_zero3_matches_zero2(run_mb8, model_dir, tmp_path, monkeypatch):
    """ZeRO-3 (built under zero.Init) partitions parameters but computes the same updates; its export loads
    and matches, and gathers one module's parameters at a time, never the whole model."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    gathered = []
    real = deepspeed.zero.GatheredParameters

    def spy(params, *a, **kw):
        params = list(params) if isinstance(params, (list, tuple)) else [params]
        gathered.append(len(params))
        return real(params, *a, **kw)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", spy)
    _, _, work2 = run_mb8
    cfg3 = base_cfg(model_dir, tmp_path / "out", zero_stage=3)
    res3, work3 = train_inprocess(cfg3)
    assert res3["zero_stage"] == 3
    AutoModelForCausalLM.from_pretrained(str(work3))
    assert max_diff(weights(work2), weights(work3)) < 1e-4
    n_params = len(list(AutoModelForCausalLM.from_pretrained(str(model_dir)).parameters()))
    assert gathered and max(gathered) <= 3 < n_params  # q/k/v/o are separate modules: at most a norm's few


class NanRecipe(SyntheticRecipe):
    """Returns a NaN loss from the 4th micro-batch on."""

    calls = 0

    def compute_loss(self, model, batch, ctx, train):
        out = super().compute_loss(model, batch, ctx, train)
        if train:
            NanRecipe.calls += 1
            if NanRecipe.calls >= 4:
                out = LossOut(out.loss_sum * float("nan"), out.num_tokens)
        return out


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_nan_loss_aborts_naming_step_and_checkpoint(model_dir, tmp_path, strategy):
    NanRecipe.calls = 0
    cfg = base_cfg(model_dir, tmp_path / "out", save_steps=2, max_steps=8, strategy=strategy)
    with pytest.raises(TrainingError) as e:
        train_inprocess(cfg, recipe=f"{__name__}:NanRecipe")
    msg = str(e.value)
    assert "at step 4/8" in msg and "step_00000002" in msg
    assert (tmp_path / "out.partial" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


class ScriptedDevRecipe(SyntheticRecipe):
    """Dev losses follow a script per evaluation, to drive early stopping deterministically."""

    script = [3.0, 2.0, 2.5, 2.6, 2.7]
    evals = 0
    _last = None

    def compute_loss(self, model, batch, ctx, train):
        out = super().compute_loss(model, batch, ctx, train)
        if train:
            ScriptedDevRecipe._last = None
            return out
        if ScriptedDevRecipe._last is None:
            ScriptedDevRecipe._last = ScriptedDevRecipe.evals
            ScriptedDevRecipe.evals += 1
        value = self.script[ScriptedDevRecipe._last]
        return LossOut(torch.tensor(value * out.num_tokens), out.num_tokens)


class RecordingCallback:
    steps: list[int] = []

    def __init__(self, cfg):
        self.cfg = cfg

    def on_eval(self, step, model, ctx):
        RecordingCallback.steps.append(step)
        assert isinstance(model, torch.nn.Module)
        return {"cb_metric": float(step)}


def test_early_stopping_exports_best_and_runs_callbacks(model_dir, tmp_path):
    """patience=2: evals at steps 2,4,6,8 score 3.0, 2.0, 2.5, 2.6 -> stop at 8, export step 4's weights."""
    ScriptedDevRecipe.evals, ScriptedDevRecipe._last = 0, None
    RecordingCallback.steps = []
    cfg = base_cfg(model_dir, tmp_path / "out", max_steps=20, eval_steps=2, patience=2, dev_examples=16, keep_last=1)
    res, work = train_inprocess(
        cfg, recipe=f"{__name__}:ScriptedDevRecipe", callbacks=[f"{__name__}:RecordingCallback"]
    )
    assert res["stopped_early"] and res["steps"] == 8
    assert res["best_step"] == 4 and res["best_dev_loss"] == pytest.approx(2.0)
    assert RecordingCallback.steps == [2, 4, 6, 8]
    dev = [r for r in read_metrics(work / "metrics.jsonl") if r["split"] == "dev"]
    assert [r["cb_metric"] for r in dev] == [2.0, 4.0, 6.0, 8.0]
    assert dev[1]["dev_ppl"] == pytest.approx(math.exp(2.0))
    # The best checkpoint survives keep_last=1, and the export holds its weights, not step 8's.
    best = work / "checkpoints" / "step_00000004"
    assert (best / "COMPLETE").is_file()
    state = torch.load(best / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    exported = weights(work)
    assert max(float((exported[k] - state[k]).abs().max()) for k in exported) == 0.0
    last = torch.load(
        work / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    assert max(float((exported[k] - last[k]).abs().max()) for k in exported) > 0


def test_early_stopping_best_export_under_zero3_and_fsdp(model_dir, tmp_path):
    """ZeRO-3 and FSDP keep the weights sharded: reloading the best checkpoint must still export step 4
    (the ZeRO-2 export, checked against its checkpoint file above), with the callbacks run the same way."""
    exports = []
    for strategy, zero in (("deepspeed", 2), ("deepspeed", 3), ("fsdp", None)):
        ScriptedDevRecipe.evals, ScriptedDevRecipe._last = 0, None
        RecordingCallback.steps = []
        cfg = base_cfg(
            model_dir,
            tmp_path / f"{strategy}{zero}",
            strategy=strategy,
            zero_stage=zero,
            max_steps=20,
            eval_steps=2,
            patience=2,
            dev_examples=16,
            keep_last=1,
        )
        res, work = train_inprocess(
            cfg, recipe=f"{__name__}:ScriptedDevRecipe", callbacks=[f"{__name__}:RecordingCallback"]
        )
        assert res["best_step"] == 4 and res["steps"] == 8 and res["strategy"] == strategy
        assert RecordingCallback.steps == [2, 4, 6, 8]
        assert sorted(p.name for p in (work / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
        exports.append(weights(work))
    assert max_diff(exports[0], exports[1]) < 1e-4
    assert max_diff(exports[0], exports[2]) < 1e-5


def test_ds_config_default_file_matches_builtin():
    from minima.train.ds_config import DEFAULT_DS_CONFIG

    root = Path(__file__).resolve().parents[1]
    assert json.loads((root / "ds_config.json").read_text()) == DEFAULT_DS_CONFIG


def test_ds_config_resolution_and_errors(tmp_path, model_dir):
    from minima.train.ds_config import resolve_ds_config

    cfg = base_cfg(
        model_dir,
        tmp_path / "o",
        micro_batch_size=4,
        gradient_accumulation_steps=8,
        lr=3e-5,
        warmup_proportion=0.01,
        min_lr_ratio=0.1,
        grad_clip=1.0,
        zero_stage=None,
    )
    cfg = cfg.model_copy(update={"precision": "bf16"})
    ds = resolve_ds_config(cfg, world_size=32, total_steps=1000, on_gpu=True, hidden_size=4096)
    assert ds["train_batch_size"] == 4 * 8 * 32 and ds["gradient_accumulation_steps"] == 8
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95] and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 10 and ds["scheduler"]["params"]["cos_min_ratio"] == 0.1
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 4096**2
    # bf16 is the default precision; on CPU it becomes fp32 unless asked for
    cpu = SyntheticConfig(model=str(model_dir), out_dir=str(tmp_path / "o"))
    assert resolve_ds_config(cpu, world_size=1, total_steps=10, on_gpu=False)["bf16"]["enabled"] is False

    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(ConfigError, match=r"bad.json:2"):
        resolve_ds_config(
            base_cfg(model_dir, tmp_path / "o", ds_config=str(bad)), world_size=1, total_steps=10, on_gpu=False
        )
    with pytest.raises(InputError, match="not found"):
        resolve_ds_config(
            base_cfg(model_dir, tmp_path / "o", ds_config=str(tmp_path / "nope.json")),
            world_size=1,
            total_steps=10,
            on_gpu=False,
        )
    extra = tmp_path / "extra.json"
    extra.write_text(
        '{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", '
        '"train_batch_size": "auto", "foo": {"bar": "auto"}}'
    )
    with pytest.raises(ConfigError, match="foo.bar"):
        resolve_ds_config(
            base_cfg(model_dir, tmp_path / "o", ds_config=str(extra)), world_size=1, total_steps=10, on_gpu=False
        )


def test_mfu_and_step_line(tmp_path, caplog):
    """MFU = (6N + 12*L*d*T) * tokens/s / (peak * devices), with the peak table's numbers."""
    import logging
    from types import SimpleNamespace

    from minima.train.metrics import MetricsLogger, device_peak_flops, flops_per_token

    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and device_peak_flops("Tesla T4") is None
    fpt = flops_per_token(SimpleNamespace(num_hidden_layers=32, hidden_size=4096), 6.5e9, 4096)
    assert fpt == 6 * 6.5e9 + 12 * 32 * 4096 * 4096
    m = MetricsLogger(tmp_path, True, total_steps=10, flops_per_token=fpt, peak_flops=989e12, world_size=8)
    with caplog.at_level(logging.INFO, logger="minima"):
        rec = m.train_step(1, 2.5, 3e-4, 0.75, tokens=8 * 4096 * 4, step_time=2.0)
    m.close()
    assert rec["mfu"] == pytest.approx(fpt * (8 * 4096 * 4 / 2.0) / (989e12 * 8), rel=1e-3)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/10")][0]
    assert "gnorm 0.75" in line and "mfu " in line and "eta " in line and "tok/s 66k" in line
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["grad_norm"] == 0.75


class StopAtStepRecipe(SyntheticRecipe):
    """Fails on its ``stop_at``-th train batch while ``stop_at`` is set (an interrupted run)."""

    stop_at = 0
    calls = 0

    def compute_loss(self, model, batch, ctx, train):
        if train and StopAtStepRecipe.stop_at:
            StopAtStepRecipe.calls += 1
            if StopAtStepRecipe.calls == StopAtStepRecipe.stop_at:
                raise TrainingError("interrupted on purpose")
        return super().compute_loss(model, batch, ctx, train)


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_damaged_newest_checkpoint_is_set_aside_and_resume_falls_back(model_dir, tmp_path, strategy):
    """The newest checkpoint loses bytes after its marker was written: the rerun renames it ``.corrupt``,
    resumes from the one before, and ends bitwise equal to an uninterrupted run; with every checkpoint
    damaged it starts over, still ending equal."""
    recipe = f"{__name__}:StopAtStepRecipe"
    kw = dict(save_steps=2, keep_last=2, max_steps=6, strategy=strategy)
    StopAtStepRecipe.stop_at = 0
    _, ref = train_inprocess(base_cfg(model_dir, tmp_path / "ref", **kw), recipe=recipe)

    for damage_all in (False, True):
        out = tmp_path / f"run{int(damage_all)}"
        StopAtStepRecipe.stop_at, StopAtStepRecipe.calls = 5, 0  # dies in step 5: checkpoints 2 and 4 exist
        with pytest.raises(TrainingError):
            train_inprocess(base_cfg(model_dir, out, **kw), recipe=recipe)
        ckpts = out.parent / (out.name + ".partial") / "checkpoints"
        victims = ["step_00000002", "step_00000004"] if damage_all else ["step_00000004"]
        for name in victims:
            biggest = max((f for f in (ckpts / name).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
            with open(biggest, "r+b") as f:
                f.truncate(biggest.stat().st_size // 2)
        StopAtStepRecipe.stop_at = 0
        metrics, got = train_inprocess(base_cfg(model_dir, out, **kw), recipe=recipe)
        assert metrics["steps"] == 6
        assert all((got / "checkpoints" / f"{name}.corrupt").is_dir() for name in victims)  # published with it
        w_ref, w_got = weights(ref), weights(got)
        assert w_ref.keys() == w_got.keys() and all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)


def test_loss_makes_no_host_sync(model_dir, monkeypatch):
    """compute_loss (LM and packed SFT paths, seq2seq CE) reads nothing back to the host: on a GPU each
    int(t) / t.item() would stall the loop on every micro step. Counted by patching the read-back methods."""
    from minima.data.packing import collate_packed, pack
    from minima.stages.sft import SftRecipe
    from minima.testing import tiny_llama
    from minima.train.recipe import Recipe, TrainContext

    model = tiny_llama(128, seed=0, **SHAPE)
    ctx = TrainContext(0, 1, 0, torch.device("cpu"), torch.float32, Path("."), Path("."), 0)
    batch = pad_collate([SyntheticDataset(8, 16, 128, 0, 0, 1, True).example(i) for i in range(4)], 0)
    docs = [{"input_ids": torch.arange(3, 3 + n), "labels": torch.arange(3, 3 + n)} for n in (5, 7, 4)]
    packed = collate_packed(list(pack(docs, 16)), 0)
    import minima

    package = Path(minima.__file__).resolve().parent
    reads = []

    def counted(name):
        orig = getattr(torch.Tensor, name)

        def read(self, *a):
            caller = sys._getframe(1).f_code.co_filename
            # minima's own code (transformers' mask checks are its own, wherever the checkout lives)
            if Path(caller).resolve().is_relative_to(package):
                reads.append(f"{name} in {caller}")
            return orig(self, *a)

        return read

    for name in ("item", "__int__", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    base = Recipe.compute_loss(Recipe.__new__(Recipe), model, batch, ctx, train=True)
    sft = SftRecipe.__new__(SftRecipe)
    sft.seq2seq = False
    packed_out = sft.compute_loss(model, packed, ctx, train=True)
    monkeypatch.undo()
    assert reads == [], reads
    assert int(base.num_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    assert int(packed_out.num_tokens) == int((packed["labels"][:, 1:] != -100).sum())


def test_attn_implementation_on_every_stage_config(model_dir, tmp_path):
    from pydantic import ValidationError

    from minima.core.config import (
        AdaptConfig,
        DistillCacheConfig,
        DistillConfig,
        EvaluateConfig,
        PruneConfig,
        SftConfig,
    )
    from minima.train.model_init import load_pretrained
    from minima.train.recipe import TrainContext

    for cls in (AdaptConfig, DistillConfig, SftConfig, PruneConfig, EvaluateConfig, DistillCacheConfig):
        assert cls(attn_implementation="flash_attention_2").attn_implementation == "flash_attention_2"
        with pytest.raises(ValidationError):
            cls(attn_implementation="flash3")
    ctx = TrainContext(0, 1, 0, torch.device("cpu"), torch.float32, tmp_path, tmp_path, 0)
    for impl in ("eager", "sdpa"):
        cfg = base_cfg(model_dir, tmp_path / "o", attn_implementation=impl)
        assert load_pretrained(model_dir, cfg, ctx).config._attn_implementation == impl


def test_compile_true_compiles_each_block(model_dir, tmp_path, monkeypatch):
    """compile=true compiles each transformer block before the strategy wraps the model; a compiled block
    computes what the plain one does (the "eager" dynamo backend: no C++ toolchain; GPUs use inductor)."""
    import torch._dynamo

    from minima.testing import tiny_llama
    from minima.train import model_init

    plain, compiled = tiny_llama(128, seed=0, **SHAPE), tiny_llama(128, seed=0, **SHAPE)
    assert model_init.compile_blocks(compiled, "eager") == SHAPE["num_hidden_layers"]
    x = torch.randint(3, 128, (2, 12))
    torch.testing.assert_close(compiled(input_ids=x).logits, plain(input_ids=x).logits)
    torch._dynamo.reset()
    model_init.configure_backends(torch.device("cpu"))  # no-op off GPU
    seen = []
    monkeypatch.setattr(model_init, "compile_blocks", lambda m, backend=None: seen.append(type(m).__name__))
    train_inprocess(base_cfg(model_dir, tmp_path / "c", compile=True, max_steps=1, seq_len=8, num_examples=16))
    assert seen == ["LlamaForCausalLM"]


def test_a_disk_estimate_over_the_free_space_stops_before_launch(model_dir, tmp_path, monkeypatch):
    """The plan's disk estimate (checkpoints with optimizer state + export) is checked against free space
    before anything is created; ``--force`` skips the check."""
    import minima.core.artifacts as artifacts
    from minima.core.errors import DiskFullError

    monkeypatch.setattr(artifacts, "_free_bytes", lambda path: 1000)
    cfg = base_cfg(model_dir, tmp_path / "out")
    with pytest.raises(DiskFullError, match="needs about"):
        train_inprocess(cfg)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [0, 7, 64])
def test_lm_loss_and_gradient_equal_fp32_cross_entropy(dtype, chunk):
    """The vocab-chunked LM loss: sum, count and logit gradient equal fp32 cross_entropy on shifted labels,
    masked positions included, for chunks that divide the vocab, do not, or span it."""
    from minima.train import causal_lm_loss_sum

    g = torch.Generator().manual_seed(0)
    vocab = 200
    logits = (torch.randn(3, 17, vocab, generator=g) * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (3, 17), generator=g)
    labels[0, :5] = -100
    labels[2, 9:] = -100
    loss, n = causal_lm_loss_sum(logits, labels, chunk=chunk)
    (grad,) = torch.autograd.grad(loss * 0.5, logits)
    ref_logits = logits.detach().float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(
        ref_logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    (ref_grad,) = torch.autograd.grad(ref * 0.5, ref_logits)
    assert int(n) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=4e-3)
    torch.testing.assert_close(grad.float(), ref_grad, **tol)
    assert grad.dtype == dtype and not grad[:, -1].any()  # the last position predicts nothing
