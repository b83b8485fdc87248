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

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from minima.core.errors import InputError, TokenizerMismatchError
from minima.core.logs import get_logger

log = get_logger("minima.data.tokenizers")

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


# ------------------------------------------------------------------------------ loading
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_dir(path: str | os.PathLike) -> Path:
    """``path``, or the ``tokenizer/`` dir inside it when ``path`` is an artifact holding one there."""
    p = Path(path)
    has_files = any((p / n).is_file() for n in TOKENIZER_MARKERS)
    return p / "tokenizer" if not has_files and (p / "tokenizer").is_dir() else p


def has_tokenizer(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` (or its ``tokenizer/`` dir) holds tokenizer files."""
    if path is None:
        return False
    d = tokenizer_dir(path)
    return d.is_dir() and any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer of a dir (or of an artifact's ``tokenizer/`` dir), with one clear error.

    Raises:
        InputError: the dir is missing (``tokenizer directory not found``) or its files cannot be
            read as a tokenizer (``tokenizer at PATH is unreadable: ...``), e.g. a truncated
            ``tokenizer.json``.
    """
    from transformers import AutoTokenizer

    p = tokenizer_dir(path)
    if not p.is_dir():
        raise InputError(
            f"tokenizer directory not found: {p}",
            fix="point tokenizer at an HF tokenizer dir (e.g. the vocab stage output)",
        )
    try:
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except Exception as e:  # tokenizers/tiktoken/sentencepiece/json each raise their own kind
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(
            f"tokenizer at {p} is unreadable: {detail}",
            where=str(p),
            fix="restore the tokenizer files (tokenizer.json, or tokenizer.model + tokenizer_config.json) "
            "from the stage that wrote them",
        ) from None


# ------------------------------------------------------------------------------ identity
def _identity(tok: Any) -> dict:
    """What makes token ids mean the same thing: the id -> piece map and the special tokens."""
    vocab = tok.get_vocab()
    pieces: list[Optional[str]] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for piece, i in vocab.items():
        pieces[i] = piece
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    added_special = sorted((int(i), str(t)) for i, t in decoder.items() if getattr(t, "special", False))
    special = {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {"pieces": pieces, "special": {k: str(v) if v is not None else None for k, v in special.items()},
            "added_special": added_special}  # fmt: skip


def tokenizer_fingerprint(tokenizer_or_dir: Any) -> str:
    """A short hash of a tokenizer's id -> piece map and special tokens (bos/eos/pad/unk, added specials).

    It is not a hash of the files: a copy of the same tokenizer, a ``tokenizer.json`` written by
    another library version, or another chat template give the same fingerprint; moving one piece to
    another id, or changing a special token, gives another.
    """
    tok = load_tokenizer(tokenizer_or_dir) if isinstance(tokenizer_or_dir, (str, os.PathLike)) else tokenizer_or_dir
    text = json.dumps(_identity(tok), ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return "tok-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _manifest(path: Path) -> dict:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def fingerprint_of(path: str | os.PathLike | None) -> Optional[str]:
    """The tokenizer fingerprint of an artifact or dir: recorded in its manifest, else computed from
    its tokenizer files; None when it has neither."""
    if path is None or not Path(path).is_dir():
        return None
    recorded = _manifest(Path(path)).get("tokenizer_fingerprint")
    if recorded:
        return recorded
    return tokenizer_fingerprint(path) if has_tokenizer(path) else None


def artifact_fingerprint(work_dir: Path, inputs: Mapping[str, Optional[str]]) -> Optional[str]:
    """The fingerprint a new artifact records: its own tokenizer's, else the one its inputs agree on
    (a logit cache holds the ids of its records without a tokenizer copy)."""
    if has_tokenizer(work_dir):
        return tokenizer_fingerprint(work_dir)
    seen = set()
    for v in inputs.values():
        if v is not None and Path(v).is_dir():
            fp = _manifest(Path(v)).get("tokenizer_fingerprint")
            if fp:
                seen.add(fp)
    return seen.pop() if len(seen) == 1 else None


def _extends(base: Any, ext: Any) -> bool:
    """Whether ``ext`` is ``base`` plus tokens appended after its last id (e.g. a chat format's specials)."""
    a, b = _identity(base), _identity(ext)
    n = len(a["pieces"])
    return b["pieces"][:n] == a["pieces"] and all(
        b["special"][k] == a["special"][k] for k in ("bos_token", "eos_token", "unk_token")
    )


PathLike = Union[str, os.PathLike]


def check_same_tokenizer(
    a_path: Optional[PathLike],
    b_path: Union[Optional[PathLike], Mapping[str, Optional[PathLike]]],
    what: str,
    *,
    a_name: str = "records",
    extends: bool = False,
) -> None:
    """Stop before ``what`` starts when two artifacts hold ids of different tokenizers.

    Args:
        a_path: the first artifact or dir (usually the records).
        b_path: the second (a model dir), or several by name (``{"teacher": t, "student": s}``).
        what: the stage or step that needs them to agree (for the message).
        a_name: what ``a_path`` is (for the message).
        extends: accept a ``b`` whose tokenizer is ``a``'s with tokens appended (sft's records built
            with a chat format's extra special tokens on top of the model's tokenizer).

    A side without a recorded fingerprint or tokenizer files is not checked (nothing to compare).

    Raises:
        TokenizerMismatchError: naming both fingerprints and both paths.
    """
    others = dict(b_path) if isinstance(b_path, Mapping) else {"model": b_path}
    fa = fingerprint_of(a_path)
    if fa is None:
        return
    for name, path in others.items():
        fb = fingerprint_of(path)
        if fb is None or fb == fa:
            continue
        if extends and _extends(load_tokenizer(path), load_tokenizer(a_path)):
            continue
        raise TokenizerMismatchError(
            f"{what}: the {a_name} tokenizer {fa} ({a_path}) is not the {name} tokenizer {fb} ({path}); "
            "the same ids would mean different pieces",
            where=str(a_path),
            fix=f"build the {a_name} with the {name}'s tokenizer (tokenizer={path}), or use the {name} "
            f"whose tokenizer built them",
        )
