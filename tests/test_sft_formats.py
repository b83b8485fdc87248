"""Chat formats: the Jinja template gives the training ids; labelled tokens are exactly the replies."""

from __future__ import annotations

import pytest

from minima.data.formats import (
    EOS,
    available_formats,
    chat_template,
    get_format,
    normalise_conversation,
    special_id,
    stop_token_ids,
)

FORMATS = ["minichat", "alpaca", "instruction", "mc", "llama2-chat", "chatml", "tulu"]

CONVS = {
    "single": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    "multi_system_zh": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "法国的首都是哪里？"},
        {"role": "assistant", "content": "法国的首都是巴黎。"},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "3 plus 4 equals 7."},
    ],
    "spaces_newlines": [
        {"role": "user", "content": " leading space\nand two lines"},
        {"role": "assistant", "content": "Line one.\n\nLine two "},
    ],
    "alpaca_input": normalise_conversation({"instruction": "Translate to Chinese.", "input": "water", "output": "水"}),
    "mc_choices": normalise_conversation(
        {"question": "What color is the sky?", "choices": ["red", "blue", "green"], "gold": 1}
    ),
    # a system prompt and two exchanges whose user turns carry an input and choices (first-turn-only parts)
    "multi_system_input_choices": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Add the numbers.", "input": "2 and 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Which one is red?", "choices": ["sky", "apple", "grass"]},
        {"role": "assistant", "content": "apple"},
    ],
    "winogrande_options": [
        {
            "role": "user",
            "content": "The cup fell off the table because the _ was tilted.",
            "options": ["cup", "table"],
        },
        {"role": "assistant", "content": "table"},
    ],
}


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    chatml = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return {"plain": plain, "chatml_tokens": chatml}


def _runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_all_formats_registered(tokenizers):
    # Exactly these: a format added to the registry but not here would escape the template tests below.
    assert sorted(available_formats()) == sorted(FORMATS)
    # The names resolve to distinct formats whose Jinja templates differ.
    templates = {name: chat_template(get_format(name), tokenizers["plain"]) for name in FORMATS}
    assert len(set(templates.values())) == len(FORMATS)


@pytest.mark.parametrize("tok_name", ["plain", "chatml_tokens"])
@pytest.mark.parametrize("name", FORMATS)
def test_template_gives_training_ids_and_labels_are_replies(name, tok_name, tokenizers, tmp_path):
    tok = tokenizers[tok_name]
    fmt = get_format(name)
    tok.chat_template = chat_template(fmt, tok)
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.chat_template == tok.chat_template
    eot = getattr(fmt, "end_of_turn", EOS)
    # The end-of-turn token(s) as the format tokenizes them: EOS, or e.g. <|im_end|> (one added
    # token, or several plain ones when the tokenizer does not know it).
    eot_ids = [special_id(tok, eot)] if eot == EOS else list(tok(eot, add_special_tokens=False)["input_ids"])
    for conv_name, msgs in CONVS.items():
        ids, mask = fmt.encode(tok, msgs)
        out = reloaded.apply_chat_template(msgs, tokenize=True)
        assert list(out["input_ids"]) == ids, (
            f"{name}/{conv_name}: template != training ids\n{reloaded.apply_chat_template(msgs, tokenize=False)!r}"
        )
        # The prompt for generation (conversation without its last reply) matches too.
        prompt, _ = fmt.encode(tok, msgs[:-1], add_generation_prompt=True)
        gen = reloaded.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
        assert list(gen["input_ids"]) == prompt
        assert ids[: len(prompt)] == prompt
        # Labelled tokens decode to exactly the replies, each followed by the end-of-turn token.
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        if name == "tulu":  # open-instruct strips the replies
            replies = [r.strip() for r in replies]
        runs = _runs(ids, mask)
        assert len(runs) == len(replies), f"{name}/{conv_name}"
        for run, reply in zip(runs, replies):
            body, end = run[: -len(eot_ids)], run[-len(eot_ids) :]
            assert end == eot_ids
            assert tok.decode(body).strip() == reply.strip()
            if name != "tulu":  # tulu tokenizes the conversation whole: a reply's ids depend on what precedes it
                assert body == list(tok(reply, add_special_tokens=False)["input_ids"])
        # HF's own assistant mask (from the template's generation blocks) agrees with ours.
        hf = reloaded.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(hf["assistant_masks"]) == mask, f"{name}/{conv_name}"


def test_format_specific_text(tokenizers):
    tok = tokenizers["plain"]
    text = get_format("alpaca").render(CONVS["alpaca_input"], tokenizer=tok)
    assert "### Input:" in text and "water" in text and "Translate to Chinese." in text
    no_input = get_format("alpaca").render(CONVS["single"], tokenizer=tok)
    assert "### Input:" not in no_input and "### Response:" in no_input
    mc = get_format("mc").render(CONVS["mc_choices"], tokenizer=tok)
    assert "### QUESTION:" in mc and "(0): red (1): blue (2): green" in mc and "### ANSWER:" in mc
    wino = get_format("mc").render(CONVS["winogrande_options"], tokenizer=tok)
    assert "### SENTENCE:" in wino and "### OPTION1:" in wino and "### OPTION2:" in wino
    inst = get_format("instruction").render(CONVS["single"], tokenizer=tok)
    assert "### INSTRUCTION:" in inst and "### RESPONSE:" in inst
    l2 = get_format("llama2-chat").render(CONVS["multi_system_zh"], tokenizer=tok)
    assert l2.count("[INST]") == 2 and l2.count("<<SYS>>") == 1 and l2.count("<s>") == 2
    assert CONVS["alpaca_input"][0]["input"] == "water"


