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

FORMATS = ["minichat", "alpaca", "instruction", "mc", "llama2-chat", "chatml"]

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
        runs = _runs(ids, mask)
        assert len(runs) == len(replies), f"{name}/{conv_name}"
        for run, reply in zip(runs, replies):
            body, end = run[: -len(eot_ids)], run[-len(eot_ids) :]
            assert end == eot_ids
            assert tok.decode(body).strip() == reply.strip()
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
    assert (
        "### QUESTION" in mc and "A. red\nB. blue\nC. green" in mc and "### ANSWER" in mc and mc.count("B. blue") == 2
    )
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
