"""Turning a SentencePiece model into a Hugging Face tokenizer directory.

The saved directory keeps ``tokenizer.model`` (the SentencePiece source of truth) next to the files
``save_pretrained`` writes, and ``AutoTokenizer.from_pretrained(dir)`` gives SentencePiece's ids.

Why not let transformers convert ``tokenizer.model`` itself (``tokenizer_class: LlamaTokenizer``)?
Its conversion differs from SentencePiece in two ways that matter for LLaMA-style BPE models:

1. It ranks the BPE merges by the *id* of the merged piece. SentencePiece ranks them by *score*.
   LLaMA's whitespace pieces (``▁▁`` = 259, ``▁▁▁▁`` = 268, ...) have low ids but the lowest score
   (-1e9), so transformers merges indentation before ``▁if`` / ``▁//`` and SentencePiece after.
2. Its ``Metaspace`` pre-tokenizer skips the dummy prefix when the text already starts with a space,
   while SentencePiece's ``add_dummy_prefix`` always adds it: ``"    此"`` is ``▁▁▁▁`` + ``此``
   there and ``▁▁▁▁▁`` + ``此`` here. (``legacy`` / ``add_prefix_space`` only choose between
   "always", "first" and "never", all with that skip.)

So we write our own ``tokenizer.json``: merges ordered by score (ties: longer left, then longer right
part first, which reproduces SentencePiece's leftmost-first rule inside LLaMA's equal-score
whitespace pieces), the dummy prefix as an unconditional ``Prepend`` normalizer, no pre-tokenizer,
and ``tokenizer_class: PreTrainedTokenizerFast`` so that no model-specific class rebuilds the
normalizer on load. One thing no ``tokenizer.json`` can express: SentencePiece breaks ties between
*different* merges of equal score by position, so a model whose normal pieces share scores beyond
LLaMA's whitespace runs (Chinese-LLaMA's literal score-0 merge) cannot match exactly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

from minima.core.errors import InputError

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# sentencepiece_model.proto SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_TYPE = 2  # TrainerSpec.ModelType
SPACE = "\u2581"


def _resolve_model_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise InputError(
            f"SentencePiece model not found: {p}", fix="point at a tokenizer.model file or a dir holding one"
        )
    return p


def load_sp(path: str | Path):
    """Load a SentencePiece model file, with a clear error for a missing or non-SentencePiece file."""
    import sentencepiece as spm

    p = _resolve_model_file(path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(p))
    except (RuntimeError, OSError) as e:
        raise InputError(
            f"not a SentencePiece model ({str(e).splitlines()[0][:120]})",
            where=str(p),
            fix="pass a .model file written by SentencePiece",
        ) from None
    return sp


def load_proto(path: str | Path):
    """The ``ModelProto`` of a SentencePiece model file (validated by loading it in SentencePiece)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    p = _resolve_model_file(path)
    load_sp(p)  # protobuf parses many non-model files without complaint; SentencePiece does not
    m = pb.ModelProto()
    m.ParseFromString(p.read_bytes())
    return m


