"""Prune for every supported family: identity at the teacher's own shape, a smaller target that reloads
as the same family and runs, tied embeddings kept tied, and unsupported families refused up front."""

from __future__ import annotations

import pytest
import torch

from minima.compress.prune import FAMILIES, head_dim, prune_model
from minima.core.errors import InputError

VOCAB = 128
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attn_implementation="eager",
)


def family_config(family: str):
    """A tiny random config of each family with the feature that family adds over LLaMA-2."""
    import transformers as tf

    if family == "llama":  # Llama-3: GQA + llama3 rope scaling
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
        return tf.LlamaConfig(**BASE, rope_parameters=rope)
    if family == "mistral":
        return tf.MistralConfig(**BASE, sliding_window=16)
    if family == "qwen2":  # Qwen2.5-small: q/k/v biases and tied embeddings
        return tf.Qwen2Config(**BASE, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norms, head_dim 32 != hidden 64 / 4 heads
        return tf.Qwen3Config(**dict(BASE, head_dim=32), tie_word_embeddings=True)
    raise ValueError(family)


def family_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family))
    with torch.no_grad():  # random biases / norm weights, so that slicing them wrongly shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model.eval()


def _calib(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 24), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_to_the_teachers_own_shape_is_the_identity(family):
    teacher = family_model(family)
    student, report = prune_model(teacher, _calib(), {})
    assert type(student) is type(teacher)
    ids = _calib(1, seed=7)[0]["input_ids"]
    with torch.no_grad():
        a, b = teacher(ids).logits, student(ids).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert report.params_after == report.params_before


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smaller_target_reloads_as_the_same_family_and_runs(family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = family_model(family)
    target = dict(num_layers=2, num_heads=2, num_key_value_heads=1, intermediate_size=64, hidden_size=48)
    student, report = prune_model(teacher, _calib(), target)
    student.save_pretrained(str(tmp_path))
    cfg = AutoConfig.from_pretrained(str(tmp_path))
    assert cfg.model_type == family
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(back) is type(teacher)
    assert (back.config.num_hidden_layers, back.config.num_attention_heads, back.config.hidden_size) == (2, 2, 48)
    assert head_dim(back.config) == head_dim(teacher.config)  # kept, also where it differs from hidden/heads
    ids = _calib(1, seed=7)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(back(ids).logits).all()
    if teacher.config.tie_word_embeddings:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    if family == "llama":
        assert back.config.rope_parameters["rope_type"] == "llama3"
    if family == "qwen2":  # biases follow their kept rows
        kv = report.plan.kv_groups[0]
        hd = teacher.config.hidden_size // teacher.config.num_attention_heads
        layer = report.plan.layers[0]
        want = teacher.model.layers[layer].self_attn.k_proj.bias.view(-1, hd)[kv].flatten()
        torch.testing.assert_close(back.model.layers[0].self_attn.k_proj.bias, want)


def test_head_pruning_of_a_qwen2_teacher_equals_the_teacher_with_those_kv_groups_zeroed():
    """Biases included: the kept heads' q/k/v biases must follow them, the dropped ones' must go."""
    teacher = family_model("qwen2")
    student, report = prune_model(teacher, _calib(), {"num_heads": 2, "num_key_value_heads": 1})
    c, hd = teacher.config, teacher.config.hidden_size // teacher.config.num_attention_heads
    handles = []
    for i, layer in enumerate(teacher.model.layers):
        m = torch.zeros(c.num_attention_heads)
        m[report.plan.heads[i]] = 1
        hm = m.repeat_interleave(hd)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, a, hm=hm: (a[0] * hm,)))
    ids = _calib(1, seed=7)[0]["input_ids"]
    try:
        with torch.no_grad():
            ref = teacher(ids).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_an_unsupported_family_is_refused_with_the_supported_list():
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(InputError) as e:
        prune_model(model, None, {}, importance="magnitude")
    msg = str(e.value)
    assert "gpt2" in msg and all(f in msg for f in FAMILIES)


def test_stage_prunes_a_qwen3_dir_and_refuses_gpt2_before_loading(tmp_path):
    import transformers as tf

    from minima.core.config import PruneConfig
    from minima.stages.prune import run

    teacher = family_model("qwen3")
    teacher.save_pretrained(str(tmp_path / "qwen3"))
    art = run(
        PruneConfig(
            teacher=str(tmp_path / "qwen3"),
            out_dir=str(tmp_path / "out"),
            importance="magnitude",
            keep_layers=[0, 2],
            num_heads=2,
            hidden_size=48,
        )
    )
    back = tf.AutoModelForCausalLM.from_pretrained(str(art.path))
    assert type(back) is tf.Qwen3ForCausalLM and back.config.num_hidden_layers == 2
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        str(tmp_path / "gpt2")
    )
    with pytest.raises(InputError, match="prune handles llama, mistral, qwen2, qwen3"):
        run(PruneConfig(teacher=str(tmp_path / "gpt2"), out_dir=str(tmp_path / "x"), importance="magnitude"))
    assert not (tmp_path / "x").exists()


def test_magnitude_importance_of_a_qwen2_head_counts_its_biases():
    from minima.compress.importance import calibrate

    teacher = family_model("qwen2")
    imp = calibrate(teacher, None, "magnitude", block_influence=False)
    a, hd = teacher.model.layers[1].self_attn, head_dim(teacher.config)
    G = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    sq = lambda t: float(t.detach().double().pow(2).sum())
    for h in range(teacher.config.num_attention_heads):
        q, g = slice(h * hd, (h + 1) * hd), slice((h // G) * hd, (h // G + 1) * hd)
        kv = sq(a.k_proj.weight[g]) + sq(a.k_proj.bias[g]) + sq(a.v_proj.weight[g]) + sq(a.v_proj.bias[g])
        ref = sq(a.q_proj.weight[q]) + sq(a.q_proj.bias[q]) + sq(a.o_proj.weight[:, q]) + kv / G
        assert imp.heads[1, h].item() == pytest.approx(ref, rel=1e-5)
