"""Stage adapt: continued pretraining of the (vocab-resized) model on ``format=lm`` records.

``minima adapt --preset tiny model=M records=R out_dir=O`` trains with the shared engine
(:mod:`minima.train`) and publishes a plain HF directory at O (DeepSpeed checkpoints in
``O/checkpoints``). A rerun with the same config skips; an interrupted run resumes from its newest
complete checkpoint.

``train_only_new_embeddings`` is Chinese-LLaMA's first phase: only the embedding and lm_head rows
of the added tokens (ids >= ``new_token_start``) learn; every other weight stays bit-identical
(their gradients are masked and these rows get no weight decay).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from minima.core.artifacts import Artifact
from minima.core.config import AdaptConfig
from minima.core.errors import ConfigError, DataError, InputError
from minima.core.logs import get_logger, progress
from minima.train import Recipe, TrainContext, train_stage

log = get_logger("minima.stages.adapt")

RECIPE = "minima.stages.adapt:AdaptRecipe"
FULL_SCAN_TOKENS = 20_000_000  # above this, validation reads a fixed-size sample (see validate_inputs)
SAMPLE_RECORDS = 4096  # records read by a sampled scan, whatever the number of shards
SAMPLE_SHARDS = 64  # shards a sampled scan opens (evenly spaced over the train and dev splits)


def resolve_new_token_start(cfg: AdaptConfig) -> int:
    """``cfg.new_token_start``, else the vocab artifact's ``new_token_start`` metric.

    The vocab manifest is looked for in the model dir, then the records' tokenizer copy.
    """
    if cfg.new_token_start is not None:
        return cfg.new_token_start
    for d in (cfg.model, str(Path(cfg.records or "") / "tokenizer"), cfg.records):
        m = Path(d or "") / "manifest.json"
        if d and m.is_file():
            value = json.loads(m.read_text()).get("metrics", {}).get("new_token_start")
            if isinstance(value, int):
                return value
    raise ConfigError(
        "train_only_new_embeddings needs the first new token id, and no vocab manifest gives it",
        where="new_token_start",
        fix="set new_token_start=<base vocab size> (32000 for LLaMA-2), or point model= at the vocab stage's output",
    )


class AdaptRecipe(Recipe):
    """Causal LM on lm records; optionally only the new tokens' embedding rows train."""

    def build_model(self, ctx: TrainContext) -> torch.nn.Module:
        model = super().build_model(ctx)
        if self.cfg.train_only_new_embeddings:
            start = resolve_new_token_start(self.cfg)
            for p in model.parameters():
                p.requires_grad_(False)
            tables = [model.get_input_embeddings().weight]
            out = model.get_output_embeddings()
            if out is not None and out.weight is not tables[0]:
                tables.append(out.weight)
            from minima.train.model_init import full_shape

            for w in tables:
                w.requires_grad_(True)
                mask = torch.zeros(full_shape(w)[0], 1, dtype=w.dtype)  # full rows, also under ZeRO-3
                mask[start:] = 1
                # Rows of the base vocab get a zero gradient; with no weight decay (below) Adam leaves them unchanged.
                w.register_hook(lambda g, m=mask: g * m.to(device=g.device, dtype=g.dtype))
            self.new_token_start = start
            rows = full_shape(tables[0])[0]
            log.info(f"train_only_new_embeddings: rows {start}..{rows - 1} of {len(tables)} table(s) train")
        return model

    def trainable_parameters(self, model):
        params = [p for p in model.parameters() if p.requires_grad]
        if self.cfg.train_only_new_embeddings:
            return [{"params": params, "weight_decay": 0.0}]
        return params


def _model_vocab(model_dir: Path) -> tuple[int, Optional[int]]:
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    return int(text["vocab_size"]), text.get("max_position_embeddings")


