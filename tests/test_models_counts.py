"""minima.models.counts: parameter counts of configs against built models, and the FLOP formula by hand."""

from types import SimpleNamespace

import pytest

from minima.core.presets import TINY_TEACHER
from minima.models.counts import count_params, flops_per_token, non_embedding_params
from minima.train.plan import llama_config


@pytest.mark.parametrize("tied", [False, True])
def test_config_counts_equal_the_built_model(tied):
    from transformers import LlamaForCausalLM

    cfg = llama_config(TINY_TEACHER, 1000)
    cfg.tie_word_embeddings = tied
    model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert count_params(cfg) == count_params(model) == total
    emb = 1000 * TINY_TEACHER["hidden_size"]
    assert non_embedding_params(cfg) == non_embedding_params(model) == total - emb
    # untied: the lm_head is a matmul and stays in N; tied: it is the embedding and is left out
    assert (total - non_embedding_params(cfg) == emb) and (
        model.lm_head.weight is model.model.embed_tokens.weight
    ) == tied


def test_encoder_decoder_config_is_counted_as_seq2seq():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    assert count_params(cfg) == sum(p.numel() for p in T5ForConditionalGeneration(cfg).parameters())


def test_flops_per_token_by_hand():
    cfg = SimpleNamespace(num_hidden_layers=32, hidden_size=4096)
    n, seq = 6_607_343_616, 4096
    assert flops_per_token(cfg, n, seq) == 6 * n + 12 * 32 * 4096 * seq
    assert flops_per_token(cfg, n, seq, backward=False) == 2 * n + 4 * 32 * 4096 * seq
    assert flops_per_token(SimpleNamespace(), n, seq) == 6 * n  # configs without layers count only 6N
