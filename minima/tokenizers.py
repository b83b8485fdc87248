"""Turning a SentencePiece model into a Hugging Face tokenizer directory.

The saved directory keeps ``tokenizer.model`` (the SentencePiece source of truth) next to the files
``save_pretrained`` writes, and ``AutoTokenizer.from_pretrained(dir)`` must give SentencePiece's ids.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import InputError

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def load_sp(path: str | Path):
    """Load a SentencePiece model file, with a clear error for a missing or non-SentencePiece file."""
    import sentencepiece as spm

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise InputError(f"SentencePiece model not found: {p}", fix="point at a tokenizer.model file or a dir holding one")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(p))
    except (RuntimeError, OSError) as e:
        raise InputError(f"not a SentencePiece model ({str(e).splitlines()[0][:120]})", where=str(p), fix="pass a .model file written by SentencePiece") from None
    return sp


def save_sp_tokenizer(sp_model: str | Path, out_dir: str | Path) -> Path:
    """Write an HF tokenizer dir for a LLaMA-style SentencePiece model (keeps tokenizer.model)."""
    from transformers import AutoTokenizer

    load_sp(sp_model)  # validates
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, out / "tokenizer.model")
    cfg = dict(SPECIAL, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
               legacy=True, clean_up_tokenization_spaces=False)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.save_pretrained(str(out))
    if not (out / "tokenizer.model").is_file():
        shutil.copyfile(sp_model, out / "tokenizer.model")
    return out
