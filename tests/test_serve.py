"""``minima serve``: real HTTP on loopback with the official openai client, checked against HF generate."""

from __future__ import annotations

import json
import threading

import _chat_server as cs
import httpx
import pytest

openai = pytest.importorskip("openai")

Q = [{"role": "user", "content": "Tell me a story about the sea."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return cs.chat_model_dir(tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def srv(model_dir):
    return cs.server(model_dir)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key=cs.API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoTokenizer.from_pretrained(str(model_dir)), AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def _hf_greedy(hf, ids: list[int], max_new: int) -> tuple[str, int]:
    import torch

    tok, model = hf
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
    new = out[0, len(ids) :].tolist()
    if new and new[-1] == tok.eos_token_id:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=True), len(new)


def _name(model_dir) -> str:
    return model_dir.name


def test_models_and_greedy_chat_and_completion_match_hf_generate(client, model_dir, hf):
    ids = [m.id for m in client.models.list().data]
    assert ids == [_name(model_dir)]

    tok, _ = hf
    prompt_ids = tok(tok.apply_chat_template(Q, add_generation_prompt=True, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    want, n_new = _hf_greedy(hf, prompt_ids, 24)
    r = client.chat.completions.create(model=_name(model_dir), messages=Q, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == n_new
    assert r.choices[0].finish_reason == ("length" if n_new == 24 else "stop")

    text = "The old fisherman went out"
    want, n_new = _hf_greedy(hf, tok(text)["input_ids"], 12)
    c = client.completions.create(model=_name(model_dir), prompt=text, max_tokens=12, temperature=0)
    assert c.choices[0].text == want and c.usage.completion_tokens == n_new


def test_streaming_reassembles_to_the_non_streamed_text(client, model_dir):
    kw = dict(model=_name(model_dir), max_tokens=40, temperature=0)
    full = client.chat.completions.create(messages=Q, **kw)
    chunks = list(client.chat.completions.create(messages=Q, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and len(text) > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        full.choices[0].finish_reason
    ]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # really incremental
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and chunks[-1].choices == []

    full = client.completions.create(prompt="Once upon a time", **kw)
    parts = [c.choices[0].text for c in client.completions.create(prompt="Once upon a time", stream=True, **kw)]
    assert "".join(parts) == full.choices[0].text


def _hand_sample(hf, ids: list[int], max_new: int, temperature: float, seed: int) -> list[int]:
    """Full forward per step, ``multinomial(softmax(logits / T))`` from a generator seeded ``seed``; stops at EOS."""
    import torch

    tok, model = hf
    gen = torch.Generator().manual_seed(seed)
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            t = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[0])
            if t == tok.eos_token_id:
                break
            new.append(t)
            ids.append(t)
    return new


def test_sampling_parameters(client, model_dir, hf):
    kw = dict(model=_name(model_dir), messages=Q, max_tokens=16)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    a = client.chat.completions.create(temperature=1.0, seed=7, n=3, **kw)
    b = client.chat.completions.create(temperature=1.0, seed=7, n=3, **kw)
    c = client.chat.completions.create(temperature=1.0, seed=8, n=3, **kw)
    texts = [x.message.content for x in a.choices]
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert texts == [x.message.content for x in b.choices]  # the seed fixes the sample
    assert texts != [x.message.content for x in c.choices]
    assert len(set(texts)) > 1  # the n choices are separate samples
    # top_p this small keeps only the most likely token: sampling becomes greedy.
    assert (
        client.chat.completions.create(temperature=1.0, top_p=1e-6, seed=3, **kw).choices[0].message.content == greedy
    )

    # Temperature reaches the sampler: each sample equals multinomial(softmax(logits / T)) drawn by hand
    # with a generator seeded the same way, and the same seed at another temperature gives another text.
    tok, model = hf
    prompt_ids = tok(tok.apply_chat_template(Q, add_generation_prompt=True, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    by_t = {}
    for t in (0.5, 2.0):
        got = client.chat.completions.create(temperature=t, seed=11, **dict(kw, max_tokens=8))
        by_t[t] = got.choices[0].message.content
        assert by_t[t] == tok.decode(_hand_sample(hf, prompt_ids, 8, t, 11), skip_special_tokens=True), t
    assert by_t[0.5] != by_t[2.0]

    long = client.chat.completions.create(temperature=0, **dict(kw, max_tokens=40)).choices[0].message.content
    stop = long[len(long) // 2 : len(long) // 2 + 3]
    assert stop.strip() and long.find(stop) > 0
    r = client.chat.completions.create(temperature=0, stop=[stop], **dict(kw, max_tokens=40))
    assert r.choices[0].message.content == long[: long.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in client.chat.completions.create(temperature=0, stop=stop, stream=True, **dict(kw, max_tokens=40))
    )
    assert streamed == long[: long.find(stop)]  # the stop text never leaks into a delta

    r = client.chat.completions.create(temperature=0, **dict(kw, max_tokens=5))
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    two = client.completions.create(model=_name(model_dir), prompt=["a b", "c d"], max_tokens=4, temperature=0, n=2)
    assert [x.index for x in two.choices] == [0, 1, 2, 3] and two.choices[0].text == two.choices[1].text


def _raw(srv, path: str, content: bytes | str, key: str | None = cs.API_KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(srv.base_url + path, content=content, headers=headers, timeout=60)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_shaped_4xx(srv, client, model_dir):
    name = _name(model_dir)
    err = _error(_raw(srv, "/chat/completions", json.dumps({"model": name})), 400)
    assert err["param"] == "messages" and "required" in err["message"]
    err = _error(_raw(srv, "/chat/completions", b'{"model": "x", "messages": [}'), 400)
    assert err["code"] == "invalid_json"
    err = _error(_raw(srv, "/chat/completions", b"[1, 2]"), 400)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role" and "wizard" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=Q, max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded" and "2048" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="hi", max_tokens=2047)
    assert e.value.body["code"] == "context_length_exceeded"
    for bad in (
        {"n": 0},
        {"n": 99},
        {"temperature": 3},
        {"top_p": 0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"max_tokens": "ten"},
        {"logprobs": True},
        {"messages": []},
        {"messages": [{"role": "user", "content": 3}]},
    ):
        body = dict({"model": name, "messages": Q}, **bad)
        err = _error(_raw(srv, "/chat/completions", json.dumps(body)), 400)
        assert err["param"] and err["param"].split("[")[0] in bad, (bad, err)
    err = _error(_raw(srv, "/chat/completions", json.dumps({"model": "gpt-7", "messages": Q})), 404)
    assert err["code"] == "model_not_found"
    _error(_raw(srv, "/nothing/here", b"{}"), 404)
    assert httpx.get(srv.base_url + "/models", headers={"Authorization": f"Bearer {cs.API_KEY}"}).status_code == 200


def test_numeric_fields_out_of_range_are_400_never_500(srv, model_dir):
    name = _name(model_dir)
    for bad in ({"seed": 2**64}, {"seed": -(2**63) - 1}, {"temperature": float("nan")}, {"top_p": float("inf")}):
        body = json.dumps(dict({"model": name, "messages": Q, "max_tokens": 2}, **bad))  # json writes NaN, Infinity
        err = _error(_raw(srv, "/chat/completions", body), 400)
        assert err["param"] in bad, (bad, err)
    ok = json.dumps({"model": name, "messages": Q, "max_tokens": 2, "seed": 2**63 - 1, "temperature": 1.0})
    assert _raw(srv, "/chat/completions", ok).status_code == 200


def test_a_huge_body_is_refused_before_parsing_and_does_not_stall_others(srv, model_dir):
    """A 10 MB body gets 413 from the 1 MB default limit; a small request sent meanwhile answers at once."""
    import time

    name = _name(model_dir)
    huge = json.dumps({"model": name, "messages": [{"role": "user", "content": "x " * 5_000_000}]})
    got: dict = {}

    def send_huge():
        got["huge"] = _raw(srv, "/chat/completions", huge)

    t = threading.Thread(target=send_huge)
    t.start()
    t0 = time.time()
    small = _raw(srv, "/chat/completions", json.dumps({"model": name, "messages": Q, "max_tokens": 2}))
    small_s = time.time() - t0
    t.join(timeout=60)
    assert small.status_code == 200 and small_s < 10
    assert _error(got["huge"], 413)["code"] == "request_too_large"


def test_api_key_is_required_when_set(srv, model_dir):
    body = json.dumps({"model": _name(model_dir), "messages": Q, "max_tokens": 2})
    assert _error(_raw(srv, "/chat/completions", body, key=None), 401)["code"] == "invalid_api_key"
    assert _error(_raw(srv, "/chat/completions", body, key="sk-wrong"), 401)["code"] == "invalid_api_key"
    assert _raw(srv, "/chat/completions", body).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.base_url, api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(srv.base_url.rsplit("/v1", 1)[0] + "/health").status_code == 200  # health needs no key


def _stats(srv) -> dict:
    return httpx.get(srv.base_url.rsplit("/v1", 1)[0] + "/health").json()["stats"]


def test_concurrent_requests_are_batched_and_each_gets_its_solo_text(srv, client, model_dir):
    prompts = [[{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}] for i in range(3)]
    kw = dict(model=_name(model_dir), max_tokens=48, temperature=0)
    solo = [client.chat.completions.create(messages=p, **kw) for p in prompts]
    sequential = [r.choices[0].message.content for r in solo]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)
    before = _stats(srv)

    def ask(i: int) -> None:
        try:
            start.wait()
            stream = i % 2 == 1
            if stream:
                results[i] = "".join(
                    c.choices[0].delta.content or ""
                    for c in client.chat.completions.create(messages=prompts[i % 3], stream=True, **kw)
                )
            else:
                results[i] = client.chat.completions.create(messages=prompts[i % 3], **kw).choices[0].message.content
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 6
    assert all(results[i] == sequential[i % 3] for i in range(6))  # batched requests do not mix
    after = _stats(srv)
    assert after["requests"] - before["requests"] == 6
    assert after["batched_steps"] > before["batched_steps"]  # decode steps that ran several requests at once
    # One request after another takes one forward pass per generated token; batched, fewer.
    assert after["forward_calls"] - before["forward_calls"] < sum(solo[i % 3].usage.completion_tokens for i in range(6))


def test_stop_strings_are_held_back_across_tokens():
    from minima.infer.engine import _Choice

    class Tok:  # decode = concatenation of pieces
        pieces = {1: "Hel", 2: "lo ", 3: "wor", 4: "ld", 5: "!"}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.pieces[i] for i in ids)

    # "Hel" ends with "l", which may start "lo w": the "l" waits until the next token decides.
    c = _Choice(Tok(), ("lo w",))
    deltas = [c.push(1), c.push(2), c.push(3)]
    assert deltas == ["He", "l", ""] and c.finish_reason == "stop" and c.sent == "Hel"
    c = _Choice(Tok(), ("low",))
    deltas = [c.push(i) for i in (1, 2, 3, 4)] + [c.finish("length")]
    assert deltas == ["He", "llo ", "wor", "ld", ""] and c.finish_reason == "length"


def test_cli_without_model_is_a_clear_error(capsys):
    from minima.cli import main

    assert main(["serve", "port=9"]) == 2
    assert "model=DIR" in capsys.readouterr().err


def test_model_without_chat_template_falls_back_to_the_minichat_format(model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from minima.data.formats import get_format
    from minima.infer.engine import Engine

    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not AutoTokenizer.from_pretrained(str(plain)).chat_template
    engine = Engine.from_dir(plain)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert engine.chat_ids(msgs) == get_format("minichat").encode(engine.tok, msgs, add_generation_prompt=True)[0]
    with pytest.raises(ValueError):
        engine.chat_ids([{"role": "assistant", "content": "I speak first"}])
    assert isinstance(engine.chat(msgs, max_tokens=3), str)
