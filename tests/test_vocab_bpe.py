"""Vocab stage on a byte-level BPE base (Llama-3 / Qwen style), trained here with the tokenizers library:
base ids and merges kept, English ids identical, AutoTokenizer round-trips, Chinese gets shorter, and
the resized model's new rows follow the same inits as the SentencePiece path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA

from minima.core.config import VocabConfig
from minima.core.errors import ConfigError
from minima.data.vocab import NEW_LEAD_BYTES, PROBES, SAMPLE_EN, SAMPLE_ZH, bpe_subtoken_ids, token_bytes
from minima.stages.vocab import run

ZH = SHARED_DATA / "text" / "hongloumeng_prefix_1.5MB.txt"
EN = SHARED_DATA / "text" / "tinyshakespeare.txt"
# Llama-3's pre-tokenizer regex
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]

pytestmark = pytest.mark.skipif(not (ZH.is_file() and EN.is_file()), reason="shared text data not present")


@pytest.fixture(scope="module")
def texts():
    zh = [line for line in ZH.read_text().splitlines() if line.strip()]
    en = [line for line in EN.read_text().splitlines() if line.strip()]
    return zh, en


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, texts):
    """An English byte-level BPE (1000 tokens, Llama-3 pre-tokenizer), specials after the BPE ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts[1][:20000], trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1])
    out = tmp_path_factory.mktemp("bpe") / "base"
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, base_dir, texts):
    from minima.testing import tiny_llama

    tmp = tmp_path_factory.mktemp("bpe_run")
    (tmp / "zh.txt").write_text("\n".join(texts[0][:400]))
    (tmp / "samples.txt").write_text("\n".join(texts[0][1500:1560] + texts[1][-300:] + SAMPLE_EN + SAMPLE_ZH))
    model = tiny_llama(1002, seed=0, tie_word_embeddings=False)
    model.save_pretrained(str(tmp / "model"))
    cfg = VocabConfig(
        base_tokenizer=str(base_dir),
        base_model=str(tmp / "model"),
        corpus=[str(tmp / "zh.txt")],
        sample_texts=[str(tmp / "samples.txt")],
        new_tokens=200,
        embedding_init="mean-of-subtokens",
        pad_to_multiple_of=64,
        out_dir=str(tmp / "out"),
    )
    return run(cfg), model, tmp


def test_base_ids_and_merges_are_kept_and_new_ones_appended(base_dir, expanded):
    art, _, _ = expanded
    base = json.loads((base_dir / "tokenizer.json").read_text())
    new = json.loads((art.path / "tokenizer.json").read_text())
    bv, nv = base["model"]["vocab"], new["model"]["vocab"]
    assert {k: nv[k] for k in bv} == bv
    bm, nm = base["model"]["merges"], new["model"]["merges"]
    assert nm[: len(bm)] == bm and len(nm) - len(bm) == art.metrics["merges_added"]
    assert new["added_tokens"] == base["added_tokens"]
    assert all(nv[t["content"]] == t["id"] for t in base["added_tokens"])  # specials keep their ids
    added = sorted((i, t) for t, i in nv.items() if t not in bv and t not in SPECIALS)
    assert [i for i, _ in added] == list(range(1002, 1002 + len(added))) and 150 <= len(added) <= 200
    assert all(NEW_LEAD_BYTES.intersection(token_bytes(t)) for _, t in added)
    for a, b in (m if isinstance(m, list) else m.split(" ") for m in nm[len(bm) :]):
        assert a in nv and b in nv  # every new merge is built from existing tokens


def test_english_ids_identical_chinese_shorter_and_round_trips(base_dir, expanded, texts):
    from transformers import AutoTokenizer

    art, _, _ = expanded
    base, tok = AutoTokenizer.from_pretrained(str(base_dir)), AutoTokenizer.from_pretrained(str(art.path))
    assert (
        len(tok)
        == art.metrics["vocab_size"]
        == len(base) + len([t for t in tok.get_vocab() if t not in base.get_vocab()])
    )
    assert tok.convert_tokens_to_ids(SPECIALS) == base.convert_tokens_to_ids(SPECIALS) == [1000, 1001]
    en = texts[1][-500:] + SAMPLE_EN + [p for p in PROBES if not NEW_LEAD_BYTES.intersection(p.encode())]
    for t in en:
        assert tok(t).input_ids == base(t).input_ids, t
    zh = texts[0][1600:1700]  # held out from the 400 corpus lines
    n_base = sum(len(base(t, add_special_tokens=False).input_ids) for t in zh)
    n_new = sum(len(tok(t, add_special_tokens=False).input_ids) for t in zh)
    assert n_new < 0.75 * n_base, (n_new, n_base)
    for t in zh + en + PROBES + SAMPLE_ZH:
        assert tok.decode(tok(t, add_special_tokens=False).input_ids) == t
    assert art.metrics["zh_ratio"] < 0.75 and art.metrics["english_changed_fraction"] == 0.0


def test_resized_model_keeps_base_rows_and_inits_new_rows_as_mean_of_subtokens(base_dir, expanded):
    from transformers import AutoModelForCausalLM

    art, model, _ = expanded
    m = art.metrics
    n = m["vocab_size"]
    assert m["model_vocab_size"] == n + (-n % 64) and m["base_rows_unchanged"]
    out = AutoModelForCausalLM.from_pretrained(str(art.path))
    w0, w1 = model.get_input_embeddings().weight, out.get_input_embeddings().weight
    assert w1.shape[0] == m["model_vocab_size"]
    assert torch.equal(w1[:1002], w0)
    assert torch.equal(out.lm_head.weight[:1002], model.lm_head.weight)
    base = json.loads((base_dir / "tokenizer.json").read_text())
    new = json.loads((art.path / "tokenizer.json").read_text())["model"]["vocab"]
    added = sorted((i, t) for t, i in new.items() if t not in base["model"]["vocab"] and t not in SPECIALS)
    groups = bpe_subtoken_ids(base, [t for _, t in added])
    for (i, t), ids in list(zip(added, groups))[:20]:
        # hand computation: the base ids of the token's bytes, each a single byte here (an English base)
        assert len(ids) == len(token_bytes(t)) and all(0 <= j < 1000 for j in ids)
        torch.testing.assert_close(w1[i], w0[ids].mean(0))


def test_a_byte_level_base_needs_a_corpus(base_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs corpus"):
        run(VocabConfig(base_tokenizer=str(base_dir), out_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
