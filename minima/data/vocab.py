"""Merge Chinese SentencePiece pieces into a LLaMA tokenizer and resize the model (the vocab stage's core).

Two procedures (``mode``):

- ``chinese-llama`` (Chinese-LLaMA's ``merge_tokenizers.py``): append every normal piece of the extra
  model that the base lacks, in the extra model's order, at the top of the score range (literally 0
  with ``zero_scores``). The new pieces then win over every LLaMA merge, which also changes English
  segmentation ("$30" -> ``30``); the report measures how much.
- ``minima`` (MiniMA): append only Chinese pieces (a CJK ideograph, CJK punctuation or a fullwidth
  form), with scores below the base's
  lowest score in the extra model's order, so they never win over a base merge and English ids stay
  those of the base; then pad with unused placeholder pieces to a multiple of ``pad_to_multiple_of``.

The artifact is one directory: ``tokenizer.model`` (SentencePiece), an exact ``tokenizer.json``
(see :mod:`minima.data.tokenizers` for why transformers' own conversion is not), and, with ``base_model``,
the resized Hugging Face model (base rows bitwise unchanged) so that the adapt stage can load it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from minima.core.config import VocabConfig
from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger, progress
from minima.data.tokenizers import (
    NORMAL,
    SPACE,
    UNUSED,
    iter_lines,
    processor,
)

log = get_logger("minima.data.vocab")

# CJK ideographs in the Basic Multilingual Plane: Extension A, Unified Ideographs, Compatibility.
# (Supplementary-plane ideographs are rare; LLaMA covers them by byte fallback.)
CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# What mode=minima appends: pieces with an ideograph, CJK symbols and punctuation (、。「」《》) or a
# halfwidth/fullwidth form (，：（）). On LLaMA-2 + the shared chinese_sp.model these are 17202 pieces:
# 49202, padded to 49216, the vocabulary size of the published MiniMA-3B.
CHINESE = re.compile("[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
PAD_PIECE = "<minima_pad_{}>"

# Built-in report / self-check samples (used when sample_texts is empty).
SAMPLE_EN = [
    "The quick brown fox jumps over the lazy dog.",
    "Large language models are trained on trillions of tokens of text and code.",
    "Give three tips for staying healthy: eat well, exercise, and sleep enough.",
    "It costs $30 per hour, or about 240 dollars for an eight-hour day.",
    "def add(a, b):\n    return a + b  # two spaces, then a comment",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]
SAMPLE_ZH = [
    "法国的首都是巴黎，德国的首都是柏林。",
    "大型语言模型在海量的文本和代码上进行训练。",
    "保持健康的三个秘诀：均衡饮食、经常锻炼、睡眠充足。",
    "    此开卷第一回也。作者自云：因曾历过一番梦幻之后，故将真事隐去。",
    "今天天气很好，我们一起去公园散步吧！",
    "人工智能正在改变我们的生活和工作方式。",
]
# Always part of the self-check: indentation, runs of spaces, emoji, byte fallback, mixed scripts.
PROBES = [
    "    indented code line",
    "  two leading spaces",
    "a  b   c    d",
    "tab\there\nnew line",
    " ",
    "",
    "I love 🍕 and 🐼! 😀👍🏽👨‍👩‍👧",
    "表情🎉很好",
    "\x00\x01 control bytes",
    "Ω≈ç√∫ ünïcödé ﬁ",
    "𝔘𝔫𝔦 𠀀𠀁 𪚥",
    "Hello 世界! 我们在 2024 年用 Python 3.12 写代码。",
    "价格是$30，约合￥200元。",
]


def is_cjk_text(text: str, threshold: float = 0.3) -> bool:
    """True when CJK ideographs are at least ``threshold`` of the non-space characters."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(1 for c in chars if CJK.match(c)) >= threshold * len(chars)


# ------------------------------------------------------------------------------------ merging
@dataclass
class MergeResult:
    """A merged ``ModelProto`` and what was done to it."""

    proto: object
    base_size: int
    added: list[str] = field(default_factory=list)
    pad_pieces: int = 0
    skipped_non_normal: int = 0

    @property
    def size(self) -> int:
        return len(self.proto.pieces)


