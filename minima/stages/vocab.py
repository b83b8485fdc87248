"""Stage vocab: merge the extra SentencePiece model into the base tokenizer and resize the model.

Validates the inputs, runs :func:`minima.data.vocab.merge`, writes ``tokenizer.model`` + an exact
``tokenizer.json``, optionally the resized model, and a report of token counts per language.

A byte-level BPE base (a tokenizer dir whose ``tokenizer.json`` is BPE over bytes and that has no
``tokenizer.model``: Llama-3, Qwen) takes the other path, :func:`minima.data.vocab.expand_bpe`: tokens
and merges learned on ``corpus`` are appended, base ids and merges are kept, and the self-check
compares the expanded AutoTokenizer with the base one (English ids equal, every text round-trips).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from minima.core.artifacts import Artifact, StageRun, run_stage
from minima.core.config import VocabConfig
from minima.core.errors import ArtifactError, ConfigError, InputError
from minima.data.tokenizers import (
    first_difference,
    load_proto,
    mismatches,
    processor,
    save_proto_tokenizer,
)
from minima.data.vocab import (
    NEW_LEAD_BYTES,
    PROBES,
    _model_vocab_size,
    expand_bpe,
    is_byte_level_bpe,
    load_samples,
    log,
    merge,
    report,
    resize_model,
    resize_model_bpe,
)
from minima.models.loader import load_model


def _base_tokenizer_config(path: str) -> dict:
    """BOS/EOS behaviour and chat template carried over from an HF tokenizer dir, if given one."""
    p = Path(path)
    keep = ("add_bos_token", "add_eos_token", "chat_template", "model_max_length", "padding_side")
    cfg_file = p / "tokenizer_config.json"
    if not (p.is_dir() and cfg_file.is_file()):
        return {}
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(
            f"invalid tokenizer_config.json ({e})", where=str(cfg_file), fix="repair or remove it"
        ) from None
    out = {k: cfg[k] for k in keep if k in cfg}
    tmpl = p / "chat_template.jinja"
    if "chat_template" not in out and tmpl.is_file():
        out["chat_template"] = tmpl.read_text()
    return out


def byte_level_base(path: Optional[str]) -> Optional[dict]:
    """The base's tokenizer.json when it is a byte-level BPE dir without a SentencePiece model, else None."""
    if not path:
        return None
    p = Path(path)
    tj = p / "tokenizer.json"
    if not p.is_dir() or (p / "tokenizer.model").is_file() or not tj.is_file():
        return None
    try:
        data = json.loads(tj.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"invalid tokenizer.json ({e})", where=str(tj), fix="repair or replace it") from None
    return data if is_byte_level_bpe(data) else None


def validate_bpe_inputs(cfg: VocabConfig, base_json: dict) -> None:
    """Byte-level BPE path: corpus and sample files exist, base_model has a row for every base id."""
    if not cfg.corpus:
        raise ConfigError(
            "a byte-level BPE base needs corpus= (new-language text files) to learn tokens from",
            where="VocabConfig.corpus",
            fix="pass corpus=[zh.txt, ...]",
        )
    for name in ("corpus", "sample_texts"):
        for f in getattr(cfg, name):
            if not Path(f).is_file():
                raise InputError(
                    f"{name} file not found: {f}", where=f"VocabConfig.{name}", fix="give UTF-8 text files"
                )
    if cfg.base_model:
        if not Path(cfg.base_model).is_dir():
            raise InputError(
                f"base_model not found: {cfg.base_model}",
                where="VocabConfig.base_model",
                fix="point at a Hugging Face model directory",
            )
        ids = [*base_json["model"]["vocab"].values(), *(t["id"] for t in base_json.get("added_tokens") or [])]
        size, need = _model_vocab_size(cfg.base_model), max(ids) + 1
        if size < need:
            raise InputError(
                f"base_model vocab_size {size} < {need} ids of the base tokenizer",
                where=f"VocabConfig.base_model ({cfg.base_model}/config.json)",
                fix="give the tokenizer the model was trained with",
            )


def validate_inputs(cfg: VocabConfig):
    """Check everything before any output is written; returns (base proto, extra proto)."""
    for name in ("base_tokenizer", "extra_sp_model"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name} is required", where=f"VocabConfig.{name}", fix=f"pass {name}=PATH")

    def load(name: str):
        try:
            return load_proto(getattr(cfg, name))
        except InputError as e:
            raise InputError(e.what, where=f"VocabConfig.{name} ({e.where or getattr(cfg, name)})", fix=e.fix) from None

    base, extra = load("base_tokenizer"), load("extra_sp_model")
    if base.trainer_spec.model_type != 2:
        raise InputError(
            "the base tokenizer is not a BPE SentencePiece model",
            where=f"VocabConfig.base_tokenizer ({cfg.base_tokenizer})",
            fix="use a LLaMA-style tokenizer.model (BPE); the extra model may be unigram",
        )
    for f in cfg.sample_texts:
        if not Path(f).is_file():
            raise InputError(
                f"sample text file not found: {f}",
                where="VocabConfig.sample_texts",
                fix="give existing UTF-8 text files",
            )
    if cfg.base_model:
        if not Path(cfg.base_model).is_dir():
            raise InputError(
                f"base_model not found: {cfg.base_model}",
                where="VocabConfig.base_model",
                fix="point at a Hugging Face model directory",
            )
        size = _model_vocab_size(cfg.base_model)
        if size != len(base.pieces):
            raise InputError(
                f"base_model vocab_size {size} != {len(base.pieces)} pieces in the base tokenizer",
                where=f"VocabConfig.base_model ({cfg.base_model}/config.json)",
                fix="give the tokenizer the model was trained with (new ids start right after the base vocab)",
            )
    if cfg.zero_scores and cfg.mode != "chinese-llama":
        raise ConfigError(
            "zero_scores applies to mode=chinese-llama only",
            where="VocabConfig.zero_scores",
            fix="drop it or set mode=chinese-llama",
        )
    return base, extra


