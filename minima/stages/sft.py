"""Stage sft: chat instruction tuning (MiniChat) on the shared training loop.

``minima sft model=DIR records=DIR`` (or ``train_files=[a.json, ...]``, built through the records
stage first) trains on chat records with labels on the assistant replies (``loss_on``), optional
LoRA adapters (:mod:`minima.train.lora`), NEFTune noise (:mod:`minima.train.neftune`) and packing
(:mod:`minima.data.packing`). The exported directory is a standard HF model dir whose tokenizer carries
the format's Jinja chat template and whose generation_config stops at the format's end-of-turn
token. Causal LMs (LLaMA, Bloom, OPT/Galactica ...) and seq2seq T5 (the prompt goes to the encoder,
each reply is a target) are supported.

:class:`SftRecipe` runs on :mod:`minima.train` under either strategy (``strategy=deepspeed``, ZeRO,
or ``strategy=fsdp``, torch FSDP2), with the same resume, dev evaluation, patience (the best
checkpoint exported) and callbacks. QLoRA needs ``strategy=deepspeed``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from minima.core.artifacts import Artifact
from minima.core.config import RecordsConfig, SftConfig, Source
from minima.core.errors import ConfigError, InputError, TrainingError
from minima.core.logs import get_logger
from minima.data.formats import chat_template, get_format, stop_token_ids
from minima.train.recipe import (
    IGNORE_INDEX,
    LM_LOSS_CHUNK,
    LossOut,
    Recipe,
    TrainContext,
    causal_lm_loss_sum,
    shifted_label_count,
)

log = get_logger("minima.stages.sft")
RECIPE = "minima.stages.sft:SftRecipe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


# ----------------------------------------------------------------------------------- labels
def label_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the contiguous label-carrying spans (one per assistant reply)."""
    on = (labels != IGNORE_INDEX).tolist()
    runs, start = [], None
    for i, v in enumerate(on + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


def apply_loss_on(example: dict, loss_on: str) -> dict:
    """Relabel a chat record: ``assistant`` keeps the records' mask, ``all`` labels every real token
    (instruction modelling), ``last-turn`` keeps only the last reply."""
    if loss_on == "assistant":
        return example
    ids, labels = example["input_ids"], example["labels"]
    if loss_on == "all":
        attn = example.get("attention_mask")
        new = ids.clone() if attn is None else torch.where(attn.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    elif loss_on == "last-turn":
        new = torch.full_like(labels, IGNORE_INDEX)
        runs = label_runs(labels)
        if runs:
            s, e = runs[-1]
            new[s:e] = labels[s:e]
    else:
        raise ConfigError(f"unknown loss_on={loss_on!r}", where="sft.loss_on", fix="use assistant, all or last-turn")
    return {**example, "labels": new}


def to_seq2seq(example: dict, loss_on: str) -> list[dict]:
    """A chat record as encoder/decoder pairs: the conversation up to a reply -> that reply.

    ``assistant`` gives one pair per reply (earlier turns are context), ``last-turn`` only the last.
    """
    ids = example["input_ids"]
    runs = label_runs(example["labels"])
    if loss_on == "last-turn":
        runs = runs[-1:]
    return [{"input_ids": ids[:s], "labels": ids[s:e].clone()} for s, e in runs if s > 0]


class _FlatMap(torch.utils.data.IterableDataset):
    """``fn(example) -> list of examples`` over a resumable dataset, itself resumable.

    The examples already produced from the last inner record but not yet handed out are part of
    the state, so a restart continues exactly after the last consumed one.
    """

    def __init__(self, inner, fn):
        self.inner, self.fn = inner, fn
        self._pending: list[dict] = []
        self._restored: Optional[list[dict]] = None

    def __iter__(self):
        self._pending, self._restored = list(self._restored or []), None
        while self._pending:
            yield self._pending.pop(0)
        for ex in self.inner:
            self._pending = list(self.fn(ex))
            while self._pending:
                yield self._pending.pop(0)

    def state_dict(self) -> dict:
        return {
            "inner": self.inner.state_dict(),
            "pending": [{k: v.tolist() for k, v in d.items() if isinstance(v, torch.Tensor)} for d in self._pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self._restored = [
            {k: torch.tensor(v, dtype=torch.long) for k, v in d.items()} for d in state.get("pending", [])
        ]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


def pad_stack(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s)
    return out


# ----------------------------------------------------------------------------------- recipe
class SftRecipe(Recipe):
    """Chat SFT on chat records: loss_on relabelling, packing, seq2seq, LoRA, NEFTune, chat export."""

    def __init__(self, cfg: SftConfig):
        super().__init__(cfg)
        self.fmt = get_format(cfg.chat_format)
        self.seq2seq = False

    # ------------------------------------------------------------------ model
    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        if self.tokenizer is None:
            raise InputError(
                "no tokenizer found in the records' tokenizer/ copy or the model dir",
                where=str(self.cfg.records),
                fix="build the records with `minima records` (it copies the tokenizer)",
            )
        from transformers import AutoConfig

        self.seq2seq = bool(AutoConfig.from_pretrained(str(self.cfg.model)).is_encoder_decoder)

    def build_model(self, ctx: TrainContext) -> torch.nn.Module:
        from transformers import AutoConfig

        from minima.train.lora import apply_lora, check_qlora, quantization_config
        from minima.train.model_init import full_shape, load_pretrained
        from minima.train.neftune import attach_neftune

        cfg = self.cfg
        check_qlora(cfg.lora)
        kw: dict[str, Any] = {"dtype": torch.float32}
        if cfg.lora.enabled and cfg.lora.qlora:
            kw.update(quantization_config=quantization_config(), device_map={"": ctx.local_rank}, dtype=torch.bfloat16)
        n_tok = len(self.tokenizer)
        vocab = getattr(AutoConfig.from_pretrained(str(cfg.model)).get_text_config(), "vocab_size", None)
        # LoRA and resized embeddings change the parameters after loading: FSDP then sends rank 0's to the others
        kw["rank0_copy"] = cfg.lora.enabled or vocab is None or n_tok > vocab
        model = load_pretrained(cfg.model, cfg, ctx, "seq2seq" if self.seq2seq else "causal", **kw)
        if n_tok > full_shape(model.get_input_embeddings().weight)[0]:
            # Only the format's own tokens (e.g. ChatML's <|im_start|>) get here; run() checks that.
            model.resize_token_embeddings(n_tok, mean_resizing=True)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if cfg.lora.enabled:
            if cfg.activation_checkpointing:
                model.enable_input_require_grads()  # checkpointed blocks need a grad path from the frozen embeddings
            model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.activation_checkpointing)
            if ctx.is_rank0:
                n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
                n_all = sum(p.numel() for p in model.parameters())
                log.info(
                    f"LoRA r={cfg.lora.r}: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)"
                )
        attach_neftune(model, cfg.neftune_alpha)
        return model

    # ------------------------------------------------------------------ data
    def _wrap(self, ds, train: bool):
        cfg = self.cfg
        if self.seq2seq:
            return _FlatMap(ds, lambda ex: to_seq2seq(ex, cfg.loss_on))
        if cfg.loss_on != "assistant":
            ds = _FlatMap(ds, lambda ex: [apply_loss_on(ex, cfg.loss_on)])
        if cfg.packing and train:
            from minima.data.packing import PackedDataset

            ds = PackedDataset(ds, cfg.max_length)
        return ds

    def build_datasets(self, ctx: TrainContext):
        train, dev = super().build_datasets(ctx)
        # Dev is never packed: packed and unpacked losses are equal, and dev batches stay comparable.
        return self._wrap(train, True), (self._wrap(dev, False) if dev is not None else None)

    def num_train_examples(self) -> Optional[int]:
        n = super().num_train_examples()
        if self.cfg.packing and n:
            from minima.data.records import read_records_manifest

            toks = read_records_manifest(str(self.cfg.records)).get("num_tokens", {})
            t = toks.get("train") if isinstance(toks, dict) else None
            if t:
                # Packed sequences per epoch, estimated as if each were full (a slight under-count).
                return max(1, math.ceil(t / self.cfg.max_length))
        return n

    def collate(self, batch: list[dict]) -> dict:
        if "position_ids" in batch[0]:
            from minima.data.packing import collate_packed

            return collate_packed(batch, self.pad_id)
        if self.seq2seq:
            ids = pad_stack([b["input_ids"] for b in batch], self.pad_id)
            attn = pad_stack([torch.ones(len(b["input_ids"]), dtype=torch.long) for b in batch], 0)
            return {
                "input_ids": ids,
                "attention_mask": attn,
                "labels": pad_stack([b["labels"] for b in batch], IGNORE_INDEX),
            }
        return super().collate(batch)

    # ------------------------------------------------------------------ loss
    def count_tokens(self, batch: dict) -> int:
        if self.seq2seq:  # decoder labels are aligned with the logits: no shift
            return int((batch["labels"] != IGNORE_INDEX).sum())
        return shifted_label_count(batch["labels"])

    def compute_loss(self, model, batch: dict, ctx: TrainContext, train: bool) -> LossOut:
        if self.seq2seq:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                use_cache=False,
            )
            from minima.train.objectives.kd import dense_loss

            labels = batch["labels"].reshape(-1)  # decoder labels are aligned with the logits: no shift
            ce, _ = dense_loss(out.logits.reshape(-1, out.logits.shape[-1]), labels, None, chunk=LM_LOSS_CHUNK)
            return LossOut(loss_sum=ce.sum(), num_tokens=(labels != IGNORE_INDEX).sum())
        if "position_ids" in batch:
            from minima.data.packing import mask_mode, model_inputs

            out = model(**model_inputs(batch, mask_mode(getattr(model, "module", model)), ctx.dtype))
            loss_sum, n = causal_lm_loss_sum(out.logits, batch["labels"])
            return LossOut(loss_sum=loss_sum, num_tokens=n)
        return super().compute_loss(model, batch, ctx, train)

    # ------------------------------------------------------------------ export
    def export(self, model, out_dir: Path, ctx: TrainContext) -> None:
        """Merged (or plain) HF dir, or a LoRA adapter dir; tokenizer with the chat template."""
        from minima.train.lora import export_lora, is_peft
        from minima.train.neftune import detach_neftune

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        detach_neftune(model)
        if is_peft(model):
            export_lora(model, out, merge=self.cfg.lora.merge, base_model=str(Path(self.cfg.model).resolve()))
            hf = model if self.cfg.lora.merge else model.get_base_model()
        else:
            model.save_pretrained(str(out), safe_serialization=True, max_shard_size="2GB")
            hf = model
        tok = self.tokenizer
        tok.chat_template = chat_template(self.fmt, tok)
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        tok.save_pretrained(str(out))
        src = self.tokenizer_source()
        if src is not None and (src / "tokenizer.model").is_file() and not (out / "tokenizer.model").is_file():
            import shutil

            shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
        gen = _generation_config(getattr(hf, "generation_config", None), self.fmt, tok)
        gen.save_pretrained(str(out))
        check_template(self.fmt, tok, out)


def _generation_config(base, fmt, tok):
    """The generation config: stop at the format's end-of-turn token(s), pad with the pad token."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    stops = stop_token_ids(fmt, tok)
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.bos_token_id = tok.bos_token_id
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    return gen


SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "法国的首都是哪里？"},
    {"role": "assistant", "content": "巴黎。"},
]


def check_template(fmt, tok, out_dir: Optional[Path] = None) -> None:
    """The chat template (as saved in ``out_dir``, else built for ``tok``) must give the training ids.

    Run before training (a tokenizer the template cannot follow fails in seconds, not after the
    run) and again on the exported tokenizer.
    """
    import copy

    from transformers import AutoTokenizer

    if out_dir is not None:
        saved = AutoTokenizer.from_pretrained(str(out_dir))
    else:
        saved = copy.deepcopy(tok)
        saved.chat_template = chat_template(fmt, tok)
    want, _ = fmt.encode(tok, SAMPLE_CONVERSATION)
    got = list(saved.apply_chat_template(SAMPLE_CONVERSATION, tokenize=True)["input_ids"])
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got + [-1], want + [-2])) if a != b)
        raise TrainingError(
            f"the chat template of format {fmt.name!r} does not reproduce the training ids for this tokenizer "
            f"(first difference at token {first})",
            where=str(out_dir / "tokenizer_config.json") if out_dir is not None else getattr(tok, "name_or_path", None),
            fix="this tokenizer's spacing around special tokens is not handled by minima.data.formats.spacing; "
            "report it with the tokenizer",
        )


# ----------------------------------------------------------------------------- validation
def _model_config(model_dir: str):
    from transformers import AutoConfig

    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise InputError(
            f"no model at {model_dir} (config.json missing)",
            where="sft.model",
            fix="point model at an HF model dir, e.g. the distill stage's output",
        )
    return AutoConfig.from_pretrained(str(p), trust_remote_code=False)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def validate(cfg: SftConfig, records: Optional[str] = None) -> None:
    """Everything checkable before any work: model, format, records, LoRA, packing, family."""
    from minima.data.packing import check_packable
    from minima.train.lora import check_qlora, check_targets

    if not cfg.model:
        raise ConfigError("sft needs a model", where="sft.model", fix="set model=DIR (an HF model dir)")
    mcfg = _model_config(cfg.model)
    fmt = get_format(cfg.chat_format)
    records = records or cfg.records
    if not records and not cfg.train_files:
        raise ConfigError(
            "sft needs chat records or raw chat files",
            where="sft.records",
            fix="set records=DIR (built by `minima records format=chat`) or train_files=[file.json, ...]",
        )
    if cfg.records and cfg.train_files:
        raise ConfigError(
            "give either records or train_files, not both", where="sft.train_files", fix="drop one of them"
        )
    if records and not cfg.train_files:
        from minima.data.records import read_records_manifest

        if not Path(records).is_dir():
            raise InputError(
                f"records directory not found: {records}",
                where="sft.records",
                fix="build it with `minima records format=chat ...`",
            )
        meta = read_records_manifest(str(records))
        if meta.get("format") not in (None, "chat"):
            raise ConfigError(
                f"sft needs format=chat records; {records} holds format={meta.get('format')} records",
                where="sft.records",
                fix="build the records with format=chat",
            )
        if meta.get("chat_format") and meta["chat_format"] != cfg.chat_format:
            raise ConfigError(
                f"the records were built with chat_format={meta['chat_format']!r} "
                f"but sft.chat_format={cfg.chat_format!r}",
                where="sft.chat_format",
                fix=f"set chat_format={meta['chat_format']}, or rebuild the records with chat_format={cfg.chat_format}",
            )
    from minima.data.tokenizers import check_same_tokenizer

    check_same_tokenizer(records if not cfg.train_files else None, cfg.model, "sft", extends=True)
    check_qlora(cfg.lora)
    if cfg.strategy == "fsdp" and cfg.lora.qlora:
        raise ConfigError(
            "QLoRA is not supported with strategy=fsdp", where="sft.strategy", fix="use strategy=deepspeed for QLoRA"
        )
    if mcfg.is_encoder_decoder:
        if cfg.loss_on == "all":
            raise ConfigError(
                "loss_on=all needs a decoder-only model; a seq2seq model only predicts its targets",
                where="sft.loss_on",
                fix="use loss_on=assistant or last-turn for T5-style models",
            )
        if cfg.packing:
            raise ConfigError("packing=true is for decoder-only models", where="sft.packing", fix="set packing=false")
    if cfg.packing:
        check_packable(mcfg)
    if cfg.lora.enabled:
        # A meta-device copy has the module names without allocating weights.
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        cls = AutoModelForSeq2SeqLM if mcfg.is_encoder_decoder else AutoModelForCausalLM
        with torch.device("meta"):
            skeleton = cls.from_config(mcfg)
        check_targets(skeleton, cfg.lora)
    del fmt


def _vocab_check(cfg: SftConfig, tokenizer_dir: Path, added: tuple[str, ...] = ()) -> None:
    """Records' tokenizer vs the model's embedding rows (extra rows are fine, missing ones are not)."""
    mcfg = _model_config(cfg.model)
    tok = _load_tokenizer(tokenizer_dir)
    rows = getattr(mcfg, "vocab_size", None) or len(tok)
    extra = [t for t in added if t in tok.get_added_vocab()]
    if len(tok) > rows + len(extra):
        raise ConfigError(
            f"the records' tokenizer has {len(tok)} tokens but the model has {rows} embedding rows "
            f"({len(tok) - rows} ids would index past the embedding)",
            where=str(tokenizer_dir),
            fix="build the records with the model's tokenizer (the vocab stage output)",
        )


# ----------------------------------------------------------------------------- raw files
def _format_tokenizer(cfg: SftConfig, base: Path, out: Path) -> Path:
    """The model's tokenizer, plus the format's own special tokens (ChatML) when it lacks them."""
    fmt = get_format(cfg.chat_format)
    need = tuple(getattr(fmt, "added_tokens", ()))
    tok = _load_tokenizer(base)
    missing = [t for t in need if t not in tok.get_added_vocab()]
    if not missing:
        return base
    if (out / "tokenizer_config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tok.add_tokens(missing, special_tokens=True)
    tok.save_pretrained(str(tmp))
    if (base / "tokenizer.model").is_file():
        import shutil

        shutil.copyfile(base / "tokenizer.model", tmp / "tokenizer.model")
    os.replace(tmp, out)
    log.info(f"added {missing} to the tokenizer for format {cfg.chat_format} ({out})")
    return out


def build_records(cfg: SftConfig, force: bool = False) -> Path:
    """Build ``train_files`` into a chat records artifact next to the sft output (cached)."""
    from minima.stages.records import run as records_run

    out = cfg.resolved_out_dir()
    tok_dir = _format_tokenizer(cfg, Path(cfg.model), out.with_name(out.name + ".tokenizer"))
    sources = [Source(name=f"file{i}_{Path(p).stem}", path=p) for i, p in enumerate(cfg.train_files)]
    rcfg = RecordsConfig(
        inputs=sources,
        tokenizer=str(tok_dir),
        format="chat",
        chat_format=cfg.chat_format,
        max_length=cfg.max_length,
        dev_fraction=cfg.dev_fraction,
        seed=cfg.seed,
        out_dir=str(out.with_name(out.name + ".records")),
        shard_size=100000,
    )
    art = records_run(rcfg, force=force)
    log.info(f"sft records: {art.path} ({art.metrics.get('num_records')})")
    return art.path


# ----------------------------------------------------------------------------------- run
def _wait_for_records(path: Path, timeout_s: int) -> None:
    """Non-leader nodes: node 0 builds train_files into records; wait until they are complete."""
    from minima.core.artifacts import is_complete

    t0 = time.time()
    while not is_complete(path):
        if time.time() - t0 > timeout_s:
            raise TrainingError(
                f"records {path} were not built by node 0 within {timeout_s}s",
                fix="build them first (minima records format=chat ...) and pass records=DIR",
            )
        time.sleep(5)


def run(cfg: SftConfig, force: bool = False) -> Artifact:
    """Train and publish the sft artifact (skipped when the cache key matches)."""
    from minima.train.launch import plan_launch, train_stage

    validate(cfg)
    plan = plan_launch(cfg)
    records = cfg.records
    cfg_run = cfg
    if cfg.train_files:
        out = cfg.resolved_out_dir()
        if plan.is_leader:
            records = str(build_records(cfg, force=force))
        else:
            records = str(out.with_name(out.name + ".records"))
            _wait_for_records(Path(records), cfg.launch.join_timeout_s)
        cfg_run = cfg.model_copy(update={"records": records, "train_files": []})
    fmt = get_format(cfg.chat_format)
    tok_dir = Path(records) / "tokenizer" if (Path(records) / "tokenizer").is_dir() else Path(cfg.model)
    _vocab_check(cfg_run, tok_dir, tuple(getattr(fmt, "added_tokens", ())))
    check_template(fmt, _load_tokenizer(tok_dir))
    inputs = {"model": cfg.model, "records": records}
    from minima.evaluate.callback import (
        training_callbacks,  # eval_tasks: benchmark scores at each dev evaluation
    )

    callbacks = training_callbacks(cfg_run)
    return train_stage(cfg_run, inputs, RECIPE, force=force, callbacks=callbacks)
