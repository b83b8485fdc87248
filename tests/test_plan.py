"""`minima plan`: parameter counts vs real models, the activation formula vs the tensors autograd
saves, DeepSpeed model-state arithmetic, the verdict, the CLI, and the predicted peak vs a measured run."""

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from minima.core.presets import LLAMA2_7B, MINIMA_3B, TINY_STUDENT, TINY_TEACHER
from minima.core.registry import stage_config
from minima.models.counts import count_params
from minima.train.plan import (
    PlanOptions,
    layer_activation_bytes,
    llama_config,
    lora_trainable,
    model_state_bytes,
    plan_stage,
    step_transient_bytes,
)


def test_meta_counts_equal_real_models():
    from transformers import LlamaForCausalLM

    for shape in (TINY_TEACHER, TINY_STUDENT, dict(TINY_TEACHER, num_key_value_heads=2)):
        cfg = llama_config(shape, 1000)
        real = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        assert count_params(cfg) == real


def test_llama_shapes():
    n7 = count_params(llama_config(LLAMA2_7B, 32000))
    assert n7 == 6_738_415_616  # LLaMA-2-7B, the published 6.74B
    n3 = count_params(llama_config(MINIMA_3B, 49216))
    assert abs(n3 - 3.02e9) < 0.01e9  # MiniMA-3B with its 49216-piece vocab


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from minima.core.config import LoraConfig as MinimaLora

    cfg = llama_config(TINY_TEACHER, 1000)
    ours = MinimaLora(enabled=True, r=4, modules_to_save=["lm_head"])
    model = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=4, lora_alpha=8, target_modules=ours.target_modules, modules_to_save=["lm_head"]),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_trainable(cfg, ours) == trainable


def test_zero_partitioning_arithmetic():
    n = 1_000_000
    z0 = model_state_bytes(n, n, "bf16", 0, 8)
    # without accumulation ZeRO-0/1/2 gradients live only from the backward to the step
    assert z0 == {"weights": 2 * n, "gradients": 0.0, "optimizer": 12 * n}
    z1 = model_state_bytes(n, n, "bf16", 1, 8, accumulation=4)
    assert z1["optimizer"] == 12 * n / 8 and z1["gradients"] == 2 * n
    z2 = model_state_bytes(n, n, "bf16", 2, 8, accumulation=4)
    assert z2["gradients"] == 2 * n / 8 and z2["weights"] == 2 * n
    z3 = model_state_bytes(n, n, "bf16", 3, 8)
    assert sum(z3.values()) == pytest.approx(16 * n / 8)  # the ZeRO paper's 16 bytes per parameter
    # fp32 on CPU: ZeRO still clones an fp32 partition (4) next to Adam's m and v (8)
    assert model_state_bytes(n, n, "fp32", 2, 1)["optimizer"] == 12 * n
    # optimizer step: fp32 grad copy + torch AdamW temporaries (2 on CPU, 1 on GPU); measured 12 B/param on CPU
    assert step_transient_bytes(n, "fp32", 2, 1, cpu=True) == step_transient_bytes(n, "fp32", 3, 1, cpu=True) == 12 * n
    assert step_transient_bytes(n, "bf16", 2, 8, cpu=False) == pytest.approx(8 * n / 8)


