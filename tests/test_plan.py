import pytest
import torch

from minima.cli import stage_config
from minima.plan import PlanOptions, count_params, llama_config, lora_trainable, model_state_bytes, plan_stage
from minima.presets import LLAMA2_7B, MINIMA_3B, TINY_STUDENT, TINY_TEACHER


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

    from minima.config import LoraConfig as MinimaLora

    cfg = llama_config(TINY_TEACHER, 1000)
    ours = MinimaLora(enabled=True, r=4, modules_to_save=["lm_head"])
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=ours.target_modules, modules_to_save=["lm_head"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_trainable(cfg, ours) == trainable


def test_zero_partitioning_arithmetic():
    n = 1_000_000
    z0 = model_state_bytes(n, n, "bf16", 0, 8)
    assert z0 == {"weights": 2 * n, "gradients": 2 * n, "optimizer": 12 * n}
    z1 = model_state_bytes(n, n, "bf16", 1, 8)
    assert z1["optimizer"] == 12 * n / 8 and z1["gradients"] == 2 * n
    z2 = model_state_bytes(n, n, "bf16", 2, 8)
    assert z2["gradients"] == 2 * n / 8 and z2["weights"] == 2 * n
    z3 = model_state_bytes(n, n, "bf16", 3, 8)
    assert sum(z3.values()) == pytest.approx(16 * n / 8)


def test_verdict_and_suggestions():
    cfg = stage_config("adapt", "minima-3b", None, ["zero_stage=0", "activation_checkpointing=false", "micro_batch_size=8"])
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