def _scores_below(start: float, n: int) -> list[float]:
    """``n`` strictly decreasing float32 scores, all below ``start`` (adjacent representable values)."""
    import numpy as np

    out, v = [], np.float32(start)
    for _ in range(n):
        v = np.nextafter(v, np.float32(-np.inf))
        out.append(float(v))
    return out


def _scores_between(top: float, floor: float, n: int) -> list[float]:
    """``n`` strictly decreasing float32 scores in ``(floor, top]``, evenly spaced."""
    import numpy as np

    vals = [float(np.float32(top - (top - floor) * i / (n + 1))) for i in range(n)]
    if any(b >= a for a, b in zip(vals, vals[1:])) or (vals and vals[-1] <= floor):
        raise InputError(
            f"{n} pieces do not fit between scores {floor} and {top} in float32", fix="set zero_scores=true"
        )
    return vals


def merge(base, extra, mode: str, pad_to_multiple_of: int = 64, zero_scores: bool = False) -> MergeResult:
    """Append the extra model's pieces to a copy of the base ``ModelProto`` (see module docstring)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.CopyFrom(base)
    res = MergeResult(proto, base_size=len(base.pieces))
    have = {p.piece for p in base.pieces}
    normal_scores = [p.score for p in base.pieces if p.type == NORMAL] or [0.0]
    lo, hi = min(normal_scores), max(normal_scores)
    new = []
    for p in extra.pieces:
        if p.type != NORMAL:
            res.skipped_non_normal += p.piece not in have
            continue
        if p.piece in have or (mode == "minima" and not CHINESE.search(p.piece)):
            continue
        have.add(p.piece)
        new.append(p.piece)
    if mode == "chinese-llama":
        if zero_scores:
            scores = [0.0] * len(new)
        else:  # same rank as score 0 against the base, but no ties among themselves
            scores = _scores_between(0.0 if hi < 0 else hi + 1.0, hi, len(new))
    elif mode == "minima":
        scores = _scores_below(lo, len(new))
    else:
        raise ConfigError(f"unknown mode {mode!r}", where="VocabConfig.mode", fix="chinese-llama or minima")
    for piece, score in zip(new, scores):
        proto.pieces.add(piece=piece, score=score, type=NORMAL)
    res.added = new
    if mode == "minima":
        res.pad_pieces = -len(proto.pieces) % pad_to_multiple_of
        floor = scores[-1] if scores else lo
        for i in range(res.pad_pieces):
            # UNUSED: never produced by SentencePiece or by the HF tokenizer (no merge forms it)
            proto.pieces.add(piece=PAD_PIECE.format(i), score=floor, type=UNUSED)
    return res


# ------------------------------------------------------------------------------------- report
def _tokens_per_char(sp, texts: Sequence[str]) -> Optional[float]:
    chars = sum(len(t) for t in texts)
    return round(sum(len(ids) for ids in sp.encode(list(texts))) / chars, 4) if chars else None


def report(base, extra, cfg: VocabConfig, merged: MergeResult, zh: list[str], en: list[str]) -> dict:
    """Tokens per character (zh/en, before/after, both modes) and how much English changed."""
    base_sp = processor(base)
    out = {
        "samples": {
            "zh_lines": len(zh),
            "en_lines": len(en),
            "zh_chars": sum(map(len, zh)),
            "en_chars": sum(map(len, en)),
        },
        "before": {"zh": _tokens_per_char(base_sp, zh), "en": _tokens_per_char(base_sp, en)},
    }
    base_en = base_sp.encode(en)
    for mode in ("chinese-llama", "minima"):
        m = merged if mode == cfg.mode else merge(base, extra, mode, cfg.pad_to_multiple_of, cfg.zero_scores)
        sp = processor(m.proto)
        changed = sum(a != b for a, b in zip(sp.encode(en), base_en))
        after = {"zh": _tokens_per_char(sp, zh), "en": _tokens_per_char(sp, en)}
        out[mode] = {
            "vocab_size": m.size,
            "after": after,
            "zh_ratio": round(after["zh"] / out["before"]["zh"], 4) if zh else None,
            "en_ratio": round(after["en"] / out["before"]["en"], 4) if en else None,
            "english_changed_fraction": round(changed / len(en), 4) if en else 0.0,
        }
    return out


def load_samples(paths: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(Chinese, English, mixed) lines from text files, or the built-in samples.

    Chinese: CJK is at least 30% of the non-space characters; English: no CJK at all; mixed lines
    (English with a few Chinese words) only go into the self-check, so that "English changed" means
    text without any CJK.
    """
    if not paths:
        return list(SAMPLE_ZH), list(SAMPLE_EN), []
    zh, en, mixed = [], [], []
    for line in progress(iter_lines(paths), "reading samples", unit="line"):
        (zh if is_cjk_text(line) else mixed if CJK.search(line) else en).append(line)
    return zh, en, mixed