def run(cfg: VocabConfig, force: bool = False) -> Artifact:
    """Merge the tokenizers (and resize ``base_model``) into ``cfg.out_dir``; see the module docstring."""
    base_json = byte_level_base(cfg.base_tokenizer)
    if base_json is not None:
        return run_bpe(cfg, base_json, force)
    base, extra = validate_inputs(cfg)
    inputs = {"base_tokenizer": cfg.base_tokenizer, "extra_sp_model": cfg.extra_sp_model, "base_model": cfg.base_model}
    inputs.update({f"sample_text_{i}": f for i, f in enumerate(cfg.sample_texts)})
    carry = _base_tokenizer_config(cfg.base_tokenizer)
    add_bos, add_eos = carry.pop("add_bos_token", True), carry.pop("add_eos_token", False)

    def body(r: StageRun) -> dict:
        from transformers import AutoTokenizer

        merged = merge(base, extra, cfg.mode, cfg.pad_to_multiple_of, cfg.zero_scores)
        log.info(
            "%s: %d base pieces + %d added + %d padding = %d",
            cfg.mode,
            merged.base_size,
            len(merged.added),
            merged.pad_pieces,
            merged.size,
        )
        save_proto_tokenizer(merged.proto, r.work_dir, add_bos_token=add_bos, add_eos_token=add_eos, extra_config=carry)
        zh, en, mixed = load_samples(cfg.sample_texts)
        rep = report(base, extra, cfg, merged, zh, en)
        rep["samples"]["mixed_lines"] = len(mixed)

        # self-check: the saved dir must give SentencePiece's ids
        tok = AutoTokenizer.from_pretrained(str(r.work_dir))
        sp = processor(merged.proto)
        checked = zh + en + mixed + PROBES
        bad = mismatches(tok, sp, checked)
        if len(tok) != merged.size:
            raise ArtifactError(
                f"AutoTokenizer has {len(tok)} tokens, the merged model {merged.size}",
                where=str(r.work_dir),
                fix="report this bug",
            )
        if bad and not cfg.zero_scores:
            raise ArtifactError(
                f"AutoTokenizer disagrees with SentencePiece on {len(bad)} of {len(checked)} texts, "
                f"e.g. {first_difference(tok, sp, checked[bad[0]])}",
                where=str(r.work_dir),
                fix="the base model has equal-score merges a tokenizer.json cannot express; report it",
            )
        if bad:
            log.warning(
                "zero_scores: AutoTokenizer differs from SentencePiece on %d of %d sample texts (equal-score ties)",
                len(bad),
                len(checked),
            )

        mode_rep = rep[cfg.mode]
        metrics = {
            "mode": cfg.mode,
            "vocab_size": merged.size,
            "base_vocab_size": merged.base_size,
            "pieces_added": len(merged.added),
            "pad_pieces": merged.pad_pieces,
            "new_token_start": merged.base_size,
            "skipped_non_normal_pieces": merged.skipped_non_normal,
            "zh_tokens_per_char_before": rep["before"]["zh"],
            "zh_tokens_per_char_after": mode_rep["after"]["zh"],
            "zh_ratio": mode_rep["zh_ratio"],
            "en_tokens_per_char_before": rep["before"]["en"],
            "en_tokens_per_char_after": mode_rep["after"]["en"],
            "english_changed_fraction": mode_rep["english_changed_fraction"],
            "hf_sp_checked_texts": len(checked),
            "hf_sp_mismatch_fraction": round(len(bad) / len(checked), 4),
            "report": rep,
        }
        log.info(
            "zh tokens/char %.3f -> %.3f (x%s), English changed %.1f%%",
            rep["before"]["zh"] or 0,
            mode_rep["after"]["zh"] or 0,
            mode_rep["zh_ratio"],
            100 * mode_rep["english_changed_fraction"],
        )
        if cfg.base_model:
            model = load_model(cfg.base_model, dtype="saved", device="cpu", family="causal")
            metrics.update(resize_model(model, r.work_dir, base, merged, cfg.embedding_init, cfg.seed))
        return metrics

    partial = cfg.resolved_out_dir().with_name(cfg.resolved_out_dir().name + ".partial")
    try:
        return run_stage(cfg, inputs, body, force=force)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written
        raise


