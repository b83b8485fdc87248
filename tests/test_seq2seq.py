"""Every sft family end to end: a tiny T5, Bloom and OPT go sft -> evaluate (per-choice log-likelihoods
equal a hand computation with the HF model's forward, generations equal HF greedy generate), and the
T5 chat model answers over HTTP exactly as HF generate does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_sft
import torch

# test_sft's fixtures: in-process training on one thread, and MiniChat records of the demo chat data
_inprocess, chat_records = test_sft._inprocess, test_sft.chat_records

QUESTIONS = [
    {"question": "What color is the sky?", "choices": ["blue", "green", "red"], "gold": 0},
    {"question": "How many legs has a cat?", "choices": ["two", "four"], "gold": 1},
    {"question": "Which is a fruit?", "choices": ["stone", "apple", "car", "sea"], "gold": 1},
]
MATH = [
    {"question": "Tom has 2 apples and gets 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "What is 4 times 2?", "answer": "4 * 2 = 8\n#### 8"},
]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("s2s_eval")
    for name, rows in (("demo_mc", QUESTIONS), ("gsm8k", MATH)):
        (d / name).mkdir()
        (d / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _sft(family: str, tmp_path: Path, records: Path, tok_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from minima.core.config import SftConfig
    from minima.stages import sft
    from minima.testing import tiny_family_model

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny_family_model(family, len(tok), seed=0)
    if family == "t5":  # the tiny T5 config's special ids are T5's; use the tokenizer's
        model.config.eos_token_id, model.config.pad_token_id, model.config.decoder_start_token_id = (
            tok.eos_token_id,
            0,
            0,
        )
        with torch.no_grad():  # a random T5 greedily repeats id 0 (<unk>, decoded as nothing): make it unlikely
            model.get_output_embeddings().weight[0] -= 1.0
    base = tmp_path / f"base_{family}"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    cfg = SftConfig(
        model=str(base),
        records=str(records),
        out_dir=str(tmp_path / "sft"),
        precision="fp32",
        strategy="fsdp",
        micro_batch_size=8,
        max_steps=4,
        lr=3e-3,
        warmup_proportion=0.1,
        eval_steps=0,
        max_length=128,
    )
    return sft.run(cfg).path


def _hf_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from one plain forward of the HF model."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:  # encoder: the context; decoder target: the continuation
            src, tgt = tok(context)["input_ids"], tok(continuation)["input_ids"]
            logits = model(input_ids=torch.tensor([src]), labels=torch.tensor([tgt])).logits[0]
            lp = torch.log_softmax(logits.double(), -1)
            return float(sum(lp[i, t] for i, t in enumerate(tgt)))
        ctx, whole = tok(context)["input_ids"], tok(context + continuation)["input_ids"]
        logits = model(input_ids=torch.tensor([whole])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        return float(sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _hf_generate(model, tok, context: str, max_new: int, until: list[str]) -> str:
    ids = torch.tensor([tok(context)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    new = out[0, 1:] if model.config.is_encoder_decoder else out[0, ids.shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    for s in until:
        text = text.split(s)[0]
    return text


@pytest.mark.parametrize("family", ["t5", "bloom", "opt"])
def test_family_sft_then_evaluate_matches_hf(family, tmp_path, chat_records, tiny_tokenizer_dir, eval_dir):
    from minima.core.config import EvaluateConfig
    from minima.models.loader import load_model_and_tokenizer
    from minima.stages.evaluate import run

    out = _sft(family, tmp_path, chat_records, tiny_tokenizer_dir)
    art = run(
        EvaluateConfig(
            model=str(out),
            tasks=["demo_mc", "gsm8k"],
            data_dir=str(eval_dir),
            shots=0,
            max_new_tokens=12,
            batch_size=2,
            dtype="fp32",
            device="cpu",
            out_dir=str(tmp_path / "ev"),
        )
    )
    samples = [json.loads(x) for x in (art.path / "samples.jsonl").read_text().splitlines()]
    mc = [s for s in samples if s["task"] == "demo_mc"]
    gen = [s for s in samples if s["task"] == "gsm8k"]
    assert len(mc) == len(QUESTIONS) and len(gen) == len(MATH)
    model, tok = load_model_and_tokenizer(out, "fp32", "cpu")
    assert model.config.is_encoder_decoder == (family == "t5")
    for q, s in zip(QUESTIONS, mc):
        want = [_hf_loglikelihood(model, tok, f"Question: {q['question']}\nAnswer:", f" {c}") for c in q["choices"]]
        assert s["loglikelihoods"] == pytest.approx(want, abs=2e-4)
        assert s["pred"] == max(range(len(want)), key=want.__getitem__)
    until = ["Question:", "</s>", "<|im_end|>"]
    for q, s in zip(MATH, gen):
        assert s["generation"] == _hf_generate(model, tok, f"Question: {q['question']}\nAnswer:", 12, until)


def test_t5_chat_over_http_and_in_chat_equals_hf_generate(tmp_path, chat_records, tiny_tokenizer_dir):
    import httpx

    from minima.data.formats import get_format
    from minima.infer.serve import launch
    from minima.models.loader import load_model_and_tokenizer

    out = _sft("t5", tmp_path, chat_records, tiny_tokenizer_dir)
    model, tok = load_model_and_tokenizer(out, "fp32", "cpu")
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    prompt = get_format("minichat").encode(tok, msgs, add_generation_prompt=True)[0]
    assert tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ] == list(prompt)
    x = torch.tensor([prompt])
    with torch.no_grad():
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)[0, 1:]
    want = tok.decode(ref, skip_special_tokens=True)
    assert want  # a real reply, not an immediate end of turn
    srv = launch(out, "threads=1", "device=cpu", timeout=240)
    try:
        r = httpx.post(
            f"{srv.base_url}/chat/completions",
            json={"model": out.name, "messages": msgs, "max_tokens": 16, "temperature": 0},
            timeout=120,
        )
        r.raise_for_status()
        body = r.json()
    finally:
        srv.close()
    assert body["choices"][0]["message"]["content"] == want
    from minima.infer import chat

    assert chat.generate_reply(str(out), msgs, max_new_tokens=16) == want.strip()  # `minima chat`'s path
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_t5_letter_mode_reads_the_first_decoder_position_and_perplexity_is_refused(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minima.core.errors import InputError
    from minima.evaluate.lm import LM
    from minima.testing import tiny_family_model

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    model = tiny_family_model("t5", len(tok), seed=0).eval()
    lm = LM(model, tok, batch_size=2)
    contexts = ["Question: Which is blue?\nA. sky\nB. grass\nAnswer:", "Pick one.\nAnswer:", "x"]
    ids = [tok.encode(c, add_special_tokens=False)[-1] for c in (" A", " B")]
    got = lm.next_token_logprobs(contexts, ids)
    for c, row in zip(contexts, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(c)["input_ids"]]), decoder_input_ids=torch.tensor([[0]])).logits
        want = torch.log_softmax(logits[0, 0].double(), -1)[ids].tolist()
        assert row == pytest.approx(want, abs=1e-5)
    with pytest.raises(InputError, match="decoder-only"):
        lm.rolling_nll(tok("some text to score")["input_ids"])
