import hashlib
import json

from minima.data import demo as demo_data


def _digest(d):
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path):
    demo_data.write(tmp_path / "a", seed=3, docs_per_lang=200)
    demo_data.write(tmp_path / "b", seed=3, docs_per_lang=200)
    demo_data.write(tmp_path / "c", seed=4, docs_per_lang=200, tokenizers=False)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a["text/pretrain_en.txt"] != c["text/pretrain_en.txt"]


def test_shapes_and_held_out_split(demo_data_dir):
    chat = json.loads((demo_data_dir / "chat" / "demo_chat.json").read_text())
    assert all(isinstance(conv, list) and all(set(t) == {"User", "Assistant"} for t in conv) for conv in chat)
    test = [json.loads(line) for line in (demo_data_dir / "eval/demo_mc/test.jsonl").read_text().splitlines()]
    assert len(test) >= 50 and all(0 <= r["gold"] < len(r["choices"]) == 4 for r in test)
    # held-out questions never appear in chat training, but their facts are in the pretraining text
    asked = {t["User"] for conv in chat for t in conv}
    assert not any(r["question"] in asked for r in test)
    en = (demo_data_dir / "text/pretrain_en.txt").read_text()
    zh = (demo_data_dir / "text/pretrain_zh.txt").read_text()
    for r in test:
        if r["lang"] == "en" and r["kind"] == "capital":
            country = r["question"].removeprefix("What is the capital of ").rstrip("?")
            assert f"The capital of {country} is {r['choices'][r['gold']]}." in en
        # the cloze prefix + the gold choice is a sentence of the pretraining text
        if r["lang"] == "en":
            assert f"{r['prefix']} {r['choices'][r['gold']]}" in en
        else:
            assert demo_data.space_latin(f"{r['prefix']}{r['choices'][r['gold']]}") in zh


def test_tokenizers_are_llama_like(demo_data_dir):
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_file=str(demo_data_dir / "tokenizers/base_en.model"))
    extra = spm.SentencePieceProcessor(model_file=str(demo_data_dir / "tokenizers/extra_zh.model"))
    assert (base.unk_id(), base.bos_id(), base.eos_id(), base.pad_id()) == (0, 1, 2, -1)
    assert base.get_piece_size() >= 500 and extra.get_piece_size() >= 300
    zh = "法国的首都是巴黎。"
    assert len(extra.encode(zh)) < len(base.encode(zh)) / 3  # the base byte-falls-back on Chinese
    assert base.decode(base.encode(zh)) == zh
