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
    lora_state,
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


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomise_adapters(model, seed=3):
    """Give every lora_B a random value (peft starts it at zero, which would hide the scaling)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_merged_weight_is_base_plus_alpha_over_r_times_b_a(tmp_path):
    r, alpha = 4, 16  # alpha/r = 4, not peft's default scale 8/4 = 2
    base = tiny_llama(200, seed=0, **SMALL)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoraConfig(enabled=True, r=r, alpha=alpha, dropout=0.0))
    _randomise_adapters(model)
    params = dict(model.named_parameters())
    out = export_lora(model, tmp_path / "new" / "merged", merge=True)  # a parent that does not exist yet
    from safetensors.torch import load_file

    merged = load_file(str(out / "model.safetensors"))
    checked = 0
    for k, w in before.items():
        parts = k.split(".")
        if len(parts) < 2 or parts[-2] not in PROJ:
            torch.testing.assert_close(merged[k], w, rtol=0, atol=0)  # untouched
            continue
        prefix = "base_model.model." + k[: -len(".weight")]
        a = params[f"{prefix}.lora_A.default.weight"].detach()
        b = params[f"{prefix}.lora_B.default.weight"].detach()
        torch.testing.assert_close(merged[k], w + (alpha / r) * (b @ a), atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked == 2 * len(PROJ)


def test_dropout_reaches_every_adapter():
    model = apply_lora(tiny_llama(200, seed=0, **SMALL), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.25))
    drops = [m["default"] for n, m in model.named_modules() if n.endswith(".lora_dropout")]
    assert len(drops) == 2 * len(PROJ)
    assert all(isinstance(d, torch.nn.Dropout) and d.p == 0.25 for d in drops)


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("gc", [None, False, True])
def test_a_4bit_flagged_model_goes_through_peft_kbit_preparation(gc):
    # On CPU there is no bitsandbytes: a bf16 model carrying the flag transformers sets on 4-bit loads is the
    # stand-in (the wrapper reads only that flag). The reference is peft's own k-bit preparation.
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    cfg = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)

    def flagged():
        m = tiny_llama(200, seed=0, **SMALL).to(torch.bfloat16)
        m.is_loaded_in_4bit = True
        return m

    kwargs = {} if gc is None else {"gradient_checkpointing": gc}
    model = apply_lora(flagged(), cfg, **kwargs)
    ref = prepare_model_for_kbit_training(flagged(), use_gradient_checkpointing=bool(gc))
    ref = get_peft_model(ref, PeftLoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=list(PROJ)))
    got = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    want = {n: (p.dtype, p.requires_grad) for n, p in ref.named_parameters()}
    assert got == want
    assert {d for d, _ in got.values()} == {torch.float32}  # the bf16 base weights were upcast
    assert _checkpointing(model) is bool(gc) and _checkpointing(ref) is bool(gc)

    plain = apply_lora(tiny_llama(200, seed=0, **SMALL).to(torch.bfloat16), cfg, **kwargs)
    base_dtypes = {p.dtype for n, p in plain.named_parameters() if "lora_" not in n}
    assert base_dtypes == {torch.bfloat16} and not _checkpointing(plain)  # an unflagged model is left as it is


def test_export_loads_a_given_adapter_state_first(tmp_path):
    cfg = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)
    trained = apply_lora(tiny_llama(200, seed=0, **SMALL), cfg)
    _randomise_adapters(trained)
    fresh = apply_lora(tiny_llama(200, seed=0, **SMALL), cfg)
    # Only the adapter weights (what a trainer gathers from shards); the base weights are the same already.
    out = export_lora(fresh, tmp_path / "merged", merge=True, state_dict=lora_state(trained))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = trained.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)


def test_adapter_config_is_peft_own_file_with_the_base_path(tmp_path):
    model = apply_lora(tiny_llama(200, seed=0, **SMALL), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    out = export_lora(model, tmp_path / "new" / "adapter", merge=False, base_model="/models/base")
    model.peft_config["default"].base_model_name_or_path = "/models/base"
    model.save_pretrained(str(tmp_path / "peft"))
    assert (out / "adapter_config.json").read_text() == (tmp_path / "peft" / "adapter_config.json").read_text()
