"""Quality: after sft on the demo chat data, a tiny model answers held-out questions better.

A tiny LLaMA is pretrained briefly on the demo pretraining text (where every fact appears), then
instruction-tuned with ``minima.stages.sft.run`` on the demo chat data, whose questions cover 75% of the
facts. The held-out questions (``eval/demo_mc/test.jsonl``) ask about the other 25%, so the model
must answer from what pretraining taught it. The score reads the greedy reply to each question
under the exported chat template: correct when it names the gold choice and no other choice.
English only: the demo tokenizer is the English base model, so Chinese is byte pieces that a model
this small does not learn in a test's time.

The loglikelihood of each bare choice as the reply is printed too, for reference: it is not a
useful score here, because sft teaches whole-sentence replies ("The capital of Kenya is Nairobi."),
which makes any bare one-word reply unlikely.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def _pretrain(model, tok, text_file, steps=300, batch=16, seq=64, lr=3e-3):
    """A plain causal-LM loop over the demo text (random windows), cosine lr."""
    ids = [tok.bos_token_id]
    for line in text_file.read_text(encoding="utf-8").splitlines():
        ids += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(ids)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def _score(model, tok, items):
    """(answer accuracy, bare-choice loglikelihood accuracy) under the tokenizer's chat template."""
    answered = ll_right = 0
    with torch.no_grad():
        for r in items:
            prompt = list(
                tok.apply_chat_template(
                    [{"role": "user", "content": r["question"]}], tokenize=True, add_generation_prompt=True
                )["input_ids"]
            )
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
            reply = tok.decode(out[0, len(prompt) :], skip_special_tokens=True)
            named = [c for c in r["choices"] if c in reply]
            answered += named == [r["choices"][r["gold"]]]
            scores = []
            for c in r["choices"]:
                cont = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                x = torch.tensor([prompt + cont])
                lp = model(input_ids=x).logits[0, :-1].log_softmax(-1)
                tgt = x[0, 1:]
                scores.append(lp[torch.arange(len(tgt)), tgt][-len(cont) :].sum().item())
            ll_right += max(range(len(scores)), key=scores.__getitem__) == r["gold"]
    return answered / len(items), ll_right / len(items)


@pytest.mark.slow
def test_sft_answers_held_out_questions_better(tmp_path, demo_data_dir, tiny_tokenizer_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.core.config import SftConfig
    from minima.data.formats import chat_template
    from minima.stages import sft
    from minima.testing import tiny_llama

    monkeypatch.setenv("MINIMA_INPROCESS", "1")
    monkeypatch.setenv("MINIMA_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread makes tiny models ~10x slower on a shared 2-core box
    try:
        tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
        model = tiny_llama(len(tok), seed=0, **SHAPE)
        _pretrain(model, tok, demo_data_dir / "text" / "pretrain_en.txt")
        base = tmp_path / "base"
        model.save_pretrained(str(base))
        tok.save_pretrained(str(base))

        chats = json.loads((demo_data_dir / "chat" / "demo_chat.json").read_text(encoding="utf-8"))
        english = [c for c in chats if all(t["User"].isascii() for t in c)]
        train_file = tmp_path / "chat_en.json"
        train_file.write_text(json.dumps(english))
        held_out = [
            json.loads(line) for line in (demo_data_dir / "eval" / "demo_mc" / "test.jsonl").read_text().splitlines()
        ]
        held_out = [r for r in held_out if r["lang"] == "en"]

        tok.chat_template = chat_template("minichat", tok)  # the same prompt the sft export will carry
        before = _score(model, tok, held_out)

        cfg = SftConfig(
            model=str(base),
            train_files=[str(train_file)],
            out_dir=str(tmp_path / "sft"),
            chat_format="minichat",
            precision="fp32",
            zero_stage=2,
            micro_batch_size=16,
            max_steps=200,
            lr=1e-3,
            warmup_proportion=0.05,
            min_lr_ratio=1.0,
            weight_decay=0.0,
            max_length=64,
            dev_fraction=0.05,
        )
        out = sft.run(cfg).path
        tuned = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        after = _score(tuned, AutoTokenizer.from_pretrained(str(out)), held_out)
    finally:
        torch.set_num_threads(threads)
    print(
        f"\nheld-out demo questions (English, n={len(held_out)}): answer accuracy {before[0]:.3f} -> {after[0]:.3f} "
        f"after sft; bare-choice loglikelihood accuracy {before[1]:.3f} -> {after[1]:.3f}"
    )
    assert after[0] >= before[0] + 0.1
