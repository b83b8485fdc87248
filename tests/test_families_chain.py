"""vocab -> records -> prune (shape search) -> distill for a Qwen2-style model with a byte-level BPE
tokenizer (trained here): every stage keeps the family, the tokenizer and the tied embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA

QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

ZH = SHARED_DATA / "text" / "hongloumeng_prefix_1.5MB.txt"
EN = SHARED_DATA / "text" / "tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not (ZH.is_file() and EN.is_file()), reason="shared text data not present")


def test_qwen2_with_byte_level_bpe_goes_through_vocab_records_prune_distill(tmp_path, monkeypatch):
    import transformers as tf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from minima.core.config import DistillConfig, PruneConfig, PruneSearchConfig, RecordsConfig, VocabConfig
    from minima.stages.distill import run as distill
    from minima.stages.prune import run as prune
    from minima.stages.records import run as records
    from minima.stages.vocab import run as vocab

    torch.set_num_threads(1)
    monkeypatch.setenv("MINIMA_INPROCESS", "1")  # one tiny process: no torchrun start-up
    en = [line for line in EN.read_text().splitlines() if line.strip()]
    zh = [line for line in ZH.read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        en[:5000],
        trainer=trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.add_special_tokens(SPECIALS)
    base_tok = tmp_path / "base"
    e = SPECIALS[0]  # Qwen2's: no BOS, <|endoftext|> is eos, pad and unk
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=e, pad_token=e, unk_token=e).save_pretrained(
        str(base_tok)
    )
    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    base_model = tf.Qwen2ForCausalLM(
        tf.Qwen2Config(vocab_size=503, num_key_value_heads=2, tie_word_embeddings=True, **shape)
    )
    base_model.save_pretrained(str(tmp_path / "model"))
    (tmp_path / "zh.txt").write_text("\n".join(zh[:200]))
    (tmp_path / "mix.txt").write_text("\n".join(zh[300:330] + en[-150:]))

    v = vocab(
        VocabConfig(
            base_tokenizer=str(base_tok),
            base_model=str(tmp_path / "model"),
            corpus=[str(tmp_path / "zh.txt")],
            new_tokens=60,
            embedding_init="mean-of-subtokens",
            out_dir=str(tmp_path / "01_vocab"),
        )
    )
    assert v.metrics["model_vocab_size"] == 576 and v.metrics["tied_embeddings"]  # 563 padded to 64
    r = records(
        RecordsConfig(
            inputs=str(tmp_path / "mix.txt"),
            tokenizer=str(v.path),
            format="lm",
            add_bos=False,  # Qwen2 has no BOS
            max_length=32,
            dev_fraction=0.1,
            out_dir=str(tmp_path / "02_records"),
        )
    )
    teacher_params = sum(p.numel() for p in tf.AutoModelForCausalLM.from_pretrained(str(v.path)).parameters())
    p = prune(
        PruneConfig(
            teacher=str(v.path),
            records=str(r.path),
            num_samples=16,
            max_length=32,
            batch_size=4,
            target_params=0.7 * teacher_params,
            search=PruneSearchConfig(top_k=2, retrain_steps=2, score_samples=8, tolerance=0.05, lr=1e-3),
            out_dir=str(tmp_path / "04_prune"),
        )
    )
    student = tf.AutoModelForCausalLM.from_pretrained(str(p.path))
    assert type(student) is tf.Qwen2ForCausalLM and student.config.tie_word_embeddings
    assert len(json.loads((p.path / "search.json").read_text())["candidates"]) >= 2
    d = distill(
        DistillConfig(
            teacher=str(v.path),
            student=str(p.path),
            records=str(r.path),
            precision="fp32",
            zero_stage=0,
            micro_batch_size=4,
            max_steps=2,
            lr=1e-3,
            out_dir=str(tmp_path / "05_distill"),
        )
    )
    out = tf.AutoModelForCausalLM.from_pretrained(str(d.path))
    assert type(out) is tf.Qwen2ForCausalLM
    assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()
    after = tf.AutoTokenizer.from_pretrained(str(d.path))
    assert len(after) == v.metrics["vocab_size"] and max(after(zh[0]).input_ids) >= 503  # new ids in use
    with torch.no_grad():
        sd0 = dict(student.named_parameters())
        assert any(not torch.equal(t, sd0[n]) for n, t in out.named_parameters())  # distill trained it