BPE_COPY = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def _read_corpus(paths, max_lines: int) -> list[str]:
    from minima.data.tokenizers import iter_lines

    out = []
    for line in iter_lines(paths):
        if line.strip():
            out.append(line)
            if len(out) >= max_lines:
                break
    return out


def _tokens_per_char(tok, texts) -> Optional[float]:
    chars = sum(map(len, texts))
    if not chars:
        return None
    return round(sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts) / chars, 4)


def run_bpe(cfg: VocabConfig, base_json: dict, force: bool = False) -> Artifact:
    """Byte-level BPE base: learn tokens + merges on ``corpus``, append them, check, resize ``base_model``."""
    validate_bpe_inputs(cfg, base_json)
    inputs = {"base_tokenizer": cfg.base_tokenizer, "base_model": cfg.base_model}
    inputs.update({f"corpus_{i}": f for i, f in enumerate(cfg.corpus)})
    inputs.update({f"sample_text_{i}": f for i, f in enumerate(cfg.sample_texts)})

    def body(r: StageRun) -> dict:
        from transformers import AutoTokenizer

        texts = _read_corpus(cfg.corpus, cfg.max_corpus_lines)
        exp = expand_bpe(base_json, texts, cfg.new_tokens, cfg.min_frequency)
        src = Path(cfg.base_tokenizer)
        for name in BPE_COPY:
            if (src / name).is_file():
                shutil.copyfile(src / name, r.work_dir / name)
        (r.work_dir / "tokenizer.json").write_text(json.dumps(exp.tokenizer_json, ensure_ascii=False))
        log.info(
            "byte-level BPE: %d base ids + %d learned tokens (%d merges trained on %d lines)",
            exp.base_size,
            len(exp.added),
            exp.trained_merges,
            len(texts),
        )
        resized = {}
        if cfg.base_model:  # first: with config.json in the dir AutoTokenizer picks the family's class
            model = load_model(cfg.base_model, dtype="saved", device="cpu", family="causal")
            resized = resize_model_bpe(
                model, r.work_dir, base_json, exp, cfg.embedding_init, cfg.seed, cfg.pad_to_multiple_of
            )
        zh, en, mixed = load_samples(cfg.sample_texts)
        if not cfg.sample_texts:
            zh = zh + texts[-200:]
        base_tok = AutoTokenizer.from_pretrained(str(src))
        tok = AutoTokenizer.from_pretrained(str(r.work_dir))
        if len(tok) != exp.size:
            raise ArtifactError(
                f"AutoTokenizer has {len(tok)} tokens, the expansion {exp.size}",
                where=str(r.work_dir),
                fix="report this bug",
            )
        # text without a byte of U+3000..U+9FFF must keep its base ids; every text must round-trip
        checked = zh + en + mixed + PROBES
        untouched = [t for t in checked if not NEW_LEAD_BYTES.intersection(t.encode("utf-8"))]
        ids = lambda k, t: k(t, add_special_tokens=False).input_ids
        changed = [t for t in untouched if ids(tok, t) != ids(base_tok, t)]
        if changed:
            raise ArtifactError(
                f"{len(changed)} of {len(untouched)} texts without CJK bytes got new ids, e.g. {changed[0]!r}",
                where=str(r.work_dir),
                fix="report this bug",
            )
        bad_trip = [t for t in checked if tok.decode(ids(tok, t)) != base_tok.decode(ids(base_tok, t))]
        if bad_trip:
            raise ArtifactError(
                f"{len(bad_trip)} texts do not decode as with the base tokenizer, e.g. {bad_trip[0]!r}",
                where=str(r.work_dir),
                fix="report this bug",
            )
        new_ids = set(range(exp.base_size, exp.size))
        used = {i for t in zh for i in ids(tok, t)} & new_ids
        before = {"zh": _tokens_per_char(base_tok, zh), "en": _tokens_per_char(base_tok, en)}
        after = {"zh": _tokens_per_char(tok, zh), "en": _tokens_per_char(tok, en)}
        metrics = {
            "mode": "byte-level-bpe",
            "vocab_size": exp.size,
            "base_vocab_size": exp.base_size,
            "pieces_added": len(exp.added),
            "merges_added": exp.merges_added,
            "new_token_start": exp.base_size,
            "corpus_lines": len(texts),
            "new_tokens_used_on_samples": len(used),
            "zh_tokens_per_char_before": before["zh"],
            "zh_tokens_per_char_after": after["zh"],
            "zh_ratio": round(after["zh"] / before["zh"], 4) if zh else None,
            "en_tokens_per_char_before": before["en"],
            "en_tokens_per_char_after": after["en"],
            "english_changed_fraction": 0.0,
            "checked_texts": len(checked),
            "checked_texts_without_cjk": len(untouched),
        }
        log.info(
            "zh tokens/char %.3f -> %.3f (x%s), English unchanged on %d texts",
            before["zh"] or 0,
            after["zh"] or 0,
            metrics["zh_ratio"],
            len(untouched),
        )
        metrics.update(resized)
        return metrics

    return run_stage(cfg, inputs, body, force=force)
