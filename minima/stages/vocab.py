"""Stage vocab: merge the extra SentencePiece model into the base tokenizer and resize the model.

Validates the inputs, runs :func:`minima.data.vocab.merge`, writes ``tokenizer.model`` + an exact
``tokenizer.json``, optionally the resized model, and a report of token counts per language.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    PROBES,
    _model_vocab_size,
    load_samples,
    log,
    merge,
    report,
    resize_model,
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