def _saved_bytes(model, run) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``run()`` executes."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layer_activations_equal_saved_tensors(precision):
    """The per-layer activation formula equals, byte for byte, what autograd saves in a real HF
    LlamaDecoderLayer (GQA), for sdpa and eager, full training and LoRA with and without dropout."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from minima.core.config import LoraConfig as MinimaLora

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    variants = [
        None,
        MinimaLora(enabled=True, r=4, dropout=0.05),
        MinimaLora(enabled=True, r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    ]
    for attn in ("sdpa", "eager"):
        for lora in variants:
            torch.manual_seed(0)
            cfg = llama_config(
                dict(
                    hidden_size=64,
                    intermediate_size=160,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    attn_implementation=attn,
                ),
                300,
            )
            model = LlamaForCausalLM(cfg)
            if lora is not None:
                model = get_peft_model(
                    model,
                    LoraConfig(r=lora.r, lora_alpha=8, lora_dropout=lora.dropout, target_modules=lora.target_modules),
                )
            model = model.to(dtype).train()  # DeepSpeed casts the whole module, adapters included
            base = model.base_model.model if lora is not None else model
            b, s = 2, 24
            x = torch.randn(b, s, 64, dtype=dtype, requires_grad=True)
            pos = torch.arange(s)[None].expand(b, s)
            rot = base.model.rotary_emb(x, pos)  # model-level, counted once outside the layers
            layer0 = functools.partial(
                base.model.layers[0], x, position_embeddings=rot, attention_mask=None, position_ids=pos
            )
            got = _saved_bytes(model, layer0)
            got -= sum(t.untyped_storage().nbytes() for t in rot)
            want = layer_activation_bytes(cfg, b * s, precision, attn=attn, micro_batch=b, lora=lora, cpu=True)
            assert want == got, (attn, lora, want, got)


def test_verdict_and_suggestions():
    cfg = stage_config(
        "adapt", "minima-3b", None, ["zero_stage=0", "activation_checkpointing=false", "micro_batch_size=8"]
    )
    plan = plan_stage(cfg, PlanOptions(device="a100", gpus=8), "minima-3b")
    assert not plan.fits and "does NOT fit" in plan.verdict()
    assert "zero_stage=3" in plan.suggestions and "activation_checkpointing=true" in plan.suggestions
    ok = plan_stage(stage_config("adapt", "minima-3b", None, []), PlanOptions(device="a100", gpus=32), "minima-3b")
    assert ok.fits and "fits with" in ok.verdict()


def test_plan_cli_prints_the_three_training_stages(capsys):
    from minima.cli import main

    assert main(["plan", "distill", "--preset", "minima-3b", "plan.gpus=16", "plan.tokens=126e9"]) == 0
    out = capsys.readouterr().out
    assert "3.02B" in out and "126.00B tokens" in out and "teacher weights" in out
    assert main(["plan", "adapt", "--preset", "minima-3b", "plan.nope=1"]) == 2


def _bench():
    spec = importlib.util.spec_from_file_location(
        "minima_bench_plan", Path(__file__).resolve().parents[1] / "benchmarks" / "plan.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs to reset the peak RSS"
)
def test_predicted_peak_within_20_percent_of_measured(tmp_path, tiny_tokenizer_dir):
    """adapt (the real AdaptRecipe on the engine, fp32 CPU, ZeRO-2) with activation checkpointing off
    and on, each in a fresh process: the plan's peak is within +-20% of the measured peak RSS (the
    full matrix: python benchmarks/plan.py)."""
    from concurrent.futures import ThreadPoolExecutor

    bench = _bench()
    models = bench.make_models(tmp_path, tiny_tokenizer_dir, names=("student",))
    specs = [
        dict(stage="adapt", zero=2, ckpt=ckpt, seq=128, steps=2, models=models, out=str(tmp_path / f"run{ckpt}"))
        for ckpt in (False, True)
    ]
    with ThreadPoolExecutor(2) as pool:  # two single-threaded processes, each with its own allocator
        measured = list(pool.map(lambda s: bench.measure(s, timeout=300)["measured"], specs))
    for spec, m in zip(specs, measured):
        predicted = bench.predict(spec)["total"]
        assert 0.8 <= predicted / m <= 1.2, (spec["ckpt"], predicted / 2**20, m / 2**20)


def test_engine_refuses_a_job_that_does_not_fit(tiny_model_dir, tmp_path):
    """The pre-launch check: the plan's table and suggestions in the error, and --force overrides."""
    from minima.core.config import AdaptConfig
    from minima.core.errors import PlanError
    from minima.train.launch import _check_plan

    cfg = AdaptConfig(
        model=str(tiny_model_dir), out_dir=str(tmp_path / "o"), precision="fp32", zero_stage=2, micro_batch_size=200_000
    )
    with pytest.raises(PlanError) as e:
        _check_plan(cfg, force=False)
    msg = str(e.value)
    assert "will not fit" in msg and "micro_batch_size<=" in msg and "GiB" in msg
    _check_plan(cfg, force=True)  # forced: a warning-free pass, the launch would go ahead
    _check_plan(cfg.model_copy(update={"micro_batch_size": 2}), force=False)  # a tiny job fits
    assert not (tmp_path / "o").exists()


def _fake_ram(monkeypatch, gib: float) -> None:
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=int(gib * 2**30)))


def test_remote_job_is_planned_for_its_gpus_not_this_host(tmp_path, monkeypatch):
    """A 4-node Slurm adapt of a 7B from a 24 GiB login node without a GPU: planned for 32 H100s, it fits;
    the same job run locally is checked against the host's RAM and refused; launch.gpu sets the memory."""
    from minima.core.config import AdaptConfig
    from minima.core.errors import PlanError
    from minima.train.launch import _check_plan

    _fake_ram(monkeypatch, 24)
    model = tmp_path / "llama7b"
    llama_config(LLAMA2_7B, 49216).save_pretrained(str(model))  # config.json only: planned on the meta device
    kw = dict(model=str(model), out_dir=str(tmp_path / "o"), zero_stage=3, activation_checkpointing=True)
    kw["micro_batch_size"] = 1
    slurm = AdaptConfig(**kw, launch={"launcher": "slurm", "nnodes": 4, "gpus_per_node": 8})
    _check_plan(slurm, force=False)  # 32 x H100-80G: fits
    with pytest.raises(PlanError, match="of 24 GiB"):
        _check_plan(AdaptConfig(**kw), force=False)  # local: the host's 24 GiB
    one = AdaptConfig(**kw, launch={"launcher": "slurm", "nnodes": 1, "gpus_per_node": 1, "gpu": "A100-40G"})
    with pytest.raises(PlanError, match="of 40 GiB"):
        _check_plan(one, force=False)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=8\nb slots=8\n")
    ssh = AdaptConfig(**kw, launch={"launcher": "ssh", "hostfile": str(hostfile), "nnodes": 2, "gpus_per_node": 8})
    _check_plan(ssh, force=False)
    assert not (tmp_path / "o").exists()


def test_plan_cli_uses_the_launch_block_for_slurm_jobs(capsys):
    from minima.cli import main

    assert main(["plan", "adapt", "--preset", "minima-3b", "launch.launcher=slurm", "launch.nnodes=4"]) == 0
    assert "32 x h100-80g" in capsys.readouterr().out
    args = ["launch.launcher=slurm", "launch.nnodes=2", "launch.gpu=A100-40G", "plan.gpus=4"]
    assert main(["plan", "adapt", "--preset", "minima-3b", *args]) == 0
    assert "4 x a100-40g" in capsys.readouterr().out  # plan.* wins over the launch block
