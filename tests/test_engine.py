"""The generation engine against Hugging Face: greedy equals ``model.generate`` prompt by prompt, sampling
equals a step-by-step softmax/multinomial reference, and batching changes no request's output."""

from __future__ import annotations

import threading

import pytest
import torch

from minima.infer.engine import Engine, SamplingParams, cut_at_stop

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
TEXTS = [
    "The old fisherman went out",
    "Once upon a time in a land far away there lived a king who had three daughters",
    "a",
    "Tell me a story about the sea",
    "Hello world, this is a test of the batching engine with a longer prompt than most",
    "Rain",
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def model(tok):
    from minima.testing import tiny_llama

    return tiny_llama(len(tok), seed=0, initializer_range=0.2, **SHAPE)  # peaked enough for temperature to matter


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


def hf_greedy(model, tok, ids: list[int], max_new: int) -> list[int]:
    """Reference: HF generate on the prompt alone, with the generated ids cut before EOS."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id
        )
    new = out[0, len(ids) :].tolist()
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def reference_sample(model, ids: list[int], max_new: int, temperature: float, seed: int) -> list[int]:
    """Reference: full forward per step, ``multinomial(softmax(logits / T))`` with a generator seeded ``seed``.

    Stops before EOS."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            t = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[0])
            if t == model.config.eos_token_id:
                break
            new.append(t)
            ids.append(t)
    return new


def test_greedy_batch_equals_hf_generate_per_prompt_with_stop_strings(model, tok, prompts):
    max_new = 24
    refs = [hf_greedy(model, tok, p, max_new) for p in prompts]
    texts = [tok.decode(r, skip_special_tokens=True) for r in refs]
    # Stop strings taken from the middle of two reference outputs, so they really end those sequences.
    stop = tuple(t[len(t) // 2 : len(t) // 2 + 2] for t in texts[:2])
    assert all(s.strip() for s in stop)
    # Three rows for six prompts: prompts join the running batch as others finish (mixed lengths, left padding).
    engine = Engine(model, tok, max_batch_size=3)
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=max_new))
    assert [o[0].token_ids for o in plain] == refs
    assert [o[0].text for o in plain] == texts
    assert [o[0].finish_reason for o in plain] == ["length" if len(r) == max_new else "stop" for r in refs]
    assert engine.stats["peak_batch"] == 3 and engine.stats["batched_steps"] > 0

    cut = engine.generate(prompts, SamplingParams(max_new_tokens=max_new, stop=stop, n=2))
    want = [cut_at_stop(t, stop) for t in texts]
    assert [t.split(stop[0])[0].split(stop[1])[0] for t in texts] == want  # lm-eval's rule, by hand
    assert [[c.text for c in o] for o in cut] == [[w, w] for w in want]
    assert cut[0][0].finish_reason == "stop" and len(cut[0][0].token_ids) < max_new
    assert sum(w != t for w, t in zip(want, texts)) >= 2


def test_streamed_deltas_join_to_the_final_text(model, tok, prompts):
    engine = Engine(model, tok)
    full = engine.generate([prompts[1]], SamplingParams(max_new_tokens=30))[0][0].text
    at = next(
        k for k in range(len(full) // 2, len(full)) if full.find(full[k : k + 3]) == k and full[k : k + 3].strip()
    )
    stop = (full[at : at + 3],)
    events = list(engine.stream(prompts[1], SamplingParams(max_new_tokens=30, stop=stop)))
    assert "".join(e.text for e in events) == full[: full.find(stop[0])]
    assert sum(1 for e in events if e.text) > 3 and events[-1].finish_reason == "stop"
    assert all(e.finish_reason is None for e in events[:-1])


def test_sampling_equals_the_reference_and_temperature_matters(model, tok, prompts):
    engine = Engine(model, tok, max_batch_size=8)
    for temperature in (0.7, 1.5):
        for seed in (1, 2):
            got = engine.generate([prompts[0]], SamplingParams(max_new_tokens=6, temperature=temperature, seed=seed))
            assert got[0][0].token_ids == reference_sample(model, prompts[0], 6, temperature, seed)
    # The same seeds at another temperature give other tokens: an engine ignoring temperature fails above.
    low = [reference_sample(model, prompts[0], 6, 0.7, s) for s in (1, 2)]
    high = [reference_sample(model, prompts[0], 6, 1.5, s) for s in (1, 2)]
    assert low != high
    greedy = engine.generate([prompts[0]], SamplingParams(max_new_tokens=6))[0][0].token_ids
    assert high[0] != greedy and high[1] != greedy


def test_seed_fixes_samples_whatever_the_batch(model, tok, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, n=3)
    alone = Engine(model, tok).generate([prompts[3]], params)[0]
    # In a crowded batch (other prompts, other seeds, some greedy), joining mid-way.
    others = [SamplingParams(max_new_tokens=n, temperature=t, seed=s) for n, t, s in [(5, 1.0, 1), (20, 0.0, 0)]]
    crowded = Engine(model, tok, max_batch_size=4).generate([prompts[0], prompts[1], prompts[3]], [*others, params])[2]
    assert [c.token_ids for c in crowded] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in alone}) == 3  # the n choices are separate samples
    other_seed = Engine(model, tok).generate([prompts[3]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert other_seed[0][0].token_ids != alone[0].token_ids
    # Choice 0 of a request with n choices is the n=1 sample of the same seed.
    one = Engine(model, tok).generate([prompts[3]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=7))
    assert one[0][0].token_ids == alone[0].token_ids


def test_tiny_top_p_is_greedy(model, tok, prompts):
    engine = Engine(model, tok)
    greedy = engine.generate(prompts[:3], SamplingParams(max_new_tokens=16))
    nucleus = engine.generate(prompts[:3], SamplingParams(max_new_tokens=16, temperature=1.5, top_p=1e-6, seed=3))
    hot = engine.generate(prompts[:3], SamplingParams(max_new_tokens=16, temperature=1.5, seed=3))
    assert [o[0].token_ids for o in nucleus] == [o[0].token_ids for o in greedy]
    assert [o[0].token_ids for o in hot] != [o[0].token_ids for o in greedy]


def test_concurrent_callers_are_batched_and_get_their_solo_output(model, tok, prompts):
    solo = [Engine(model, tok).generate([p], SamplingParams(max_new_tokens=16))[0][0].text for p in prompts]
    engine = Engine(model, tok, max_batch_size=8)
    results: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        start.wait()
        results[i] = engine.submit(prompts[i], SamplingParams(max_new_tokens=16)).result(60)[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(prompts))] == solo
    assert engine.stats["peak_batch"] > 1
    assert engine.stats["forward_calls"] < len(prompts) * 16  # fewer than one pass per request per token


def test_long_request_does_not_hold_up_short_ones(model, tok, prompts):
    engine = Engine(model, tok, max_batch_size=2)
    long = engine.submit(prompts[0], SamplingParams(max_new_tokens=400, ignore_eos=True))
    shorts = [engine.submit(p, SamplingParams(max_new_tokens=3)) for p in prompts[1:4]]
    for s in shorts:
        s.result(60)
    assert not long.done  # three short requests came and went through the second row
    long.cancel()
    assert long.result(60)[0].finish_reason == "cancelled"
    assert engine.stats["peak_batch"] == 2


def test_generate_until_matches_hf_generate(model, tok):
    from minima.evaluate.lm import LM

    contexts = ["Question: what is two plus two?\nAnswer:", "The sea", "Once upon a time, in a land far away,"]
    lm = LM(model, tok, batch_size=2)
    refs = [tok.decode(hf_greedy(model, tok, lm.tok_encode(c), 20), skip_special_tokens=True) for c in contexts]
    until = [refs[0][5:7], "\n\n"]
    got = lm.generate_until(contexts, until=until, max_new_tokens=20)
    assert got == [[cut_at_stop(r, until)] for r in refs]
    assert got[0][0] == refs[0][: refs[0].find(until[0])]
    sampled = lm.generate_until(contexts, until=[], max_new_tokens=8, do_sample=True, num_samples=2, seed=5)
    again = LM(model, tok, batch_size=1).generate_until(
        contexts, until=[], max_new_tokens=8, do_sample=True, num_samples=2, seed=5
    )
    assert sampled == again and sampled[0][0] != sampled[0][1]


def tiny_t5(tok):
    """A tiny random T5 whose special ids are the tokenizer's (pad 0 starts the decoder)."""
    from minima.testing import tiny_family_model

    model = tiny_family_model("t5", len(tok), seed=0)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval()


def test_encoder_decoder_batched_greedy_and_sampling_equal_hf(tok, prompts):
    """A T5 through the engine: greedy equals HF generate prompt by prompt, whatever the batch size;
    n sampled choices are seeded like a causal model's."""
    model = tiny_t5(tok)
    refs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
        new = out[0, 1:].tolist()  # after the decoder start token
        refs.append(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    assert any(len(r) > 3 for r in refs)
    for size in (1, 4):
        engine = Engine(model, tok, max_batch_size=size)
        got = engine.generate(prompts, SamplingParams(max_new_tokens=10))
        assert [c[0].token_ids for c in got] == refs
        engine.close()
    engine = Engine(model, tok, max_batch_size=8)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=7)
    a = engine.generate(prompts[:2], params)
    b = Engine(model, tok, max_batch_size=1).generate(prompts[:2], params)
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    assert len({tuple(c.token_ids) for c in a[0]}) > 1


def test_chat_replies_batched_equal_hf_and_the_terminal_chat(tiny_model_dir, monkeypatch, capsys):
    from minima.infer import chat

    convs = [[{"role": "user", "content": q}] for q in ("What is the sea?", "Name a river.", "你好")]
    replies = chat.generate_replies(str(tiny_model_dir), convs, max_new_tokens=12)
    engine = chat._engine(str(tiny_model_dir))
    refs = [hf_greedy(engine.model, engine.tok, engine.chat_ids(c), 12) for c in convs]
    assert replies == [engine.tok.decode(r, skip_special_tokens=True).strip() for r in refs]
    assert chat.generate_reply(str(tiny_model_dir), convs[1], max_new_tokens=12) == replies[1]

    lines = iter(["Name a river.", ""])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert chat.main([f"model={tiny_model_dir}", "max_new_tokens=12"]) == 0
    assert f"bot> {replies[1]}\n" in capsys.readouterr().out