# ----------------------------------------------------------------------------------- resizing
def _model_vocab_size(model_dir: str) -> int:
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        raise InputError(
            f"base_model has no config.json: {model_dir}",
            where="VocabConfig.base_model",
            fix="point at a Hugging Face model directory",
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(
            f"invalid config.json ({e})", where=str(cfg_file), fix="point at a Hugging Face model directory"
        ) from None
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    if not isinstance(size, int):
        raise InputError(
            "config.json has no integer vocab_size", where=str(cfg_file), fix="point at a causal LM directory"
        )
    return size


def _subtoken_ids(base, pieces: Sequence[str]) -> list[list[int]]:
    """The base ids each piece's surface text splits into (no dummy prefix: the piece is a fragment)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    frag = pb.ModelProto()
    frag.CopyFrom(base)
    frag.normalizer_spec.add_dummy_prefix = False
    sp = processor(frag)
    return sp.encode([p.replace(SPACE, " ") for p in pieces])


def _new_rows(old, n_new: int, init: str, std: float, groups: Optional[list[list[int]]], gen):
    """Rows for the new ids, computed in float32 and cast to the weight's dtype."""
    import torch

    w = old.float()
    mean = w.mean(0)
    if init == "mean":
        rows = mean.expand(n_new, -1).clone()
    elif init == "normal":
        rows = torch.randn(n_new, w.shape[1], generator=gen) * std
    else:  # mean-of-subtokens; pieces without sub-tokens (placeholders) get the mean
        rows = torch.empty(n_new, w.shape[1])
        for i, ids in enumerate(progress(groups, "mean-of-subtokens", unit="piece")):
            rows[i] = w[ids].mean(0) if ids else mean
    return rows.to(old.dtype)


def resize_model(model, out_dir: Path, base, merged: MergeResult, init: str, seed: int) -> dict:
    """Save a copy of the base ``model`` (as loaded by minima.models) with ``merged.size`` embedding /
    lm_head rows into ``out_dir``."""
    import torch

    model_dir = str(getattr(model, "name_or_path", "") or "base_model")
    n_old, n = merged.base_size, merged.size
    emb_in = model.get_input_embeddings().weight.detach().clone()
    out_layer = model.get_output_embeddings()
    tied = out_layer is None or out_layer.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    emb_out = None if tied else out_layer.weight.detach().clone()

    groups = None
    if init == "mean-of-subtokens":
        new_pieces = [p.piece for p in merged.proto.pieces[n_old:]]
        groups = _subtoken_ids(base, new_pieces)
        groups = [ids if p.type == NORMAL else [] for ids, p in zip(groups, merged.proto.pieces[n_old:])]
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)

    model.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        w_in = model.get_input_embeddings().weight
        w_in[:n_old] = emb_in  # resize copies them already; make the guarantee explicit
        w_in[n_old:] = _new_rows(emb_in, n - n_old, init, std, groups, gen)
        if not tied:
            w_out = model.get_output_embeddings().weight
            w_out[:n_old] = emb_out
            w_out[n_old:] = _new_rows(emb_out, n - n_old, init, std, groups, gen)
            bias = getattr(model.get_output_embeddings(), "bias", None)
            if bias is not None and bias.shape[0] != n:
                raise InputError(
                    "lm_head has a bias that resize_token_embeddings did not resize",
                    where=model_dir,
                    fix="resize this model family by hand",
                )
    unchanged = torch.equal(model.get_input_embeddings().weight[:n_old], emb_in) and (
        tied or torch.equal(model.get_output_embeddings().weight[:n_old], emb_out)
    )
    assert unchanged, "base rows changed during resize"  # a bug, not a user error
    model.config.vocab_size = n
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return {
        "model_vocab_size": n,
        "embedding_init": init,
        "tied_embeddings": tied,
        "base_rows_unchanged": unchanged,
        "model_dtype": str(emb_in.dtype).removeprefix("torch."),
    }


