"""LoRA wrapping: merged == peft logits, only adapters move, clear errors, adapter/merged export."""

from __future__ import annotations

import pytest
import torch

from minima.core.config import LoraConfig
from minima.core.errors import ConfigError
from minima.testing import tiny_family_model, tiny_llama
from minima.train.lora import (
    apply_lora,
    check_qlora,
    export_lora,
    load_adapter,
    module_names,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: on a shared 2-core machine a second thread makes tiny models ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def _train_steps(model, steps=3, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, vocab, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_lora_trains_only_adapters_and_merged_logits_match(tmp_path):
    base = tiny_llama(200, seed=0, **SMALL)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # MiniMA's default set: every projection of both layers gets A and B.
    assert len(trainable) == 2 * 7 * 2 and all("lora_" in n for n in trainable)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train_steps(model)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(moved) == len(trainable)  # every adapter weight moved (B starts at zero, so A and B both need steps)
    base_now = model.get_base_model().state_dict()
    for k, v in before.items():
        key = (
            k.replace(".weight", ".base_layer.weight")
            if k.rsplit(".", 2)[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            else k
        )
        assert torch.equal(base_now[key], v), f"base weight {k} changed"

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
        base_logits = tiny_llama(200, seed=0, **SMALL)(input_ids=ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4)  # the adapters do something

    merged_dir = export_lora(model, tmp_path / "merged", merge=True)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_logits, atol=1e-5, rtol=1e-4)


def test_adapter_dir_reloads_on_its_base(tmp_path):
    base = tiny_llama(200, seed=0, **SMALL)
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir))
    model = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"]))
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())
    _train_steps(model, steps=2)
    out = export_lora(model, tmp_path / "adapter", merge=False, base_model=str(base_dir))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    again = load_adapter(out).eval()
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_missing_target_lists_linear_modules():
    bloom = tiny_family_model("bloom", 100)
    with pytest.raises(ConfigError) as e:
        apply_lora(bloom, LoraConfig(enabled=True))
    msg = str(e.value)
    assert "q_proj" in msg and "query_key_value" in msg and "dense_h_to_4h" in msg
    assert module_names(bloom) == sorted(["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        apply_lora(tiny_llama(100, **SMALL), LoraConfig(enabled=True, modules_to_save=["no_such_head"]))


@pytest.mark.parametrize(
    "family,targets",
    [("bloom", ["query_key_value", "dense"]), ("opt", ["q_proj", "v_proj", "fc1"]), ("t5", ["q", "v", "wi"])],
)
def test_other_families_wrap(family, targets):
    base = tiny_family_model(family, 100)
    total = sum(p.numel() for p in base.parameters())
    # By hand: each targeted Linear gets A (r x in) and B (out x r); nothing else trains.
    r = 2
    hand = sum(
        r * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets
    )
    n_targets = sum(1 for name, _ in base.named_modules() if name.split(".")[-1] in targets)
    assert hand > 0 and n_targets >= 2
    model = apply_lora(base, LoraConfig(enabled=True, r=r, target_modules=targets))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == hand
    assert model.get_nb_trainable_parameters() == (hand, total + hand)
    assert sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A")) == n_targets


def test_qlora_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="(bitsandbytes|GPU)"):
        check_qlora(LoraConfig(enabled=True, qlora=True))
    check_qlora(LoraConfig(enabled=True, qlora=False))
