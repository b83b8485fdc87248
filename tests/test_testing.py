import torch

from minima.testing import tiny_llama


def test_tiny_llama_is_deterministic_and_isolated():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_llama(300, seed=7)
    b = tiny_llama(300, seed=7)
    after = torch.rand(1)
    assert before == after  # building a model does not disturb the caller's RNG
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = tiny_llama(300, seed=8)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tiny_fixtures_load(tiny_model_dir, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size == len(tok)
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
