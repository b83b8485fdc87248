"""The mc format writes the JAX instruction-tuning recipe's prompts byte for byte."""

from __future__ import annotations

from minima.data.formats import Special, get_format, jax_prompt, normalise_conversation

# Written from the recipe README's examples: headings "### NAME:", a newline after each heading,
# a blank line between sections, choices "(i): text" joined by one space, the answer text as the reply.
MMLU_QUESTION = (
    "Rules in the reading room Hello, everyone. Welcome to the school reading room. We hope you have a good time "
    "here. Before you go into the reading room, there are some rules you need to keep. 1.The reading room is open "
    "from 8:00 a.m. to 5:00 p.m. from Monday to Friday. 2. Don't take your bag into the reading room. 3. Don't talk "
    "loudly in the reading room. 4. Don't take any food or drink into the reading room. 5. Take only one book at a "
    "time. After you finish reading the book, you must put it back and then you can take another one. Don't take "
    "many books to your seat. 6. Before you leave, you must the book to the bookshelf. You can't take any book out "
    "of the reading room. How long is the reading room open every day?"
)
MMLU_README = (
    "### QUESTION:\n"
    + MMLU_QUESTION
    + "\n\n### CHOICES:\n(0): Ten hours. (1): Nine hours. (2): Seven hours. (3): Eight hours."
    + "\n\n### ANSWER:\nNine hours."
)
WINOGRANDE_SENTENCE = (
    "While packing for hunting Chris made sure to bring his bag and not his knife because the _ was nonessential."
)
WINOGRANDE_README = (
    "### SENTENCE:\n" + WINOGRANDE_SENTENCE + "\n\n### OPTION1:\nbag\n\n### OPTION2:\nknife\n\n### ANSWER:\nknife"
)


def _text(msgs) -> str:
    """The conversation's text as the format's pieces spell it (special tokens left out)."""
    groups = get_format("mc").segments(msgs)
    return "".join(s.piece for g in groups for s in g if not isinstance(s.piece, Special))


def test_mc_prompt_is_the_readme_bytes():
    msgs = normalise_conversation(
        {"question": MMLU_QUESTION, "choices": ["Ten hours.", "Nine hours.", "Seven hours.", "Eight hours."], "gold": 1}
    )
    assert _text(msgs) == MMLU_README
    assert jax_prompt(msgs[0]) + msgs[1]["content"] == MMLU_README


def test_winogrande_prompt_is_the_readme_bytes():
    msgs = [
        {"role": "user", "content": WINOGRANDE_SENTENCE, "options": ["bag", "knife"]},
        {"role": "assistant", "content": "knife"},
    ]
    assert _text(msgs) == WINOGRANDE_README


def test_free_question_and_instruction_layouts():
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    assert _text(msgs) == "### QUESTION:\nWhat is 2+3?\n\n### ANSWER:\n5"
    inst = get_format("instruction").segments(msgs)
    text = "".join(s.piece for g in inst for s in g if not isinstance(s.piece, Special))
    assert text == "### INSTRUCTION:\nWhat is 2+3?\n\n### RESPONSE:\n5"
    alpaca = normalise_conversation({"instruction": "Translate.", "input": "water", "output": "水"})
    inst = get_format("instruction").segments(alpaca)
    text = "".join(s.piece for g in inst for s in g if not isinstance(s.piece, Special))
    assert text == "### INSTRUCTION:\nTranslate.\n\n### INPUT:\nwater\n\n### RESPONSE:\n水"


def test_tokens_decode_to_the_readme_bytes(tiny_tokenizer_dir):
    """With a tokenizer that adds no prefix space, the trained ids decode to exactly the README text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    msgs = [
        {"role": "user", "content": WINOGRANDE_SENTENCE, "options": ["bag", "knife"]},
        {"role": "assistant", "content": "knife"},
    ]
    ids, mask = get_format("mc").encode(tok, msgs)
    body = tok.decode(ids[1:-1])
    assert body.replace(" ", "") == WINOGRANDE_README.replace(" ", "")
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained[:-1]).strip() == "knife" and trained[-1] == tok.eos_token_id