def _scan_records(records: Path, vocab: int, full: bool) -> tuple[int, int]:
    """Check every scanned token id is in [0, vocab); returns (records scanned, shards opened).

    ``full`` reads everything (small corpora). Otherwise at most :data:`SAMPLE_SHARDS` evenly spaced
    shards and :data:`SAMPLE_RECORDS` records in all are read, so the time does not grow with the shard count.
    """
    import numpy as np

    from minima.data.records import tfrecord_io as tio

    files = sorted((records / "train").glob("part-*.tfrecord")) + sorted((records / "dev").glob("part-*.tfrecord"))
    quota = None
    if not full and files:
        picks = np.unique(np.linspace(0, len(files) - 1, min(SAMPLE_SHARDS, len(files))).round().astype(int))
        files = [files[i] for i in picks]
        quota = max(1, SAMPLE_RECORDS // len(files))
    scanned = 0
    for f in progress(files, desc="validate records", unit="shard"):
        with open(f, "rb") as fh:
            for i, entry in enumerate(tio.iter_entries(fh, str(f))):
                if quota is not None and i >= quota:
                    break
                ids = tio.decode_example(entry, f"{f} record {i}")["indices"]
                scanned += 1
                if len(ids) and (ids.max() >= vocab or ids.min() < 0):
                    bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
                    raise DataError(
                        f"token id {bad} is outside the model's vocab (size {vocab})",
                        where=f"{f} record {i}",
                        fix="build the records with the tokenizer of this model (the vocab stage's output), "
                        "or resize the model",
                    )
    return scanned, len(files)


def _check_id_range(meta: dict, records: Path, vocab: int) -> bool:
    """Check the id range the records build wrote in its manifest; False when the manifest has none."""
    lo, hi = meta.get("min_token_id"), meta.get("max_token_id")
    if not (isinstance(lo, int) and isinstance(hi, int)):
        return False
    if hi >= vocab or lo < 0:
        bad = hi if hi >= vocab else lo
        raise DataError(
            f"the records hold token id {bad}, outside the model's vocab (size {vocab})",
            where=f"{records / 'manifest.json'} (min_token_id={lo}, max_token_id={hi})",
            fix="build the records with the tokenizer of this model (the vocab stage's output), or resize the model",
        )
    log.info(f"validated the records' token ids from their manifest: [{lo}, {hi}] < {vocab}")
    return True


def validate_inputs(cfg: AdaptConfig) -> None:
    """Every check that can fail before any training: files, formats, vocab agreement, ds_config."""
    from minima.train.ds_config import load_ds_config

    if not cfg.model:
        raise ConfigError(
            "adapt needs a model", where="model", fix="set model=<HF model dir> (e.g. the vocab stage output)"
        )
    if not cfg.records:
        raise ConfigError("adapt needs records", where="records", fix="set records=<records artifact dir> (format=lm)")
    model, records = Path(cfg.model), Path(cfg.records)
    if not (model / "config.json").is_file():
        raise InputError(
            f"not an HF model directory (no config.json): {model}",
            where="model",
            fix="point model= at a directory written by save_pretrained (e.g. the vocab stage output)",
        )
    if not (records / "train").is_dir() or not any((records / "train").glob("part-*.tfrecord")):
        raise InputError(
            f"records not found: {records}/train/part-*.tfrecord",
            where="records",
            fix="build them with `minima records format=lm ...` and point records= at its out_dir",
        )
    meta = {}
    if (records / "manifest.json").is_file():
        meta = json.loads((records / "manifest.json").read_text()).get("metrics", {})
    if meta.get("format") not in (None, "lm"):
        raise ConfigError(
            f"adapt trains on format=lm records, {records} has format={meta.get('format')}",
            where="records",
            fix="build pretraining records with format=lm (chat records are for sft)",
        )
    load_ds_config(cfg.ds_config)

    vocab, max_pos = _model_vocab(model)
    rec_vocab = meta.get("vocab_size")
    if isinstance(rec_vocab, int) and rec_vocab > vocab:
        raise DataError(
            f"the records' tokenizer has {rec_vocab} tokens but the model's vocab is {vocab} "
            f"({rec_vocab - vocab} ids would be out of range)",
            where=str(records),
            fix="resize the model with the vocab stage (base_model=...), "
            "or build the records with the model's tokenizer",
        )
    max_len = meta.get("max_length")
    if isinstance(max_len, int) and max_pos and max_len > max_pos:
        raise ConfigError(
            f"records max_length={max_len} exceeds the model's max_position_embeddings={max_pos}",
            where="records",
            fix=f"rebuild the records with max_length <= {max_pos}",
        )
    _check_tokenizers_agree(model, records)
    from minima.data.tokenizers import check_same_tokenizer

    check_same_tokenizer(records, model, "adapt")
    if not _check_id_range(meta, records, vocab):  # records built before the manifest kept the range: read them
        total = meta.get("total_tokens")
        full = not isinstance(total, int) or total <= FULL_SCAN_TOKENS
        n, shards = _scan_records(records, vocab, full)
        log.info(f"validated {n} records ({'all' if full else 'a sample'}) of {shards} shards: ids < {vocab}")
    if cfg.train_only_new_embeddings:
        start = resolve_new_token_start(cfg)
        if not 0 < start < vocab:
            raise ConfigError(
                f"new_token_start={start} must be in (0, {vocab}) (the model's vocab size)", where="new_token_start"
            )


def _check_tokenizers_agree(model: Path, records: Path) -> None:
    """The model dir's tokenizer (when it has one) must be the tokenizer the records were built with."""
    tok_dir = records / "tokenizer"
    has = lambda d: any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if not (has(model) and has(tok_dir)):
        return
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(model)).get_vocab()
    b = AutoTokenizer.from_pretrained(str(tok_dir)).get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
        piece, idx = diff[0] if diff else ("?", -1)
        raise DataError(
            f"the model's tokenizer ({len(a)} tokens) differs from the records' ({len(b)} tokens), "
            f"first at id {idx} ({piece!r})",
            where=f"{model} vs {tok_dir}",
            fix="build the records with this model's tokenizer (records tokenizer=<model dir>)",
        )


def run(cfg: AdaptConfig, force: bool = False) -> Artifact:
    """Continued pretraining; returns the published (or cached) artifact."""
    from minima.evaluate.callback import training_callbacks

    inputs = {
        "model": cfg.model,
        "records": cfg.records,
        "ds_config": cfg.ds_config if Path(cfg.ds_config).is_file() else None,
    }
    return train_stage(
        cfg, inputs, RECIPE, force=force, callbacks=training_callbacks(cfg), validate=lambda: validate_inputs(cfg)
    )