def test_roles_out_of_order_and_no_assistant(tokenizers):
    tok = tokenizers["plain"]
    fmt = get_format("minichat")
    tok.chat_template = chat_template(fmt, tok)
    bad = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="user turn"):
        fmt.encode(tok, bad)
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="no assistant reply"):
        fmt.encode(tok, [{"role": "user", "content": "q"}])


def test_stop_tokens(tokenizers):
    plain, chatml = tokenizers["plain"], tokenizers["chatml_tokens"]
    assert stop_token_ids("minichat", plain) == [special_id(plain, EOS)]
    assert stop_token_ids("chatml", chatml) == [chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")]


def _open_instruct_text(messages, bos="<s>", eos="</s>", add_generation_prompt=False) -> str:
    """open-instruct's Tulu text of a conversation (its encode_with_messages_format / eval prompt), by hand."""
    text = bos
    for m in messages:
        if m["role"] == "assistant":
            text += "<|assistant|>\n" + m["content"].strip() + eos + "\n"
        else:
            text += f"<|{m['role']}|>\n" + m["content"] + "\n"
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A byte-level BPE tokenizer (no dummy prefix), so rendered text and token pieces align byte for byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [m["content"] for conv in CONVS.values() for m in conv] + ["<|user|>\n<|assistant|>\n<|system|>\n"] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_tulu_bytes_and_mask_are_open_instructs(byte_level_tokenizer):
    tok = byte_level_tokenizer
    fmt = get_format("tulu")
    tok.chat_template = chat_template(fmt, tok)
    for msgs in CONVS.values():
        assert tok.apply_chat_template(msgs, tokenize=False) == _open_instruct_text(msgs)
        assert tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) == _open_instruct_text(
            msgs[:-1], add_generation_prompt=True
        )
        ids, mask = fmt.encode(tok, msgs)
        assert tok.decode(ids) == _open_instruct_text(msgs)
        # Trained: each reply and its EOS, nothing else (not the role markers, not the newline after EOS).
        replies = [m["content"].strip() + "</s>" for m in msgs if m["role"] == "assistant"]
        assert [tok.decode(r) for r in _runs(ids, mask)] == replies
    system = CONVS["multi_system_zh"]
    assert get_format("tulu").render(system, tokenizer=tok).startswith("<s><|system|>")
    assert _open_instruct_text(system).startswith("<s><|system|>\nYou are a helpful assistant.\n<|user|>\n法国")
    assert stop_token_ids("tulu", tok) == [tok.eos_token_id]


def test_records_build_tulu_chat_records(tmp_path, tiny_tokenizer_dir, demo_data_dir):
    """chat_format=tulu through the records stage: each record is the format's ids and mask."""
    import json

    from transformers import AutoTokenizer

    from minima.core.config import RecordsConfig
    from minima.data.formats import normalise_conversation
    from minima.data.records import RecordDataset
    from minima.stages.records import run as records_run

    src = tmp_path / "chat.json"
    convs = [CONVS["single"], CONVS["multi_system_zh"]]
    src.write_text(json.dumps([{"messages": c} for c in convs], ensure_ascii=False), encoding="utf-8")
    art = records_run(
        RecordsConfig(
            inputs=str(src),
            tokenizer=str(tiny_tokenizer_dir),
            format="chat",
            chat_format="tulu",
            max_length=256,
            dev_fraction=0.0,
            out_dir=str(tmp_path / "records"),
        )
    )
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    fmt = get_format("tulu")
    want = sorted(fmt.encode(tok, normalise_conversation({"messages": c})) for c in convs)
    got = sorted(
        (ex["input_ids"].tolist(), (ex["labels"] != -100).long().tolist())
        for ex in RecordDataset(str(art.path), "train", shuffle_buffer=0)
    )
    assert got == [(list(i), list(m)) for i, m in want]


@pytest.mark.parametrize("tok_name", ["plain", "chatml_tokens"])
def test_tulu_ids_are_open_instructs_whole_text_tokenization(tok_name, tokenizers):
    """With a SentencePiece tokenizer too: the ids are open-instruct's (its text tokenized at once), and the
    trained tokens are exactly those its prefix-length rule labels (less the newline after each EOS)."""
    tok = tokenizers[tok_name]
    fmt = get_format("tulu")
    for msgs in CONVS.values():
        ids, mask = fmt.encode(tok, msgs)
        assert ids == list(tok(_open_instruct_text(msgs), add_special_tokens=False)["input_ids"])
        prompt, _ = fmt.encode(tok, msgs[:-1], add_generation_prompt=True)
        want = tok(_open_instruct_text(msgs[:-1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert prompt == list(want)
        # open-instruct: a reply's labels run from len(tokens(text up to it)) to len(tokens(text through it));
        # here "through it" ends at its EOS (the newline after it is not trained).
        labels = [0] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                before = _open_instruct_text(msgs[:i]) + "<|assistant|>\n"
                a = len(tok(before, add_special_tokens=False)["input_ids"])
                b = len(tok(before + m["content"].strip() + "</s>", add_special_tokens=False)["input_ids"])
                labels[a:b] = [1] * (b - a)
        assert mask == labels and sum(labels) > 0