# ------------------------------------------------------------------------------------ the stage


# ------------------------------------------------------------------------------ byte-level BPE
# Llama-3 / Qwen / GPT-2 style tokenizers (tokenizer.json, BPE over a byte alphabet). New tokens are
# only those whose bytes contain a lead byte of U+3000..U+9FFF (0xE3..0xE9: CJK punctuation, kana and
# ideographs). A merge can only fire on text holding both of its parts, so by induction no new merge
# ever fires on text without those bytes: English (any text outside that range) keeps its base ids.
NEW_LEAD_BYTES = frozenset(range(0xE3, 0xEA))


def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode) inverted: character -> byte."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    dec = {chr(c): b for b, c in zip(bs, cs)}
    if set(dec) != set(alphabet):  # the library's alphabet is the reference
        raise RuntimeError("byte-level alphabet mismatch with tokenizers.pre_tokenizers.ByteLevel")
    return dec


def token_bytes(token: str, decoder: Optional[dict[str, int]] = None) -> bytes:
    """The raw bytes a byte-level token stands for."""
    decoder = decoder or _byte_decoder()
    return bytes(decoder[c] for c in token)


def is_byte_level_bpe(tokenizer_json: dict) -> bool:
    """True for a tokenizer.json whose model is BPE over the byte-level alphabet (Llama-3, Qwen, GPT-2)."""
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        return False
    text = json.dumps(tokenizer_json.get("pre_tokenizer"))
    return '"ByteLevel"' in text


@dataclass
class BpeExpansion:
    """An expanded tokenizer.json and what was added."""

    tokenizer_json: dict
    base_size: int  # the first new id (every base token and special token is below it)
    added: list[str] = field(default_factory=list)  # new tokens, in id order
    merges_added: int = 0
    base_merges: int = 0
    trained_merges: int = 0

    @property
    def size(self) -> int:
        return self.base_size + len(self.added)


def _merge_pair(m) -> tuple[str, str]:
    return tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))


