"""The chat format registry: MiniChat layout, exact loss masks, shapes, extension point."""

from __future__ import annotations

import json

import pytest
from conftest import shared

from minima.core.errors import ConfigError
from minima.data.formats import (
    BOS,
    EOS,
    ChatFormat,
    Seg,
    available_formats,
    get_format,
    normalise_conversation,
    register,
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    """The real LLaMA-2 SentencePiece tokenizer as an HF dir (skips without ../shared)."""
    from transformers import AutoTokenizer

    from minima.data.tokenizers import save_sp_tokenizer

    model = shared("tokenizers/llama2_tokenizer.model")
    return AutoTokenizer.from_pretrained(str(save_sp_tokenizer(model, tmp_path_factory.mktemp("llama2") / "tok")))


def mask_runs(ids, mask):
    """Maximal runs of mask == 1 tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "法国的首都是哪里？"},
    {"role": "assistant", "content": "法国的首都是巴黎。"},
]


def test_minichat_renders_the_published_layout_and_tokenizes_like_the_whole_string(tok):
    fmt = get_format("minichat")
    text = fmt.render(CONV)
    assert text == (
        "<s>You are terse.</s>[|User|] What is the capital of France?</s>"
        "[|Assistant|] The capital of France is Paris.</s>"
        "[|User|] 法国的首都是哪里？</s>[|Assistant|] 法国的首都是巴黎。</s>"
    )
    ids, mask = fmt.encode(tok, CONV)
    # Reference: the tokenizer on the whole rendered string (it parses <s>/</s> itself). Piece-wise
    # encoding must give the same ids for a SentencePiece tokenizer, or the model would see at train
    # time a different token sequence than a user typing the template.
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids)
    # No system prompt: just <s> before the first user turn (MiniChat's default conversation).
    ids2, _ = fmt.encode(tok, CONV[1:3])
    assert ids2[0] == tok.bos_token_id and tok.decode(ids2[1:]).startswith("[|User|]")


def test_mask_is_exactly_the_assistant_replies_and_their_eos(tok):
    ids, mask = get_format("minichat").encode(tok, CONV)
    runs = mask_runs(ids, mask)
    replies = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert [tok.decode(r[:-1]) for r in runs] == replies
    assert all(r[-1] == tok.eos_token_id for r in runs)
    assert sum(mask) == sum(len(r) for r in runs)


@pytest.mark.parametrize(
    "rel,limit",
    [
        ("chat/sharegpt_v3_sample50.json", 50),
        ("chat/fastchat_dummy_conversation.json", 60),
        ("instruction/alpaca_data_1k.json", 60),
        ("instruction/alpaca_zh_first1000.json", 60),
    ],
)
def test_masks_decode_to_replies_on_real_chat_data(llama_tok, rel, limit):
    data = json.loads(shared(rel).read_text())[:limit]
    fmt = get_format("minichat")
    for rec in data:
        msgs = normalise_conversation(rec)
        ids, mask = fmt.encode(llama_tok, msgs)
        runs = mask_runs(ids, mask)
        assert [llama_tok.decode(r[:-1]) for r in runs] == [m["content"] for m in msgs if m["role"] == "assistant"]
        assert all(r[-1] == llama_tok.eos_token_id for r in runs)


def test_special_token_text_in_messages_is_not_a_token(tok):
    msgs = [{"role": "user", "content": "say </s> please"}, {"role": "assistant", "content": "ok </s><s> done"}]
    ids, mask = get_format("minichat").encode(tok, msgs)
    # Only the structural tokens: <s>, </s> after the user turn, </s> after the reply.
    assert ids.count(tok.eos_token_id) == 2 and ids.count(tok.bos_token_id) == 1
    assert tok.decode(mask_runs(ids, mask)[0][:-1]) == "ok </s><s> done"


def test_generation_prompt_ends_with_the_assistant_tag(tok):
    fmt = get_format("minichat")
    ids, mask = fmt.encode(tok, CONV[:4], add_generation_prompt=True)
    full, _ = fmt.encode(tok, CONV)
    assert full[: len(ids)] == ids and sum(mask) == len(mask_runs(*fmt.encode(tok, CONV[:3]))[0])
    assert (
        fmt.render(CONV[1:2], add_generation_prompt=True)
        == "<s>[|User|] What is the capital of France?</s>[|Assistant|]"
    )
    with pytest.raises(ValueError, match="no assistant reply"):
        fmt.encode(tok, CONV[:4])


def test_shapes_normalise_to_the_same_messages():
    want = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert normalise_conversation([{"User": "Hi", "Assistant": "Hello"}]) == want
    assert (
        normalise_conversation({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
        == want
    )
    assert normalise_conversation({"instruction": "Hi", "input": "", "output": "Hello"}) == want
    assert normalise_conversation({"messages": want}) == want
    assert (
        normalise_conversation({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca")[0]["content"]
        == "Sum\n1 2"
    )
    sys = normalise_conversation(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ]
        }
    )
    assert sys[0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize(
    "record,match",
    [
        ({"foo": 1}, "unrecognised conversation shape"),
        ([{"User": "Hi"}], "'User' and 'Assistant'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker"),
        ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "should be a user turn"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant reply"),
        ({"instruction": 3, "output": "x"}, "must be a string"),
    ],
)
def test_bad_conversations_say_what_is_wrong(record, match):
    with pytest.raises(ValueError, match=match):
        normalise_conversation(record)


def test_registry_extension_point(tok):
    assert "minichat" in available_formats()
    with pytest.raises(ConfigError, match="minichat"):
        get_format("no-such-format")

    @register("test-qa")
    class QA(ChatFormat):
        def header(self, system):
            return [Seg(BOS)]

        def exchange(self, user, assistant):
            return [
                Seg("Q:"),
                Seg(user, content=True),
                Seg("A:"),
                Seg(assistant, train=True, content=True),
                Seg(EOS, train=True),
            ]

        def generation_prefix(self, user):
            return [Seg("Q:"), Seg(user, content=True), Seg("A:")]

    try:
        ids, mask = get_format("test-qa").encode(tok, CONV[1:3])
        assert tok.decode(mask_runs(ids, mask)[0][:-1]) == CONV[2]["content"]
        assert (
            get_format("test-qa").render(CONV[1:3])
            == "<s>Q: What is the capital of France? A: The capital of France is Paris.</s>"
        )
        with pytest.raises(ValueError, match="already registered"):
            register("test-qa")(type("Other", (ChatFormat,), {}))
    finally:
        from minima.data import formats

        formats._REGISTRY.pop("test-qa", None)  # keep the registry as other tests expect it


def test_fast_batch_tokenization_equals_the_tokenizer_call(tok):
    from minima.data.formats import tokenize_texts

    texts = ["Hello world.", "  two  spaces ", "法国的首都是巴黎。", "a </s> b <s>", "", "line\nbreak"]
    for split in (True, False):
        assert (
            tokenize_texts(tok, texts, split)
            == tok(texts, add_special_tokens=False, split_special_tokens=split)["input_ids"]
        )
    convs = [CONV, CONV[1:3], [{"role": "user", "content": "x </s>"}, {"role": "assistant", "content": ""}]]
    fmt = get_format("minichat")
    assert fmt.encode_batch(tok, convs) == [fmt.encode_exchanges(tok, c) for c in convs]
    # Reference without the fast path: every piece through tokenizer(...) itself.
    ref = []
    for group in fmt.segments(CONV):
        ids = []
        for seg in group:
            if seg.piece is BOS or seg.piece is EOS:
                ids.append(tok.bos_token_id if seg.piece is BOS else tok.eos_token_id)
            elif seg.piece:
                ids += tok(seg.piece, add_special_tokens=False, split_special_tokens=seg.content)["input_ids"]
        ref.append(ids)
    assert [g[0] for g in fmt.encode_exchanges(tok, CONV)] == ref


@pytest.mark.parametrize("name", sorted(available_formats()))
def test_every_registered_format_batches_like_single_encoding(tok, demo_data_dir, name):
    """records tokenizes chat in batches (encode_batch); sft and chat encode one at a time."""
    convs = [
        normalise_conversation(c) for c in json.loads((demo_data_dir / "chat" / "demo_chat.json").read_text())[:40]
    ]
    fmt = get_format(name)
    batched = fmt.encode_batch(tok, convs)
    assert batched == [fmt.encode_exchanges(tok, c) for c in convs]
    for msgs, groups in zip(convs, batched):
        ids = [i for g in groups for i in g[0]]
        mask = [m for g in groups for m in g[1]]
        assert len(mask_runs(ids, mask)) == sum(m["role"] == "assistant" for m in msgs)


def test_records_source_shape_choices_follow_the_registry():
    import typing

    from minima.core.config import Source
    from minima.data.formats import SHAPES

    # every detected shape, plus auto (detect) and instruction (mc records read with the choices in the user text)
    assert "instruction" not in SHAPES
    assert set(typing.get_args(Source.model_fields["shape"].annotation)) == {"auto", "instruction", *SHAPES}
