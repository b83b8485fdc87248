"""NEFTune: noise of the right size in training forward passes only; eval and generate untouched."""

from __future__ import annotations

import math

import pytest
import torch

from minima.core.config import LoraConfig
from minima.testing import tiny_llama
from minima.train.lora import apply_lora
from minima.train.neftune import attach_neftune, detach_neftune


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: on a shared 2-core machine a second thread makes tiny models ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    attention_dropout=0.0,
)


def test_noise_only_in_training_and_of_the_right_scale():
    model = tiny_llama(200, seed=0, **SMALL)
    ref = tiny_llama(200, seed=0, **SMALL)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    emb = model.get_input_embeddings()
    clean = emb(ids).detach()
    alpha = 5.0
    attach_neftune(model, alpha)

    emb.train()
    noisy = emb(ids).detach()
    noise = noisy - clean
    bound = alpha / math.sqrt(16 * 64)
    assert noise.abs().max() <= bound + 1e-6
    # Uniform(-b, b) has std b / sqrt(3); 2048 draws pin it to a few percent.
    assert abs(noise.std().item() - bound / math.sqrt(3)) < 0.1 * bound

    # Training forward changes, eval forward and greedy generation do not.
    model.train(), ref.train()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=0, rtol=0)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))

    detach_neftune(model)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=0, rtol=0)


def test_neftune_on_a_peft_model():
    model = apply_lora(tiny_llama(200, seed=0, **SMALL), LoraConfig(enabled=True, r=2, dropout=0.0))
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    attach_neftune(model, 10.0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, clean, atol=0, rtol=0)
        model.train()
        assert not torch.allclose(model(input_ids=ids).logits, clean, atol=1e-4)