def learn_bpe_tokens(
    base_json: dict, texts: Sequence[str], new_tokens: int, min_frequency: int = 2, vocab_factor: int = 3
) -> list[tuple[str, str]]:
    """Merges learned on ``texts`` with the base's normalizer and pre-tokenizer, in learned order.

    A fresh BPE is trained over the byte alphabet (``tokenizers``' Rust trainer) with room for
    ``vocab_factor * new_tokens`` merges; :func:`expand_bpe` keeps the ones it can use.
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    spec = {k: base_json.get(k) for k in ("normalizer", "pre_tokenizer")}
    spec.update(
        version=base_json.get("version", "1.0"),
        truncation=None,
        padding=None,
        added_tokens=[],
        post_processor=None,
        decoder=None,
        model={"type": "BPE", "vocab": {}, "merges": [], "dropout": None, "unk_token": None},
    )
    tok = Tokenizer.from_str(json.dumps(spec))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + vocab_factor * new_tokens,
        min_frequency=min_frequency,
        initial_alphabet=alphabet,
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return [_merge_pair(m) for m in json.loads(tok.to_str())["model"]["merges"]]


def expand_bpe(base_json: dict, texts: Sequence[str], new_tokens: int, min_frequency: int = 2) -> BpeExpansion:
    """Append up to ``new_tokens`` tokens and their merges, learned on ``texts``, to a byte-level BPE.

    Base vocab ids, base merges (order and content) and added/special tokens are unchanged (the
    added tokens are also written into the model vocab at their ids); new ids start after the
    highest existing id. A learned merge is kept when both parts are tokens (base or
    kept before it), its result is not a base token, and its bytes hold a CJK lead byte (see
    ``NEW_LEAD_BYTES``); kept merges go after every base merge, so they never outrank one.

    Raises:
        InputError: the tokenizer is not a byte-level BPE.
    """
    import copy

    if not is_byte_level_bpe(base_json):
        raise InputError(
            "the base tokenizer.json is not a byte-level BPE",
            where="VocabConfig.base_tokenizer",
            fix="use a Llama-3 / Qwen / GPT-2 style tokenizer.json, or a SentencePiece tokenizer.model",
        )
    out = copy.deepcopy(base_json)
    model = out["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    string_merges = bool(merges) and isinstance(merges[0], str)
    # The tokenizers library renumbers an added token that is not in the model vocab to
    # model-vocab-size + k when it loads the file; once new ids follow the specials that would move
    # them. Writing each added token into the model vocab at its own id keeps every id where it is
    # (no merge forms those strings, and added tokens are matched before the model runs).
    for t in out.get("added_tokens") or []:
        if t["content"] not in vocab:
            vocab[t["content"]] = t["id"]
    top = max(vocab.values(), default=-1)
    if len(set(vocab.values())) != top + 1:
        missing = sorted(set(range(top + 1)) - set(vocab.values()))
        raise InputError(
            f"the base tokenizer's ids are not contiguous ({len(missing)} ids missing, e.g. {missing[:5]})",
            where="VocabConfig.base_tokenizer",
            fix="use a tokenizer.json whose vocab and added tokens cover 0..N-1",
        )
    res = BpeExpansion(out, base_size=top + 1, base_merges=len(merges))
    learned = learn_bpe_tokens(base_json, texts, new_tokens, min_frequency)
    res.trained_merges = len(learned)
    dec = _byte_decoder()
    have = set(vocab)
    for a, b in learned:
        if len(res.added) >= new_tokens:
            break
        new = a + b
        if new in have or a not in have or b not in have:
            continue
        if not NEW_LEAD_BYTES.intersection(token_bytes(new, dec)):
            continue
        vocab[new] = res.base_size + len(res.added)
        merges.append(f"{a} {b}" if string_merges else [a, b])
        res.added.append(new)
        have.add(new)
    res.merges_added = len(res.added)
    return res


def bpe_subtoken_ids(base_json: dict, tokens: Sequence[str]) -> list[list[int]]:
    """The base ids each new token's bytes split into under the base BPE (for mean-of-subtokens)."""
    from tokenizers import Tokenizer

    spec = json.loads(json.dumps(base_json))
    spec.update(normalizer=None, pre_tokenizer=None, post_processor=None, added_tokens=[])
    tok = Tokenizer.from_str(json.dumps(spec))
    return [[t.id for t in tok.model.tokenize(s)] for s in tokens]


def resize_model_bpe(model, out_dir: Path, base_json: dict, exp: BpeExpansion, init: str, seed: int, pad_to: int = 1):
    """Save ``model`` with rows for the new ids (same inits as the SentencePiece path: mean, normal,
    mean-of-subtokens); rows below ``exp.base_size`` are kept bitwise, spare rows beyond it are reused."""
    import torch

    emb = model.get_input_embeddings().weight
    rows_before = emb.shape[0]
    n_new = len(exp.added)
    total = max(rows_before, exp.size)
    total += -total % pad_to
    emb_in = emb.detach().clone()
    out_layer = model.get_output_embeddings()
    tied = out_layer is None or out_layer.weight.data_ptr() == emb.data_ptr()
    emb_out = None if tied else out_layer.weight.detach().clone()
    groups = bpe_subtoken_ids(base_json, exp.added) if init == "mean-of-subtokens" else None
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    n_base = exp.base_size
    if total != rows_before:
        model.resize_token_embeddings(total, mean_resizing=False)
    new = slice(n_base, n_base + n_new)
    with torch.no_grad():
        w_in = model.get_input_embeddings().weight
        w_in[:n_base] = emb_in[:n_base]
        w_in[new] = _new_rows(emb_in[:n_base], n_new, init, std, groups, gen)
        if not tied:
            w_out = model.get_output_embeddings().weight
            w_out[:n_base] = emb_out[:n_base]
            w_out[new] = _new_rows(emb_out[:n_base], n_new, init, std, groups, gen)
    unchanged = torch.equal(model.get_input_embeddings().weight[:n_base], emb_in[:n_base]) and (
        tied or torch.equal(model.get_output_embeddings().weight[:n_base], emb_out[:n_base])
    )
    assert unchanged, "base rows changed during resize"  # a bug, not a user error
    model.config.vocab_size = total
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return {
        "model_vocab_size": total,
        "embedding_init": init,
        "tied_embeddings": tied,
        "base_rows_unchanged": unchanged,
        "model_dtype": str(emb_in.dtype).removeprefix("torch."),
    }