def processor(proto):
    """A SentencePieceProcessor for an in-memory ``ModelProto``."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


def bpe_merges(proto) -> list[tuple[str, str]]:
    """BPE merges in SentencePiece's priority order: every split of a normal piece into two normal pieces.

    SentencePiece merges the adjacent pair whose concatenation has the highest score (ties: leftmost).
    Sorting by score, then by longer left part and longer right part, gives the same result for all
    pieces with distinct scores and for runs of equal-score whitespace pieces (the leftmost symbol
    grows first).
    """
    score = {p.piece: p.score for p in proto.pieces if p.type == NORMAL}
    merges = []
    for piece, s in score.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in score and right in score:
                merges.append((-s, -len(left), -len(right), left, right))
    merges.sort(key=lambda m: m[:3])  # stable: equal keys keep vocab order
    return [(m[3], m[4]) for m in merges]


def hf_tokenizer_from_proto(proto, add_bos: bool = True, add_eos: bool = False):
    """A ``tokenizers.Tokenizer`` that gives SentencePiece's ids for a BPE ``ModelProto``."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        processors,
    )
    from tokenizers.models import BPE

    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type != BPE_TYPE:
        raise InputError(
            f"SentencePiece model type {ts.model_type} is not BPE (2)",
            fix="the base tokenizer must be a LLaMA-style BPE SentencePiece model",
        )
    if ts.treat_whitespace_as_suffix:
        raise InputError(
            "treat_whitespace_as_suffix=true is not supported", fix="use a LLaMA-style model (whitespace as prefix)"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[ts.unk_id].piece if ts.unk_id >= 0 else None
    tok = Tokenizer(
        BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, fuse_unk=True, byte_fallback=ts.byte_fallback)
    )

    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        # unconditional, unlike Metaspace (which skips it when the text starts with a space)
        norm.append(normalizers.Prepend(SPACE))
    if not ns.HasField("escape_whitespaces") or ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = None  # SentencePiece BPE merges across the whole text; a split would change ids
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)

    # control/unknown pieces are special tokens; user-defined ones are matched verbatim like
    # SentencePiece does; unused pieces (our padding) stay unreachable vocab entries.
    added = [
        AddedToken(p.piece, special=p.type != USER_DEFINED, normalized=False)
        for p in proto.pieces
        if p.type in (UNKNOWN, CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)

    bos = proto.pieces[ts.bos_id].piece if ts.bos_id >= 0 else None
    eos = proto.pieces[ts.eos_id].piece if ts.eos_id >= 0 else None

    def seq(name: str, type_id: int) -> str:
        pre = f"{bos}:{type_id} " if add_bos and bos else ""
        post = f" {eos}:{type_id}" if add_eos and eos else ""
        return f"{pre}${name}:{type_id}{post}"

    special = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t]
    tok.post_processor = processors.TemplateProcessing(
        single=seq("A", 0), pair=f"{seq('A', 0)} {seq('B', 1)}", special_tokens=special
    )
    return tok


def save_proto_tokenizer(
    proto,
    out_dir: str | Path,
    add_bos_token: bool = True,
    add_eos_token: bool = False,
    extra_config: Optional[dict] = None,
) -> Path:
    """Write ``tokenizer.model`` + an exact ``tokenizer.json`` (via ``save_pretrained``) into ``out_dir``."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ts = proto.trainer_spec
    names = {}
    for key, idx in (
        ("unk_token", ts.unk_id),
        ("bos_token", ts.bos_id),
        ("eos_token", ts.eos_id),
        ("pad_token", ts.pad_id),
    ):
        if 0 <= idx < len(proto.pieces):
            names[key] = proto.pieces[idx].piece
    kw = dict(extra_config or {})
    hf = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer_from_proto(proto, add_bos_token, add_eos_token),
        add_bos_token=add_bos_token,
        add_eos_token=add_eos_token,
        clean_up_tokenization_spaces=False,
        **names,
        **kw,
    )
    hf.save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    # pin the generic class: a model-specific class (LlamaTokenizer) would rebuild the normalizer
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos_token, add_eos_token=add_eos_token)
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return out


def save_sp_tokenizer(sp_model: str | Path, out_dir: str | Path) -> Path:
    """Write an HF tokenizer dir for a LLaMA-style SentencePiece model (keeps tokenizer.model)."""
    proto = load_proto(sp_model)
    out = save_proto_tokenizer(proto, out_dir)
    shutil.copyfile(_resolve_model_file(sp_model), out / "tokenizer.model")  # byte-identical copy
    return out


def mismatches(hf_tokenizer, sp, texts: Sequence[str]) -> list[int]:
    """Indices of texts whose HF ids (no special tokens) differ from SentencePiece's."""
    got = hf_tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ref = sp.encode(list(texts))
    return [i for i, (a, b) in enumerate(zip(got, ref)) if list(a) != list(b)]


def first_difference(hf_tokenizer, sp, text: str) -> str:
    """A short human-readable description of where HF and SentencePiece disagree on ``text``."""
    a = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    b = sp.encode(text)
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (
        f"{text[:40]!r}: HF {hf_tokenizer.convert_ids_to_tokens(a[k : k + 3])} "
        f"vs SentencePiece {sp.id_to_piece(b[k : k + 3])}"
    )


def iter_lines(paths: Iterable[str | Path]) -> Iterable[str]:
    """Non-empty lines of text files (newline stripped, indentation kept)."""
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
