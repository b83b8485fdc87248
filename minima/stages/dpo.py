"""Stage dpo: preference tuning of the sft model (MiniChat-2's last step) on the shared training loop.

``minima dpo model=<sft output> records=<preference records>`` (or ``train_files=[...]``, built
through ``minima records format=preference`` first) trains the policy on (prompt, chosen, rejected)
pairs with ``loss.type`` = ``sigmoid`` (DPO; ``label_smoothing`` gives cDPO), ``ipo``, ``simpo`` or
``orpo`` (the maths: :mod:`minima.train.objectives.dpo`). Chosen and rejected go through the model in
one forward of 2B rows. The unit of the loss is the pair: ``count_tokens`` counts pairs, so the loop's
``loss_sum / count`` is the mean over the step's pairs, exact under gradient accumulation and
across ranks like every other stage.

The reference model (sigmoid and ipo; simpo and orpo need none), one of:

- a frozen copy of ``model``: eval mode, no grad, bf16 on GPU (fp32 on CPU), replicated or sharded
  with ZeRO-3 inference (``ref_zero3``), as distill's teacher;
- ``precompute_ref=true``: one pass of that copy over the train and dev records before training,
  storing each pair's two reference log-probs under ``<work dir>/ref_logps`` (per part, so an
  interrupted pass resumes), then freed: training holds one model;
- with LoRA, the policy itself with its adapters disabled (no copy).

Metrics, train and dev, by TRL's names: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (orpo adds
``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``). The dev split is also evaluated before the first
step; the manifest holds ``dev_reward_accuracy`` and ``dev_reward_accuracy_initial``. The export is
a plain HF dir (or a LoRA adapter dir) with the sft model's tokenizer, chat template and generation
config. Both strategies (``deepspeed``, ``fsdp``), full and LoRA.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from minima.core.artifacts import Artifact
from minima.core.config import DpoConfig, RecordsConfig, Source
from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger, progress
from minima.data.records.preference import PreferenceDataset, collate_pairs
from minima.train.objectives.dpo import preference_losses, token_logps
from minima.train.recipe import LossOut, Recipe, TrainContext

log = get_logger("minima.stages.dpo")
RECIPE = "minima.stages.dpo:DpoRecipe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
REF_DIR = "ref_logps"
REF_PART = 256  # pairs per stored part of the precomputed reference log-probs
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


def metric_names(loss_type: str) -> tuple[str, ...]:
    return METRICS + (ORPO_METRICS if loss_type == "orpo" else ())


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


# ----------------------------------------------------------------------------------- recipe
class DpoRecipe(Recipe):
    """The preference recipe: pairs in, a reference (copy, precomputed, or LoRA-disabled) beside the policy."""

    eval_at_start = True

    def __init__(self, cfg: DpoConfig):
        super().__init__(cfg)
        self.ref: Optional[torch.nn.Module] = None
        self.ref_logps: dict[str, np.ndarray] = {}
        self.ref_bytes = 0  # parameter bytes of the frozen reference held during training (this rank)

    # ------------------------------------------------------------------ the reference
    def tokenizer_source(self) -> Optional[Path]:
        """The sft model's tokenizer (it carries the chat template), else the records' copy."""
        m = Path(self.cfg.model)
        if any((m / f).is_file() for f in TOKENIZER_FILES):
            return m
        return super().tokenizer_source()

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        cfg = self.cfg
        if cfg.reference_free():
            return
        if cfg.precompute_ref:
            self.ref_logps = precompute_reference(cfg, ctx)
        elif not cfg.lora.enabled:
            from minima.models.loader import load_teacher

            self.ref = load_teacher(cfg.model, ctx.device, cfg.ref_zero3, cfg.micro_batch_size)
            if cfg.disable_dropout:
                _disable_dropout(self.ref)
            self.ref_bytes = sum(p.numel() * p.element_size() for p in self.ref.parameters())
        where = (
            "precomputed log-probs"
            if cfg.precompute_ref
            else "the base with adapters disabled"
            if cfg.lora.enabled
            else f"frozen copy, {self.ref_bytes / 2**20:.1f} MiB"
        )
        if ctx.is_rank0:
            log.info(f"dpo: loss {cfg.loss.type}, beta {cfg.loss.beta}; reference: {where}")

    # ------------------------------------------------------------------ model
    def build_model(self, ctx: TrainContext) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from minima.train.lora import apply_lora, check_qlora, quantization_config

        cfg = self.cfg
        check_qlora(cfg.lora)
        kw: dict[str, Any] = {"dtype": torch.float32}
        if cfg.lora.enabled and cfg.lora.qlora:
            kw.update(quantization_config=quantization_config(), device_map={"": ctx.local_rank}, dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(cfg.model), **kw)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if cfg.lora.enabled:
            if cfg.activation_checkpointing:
                model.enable_input_require_grads()
            model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.activation_checkpointing)
        if cfg.disable_dropout:
            _disable_dropout(model)
        return model

    # ------------------------------------------------------------------ data
    def build_datasets(self, ctx: TrainContext):
        recs = str(self.cfg.records)
        kw = dict(rank=ctx.rank, world_size=ctx.world_size, seed=ctx.seed)
        train = PreferenceDataset(recs, "train", extras=self._extras("train"), loop=True, **kw)
        self.pad_id = train.pad_id
        dev = None
        if _has_split(recs, "dev"):
            dev = PreferenceDataset(recs, "dev", extras=self._extras("dev"), shuffle_buffer=0, **kw)
            if dev.num_records == 0:
                dev = None
        return train, dev

    def _extras(self, split: str) -> dict:
        return {"ref_logps": self.ref_logps[split]} if split in self.ref_logps else {}

    def collate(self, batch: list[dict]) -> dict:
        return collate_pairs(batch, self.pad_id)

    def count_tokens(self, batch: dict) -> int:
        """Pairs (the loss is a mean over pairs): those whose chosen row has a label."""
        if "index" not in batch:
            return 0
        b = batch["index"].shape[0]
        return int((batch["labels"][:b, 1:] != -100).any(-1).sum())

    # ------------------------------------------------------------------ loss
    @torch.no_grad()
    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        """Summed reference log-probs of the 2B rows: stored, the frozen copy's, or the policy without adapters."""
        if "ref_logps" in batch:
            return batch["ref_logps"].t().reshape(-1).float()  # [B, 2] -> chosen rows, then rejected rows
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        if self.ref is not None:
            logits = self.ref(**kw).logits
        else:
            peft = getattr(model, "module", model)
            with peft.disable_adapter():
                logits = model(**kw).logits
        return token_logps(logits, batch["labels"])[0]

    def compute_loss(self, model, batch: dict, ctx: TrainContext, train: bool) -> LossOut:
        cfg = self.cfg
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        if "index" not in batch:  # the loop's filler batch for a rank without dev batches: a forward, no pairs
            zero = out.logits.sum() * 0.0
            return LossOut(zero, 0, {k: zero.detach() for k in metric_names(cfg.loss.type)})
        b = batch["index"].shape[0]
        nll = None
        if cfg.loss.type == "orpo":  # its SFT term is the NLL of the whole chosen sequence
            logps, n, seq_logps, seq_n = token_logps(
                out.logits, batch["labels"], batch["input_ids"], batch["attention_mask"]
            )
            nll = -seq_logps[:b] / seq_n[:b].clamp(min=1)
        else:
            logps, n = token_logps(out.logits, batch["labels"])
        ref = None if cfg.reference_free() else self.reference_logps(model, batch)
        pl = preference_losses(
            cfg.loss.type,
            logps[:b],
            logps[b:],
            None if ref is None else ref[:b],
            None if ref is None else ref[b:],
            n[:b],
            n[b:],
            beta=cfg.loss.beta,
            label_smoothing=cfg.loss.label_smoothing,
            gamma=cfg.loss.gamma,
            sft_weight=cfg.loss.sft_weight,
            chosen_nll=nll,
        )
        valid = n[:b] > 0  # the loop pads dev with all-masked copies of a batch: they count for nothing

        def total(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x, torch.zeros_like(x)).sum()

        return LossOut(total(pl.loss), int(valid.sum()), {k: total(v) for k, v in pl.metrics().items()})

    def dev_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return {**means, "dev_reward_accuracy": means["rewards/accuracies"]}

    # ------------------------------------------------------------------ export
    def export(self, model, out_dir: Path, ctx: TrainContext) -> None:
        """A plain HF dir (LoRA merged) or an adapter dir, with the sft model's tokenizer and generation config."""
        from transformers import AutoTokenizer, GenerationConfig

        from minima.train.lora import export_lora, is_peft

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if is_peft(model):
            export_lora(model, out, merge=self.cfg.lora.merge, base_model=str(Path(self.cfg.model).resolve()))
        else:
            model.save_pretrained(str(out), safe_serialization=True, max_shard_size="2GB")
        src = self.tokenizer_source()
        if src is not None:
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
            if (src / "tokenizer.model").is_file() and not (out / "tokenizer.model").is_file():
                shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
        m = Path(self.cfg.model)
        if (m / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(str(m)).save_pretrained(str(out))


def _has_split(records: str, split: str) -> bool:
    d = Path(records) / split
    return d.is_dir() and any(d.glob("*.tfrecord"))


# ------------------------------------------------------------------------ precomputed reference
def precompute_reference(cfg: DpoConfig, ctx: TrainContext) -> dict[str, np.ndarray]:
    """``{split: float32 [records, 2]}``: each pair's (chosen, rejected) log-probs under the reference.

    Every rank computes its share of parts (``REF_PART`` pairs each, stored as
    ``ref_logps/<split>/part-NNNNNNNN.npy`` when done, so a restarted pass skips them); rank 0 then
    joins them into ``ref_logps/<split>.npy`` (kept in the artifact, 8 bytes per pair). The reference
    model is freed before training starts.
    """
    from minima.models.loader import load_teacher

    root = Path(ctx.work_dir) / REF_DIR
    splits = ["train"] + (["dev"] if _has_split(str(cfg.records), "dev") else [])
    out: dict[str, np.ndarray] = {}
    todo = [s for s in splits if not (root / f"{s}.npy").is_file()]
    dist = _dist()
    if todo:
        ref = load_teacher(cfg.model, ctx.device, cfg.ref_zero3, cfg.micro_batch_size)
        if cfg.disable_dropout:
            _disable_dropout(ref)
        for split in todo:
            _precompute_split(ref, cfg, ctx, split, root / split)
            if dist is not None:
                dist.barrier()
            if ctx.is_rank0:
                _join_parts(root / split, root / f"{split}.npy")
            if dist is not None:
                dist.barrier()
        del ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for split in splits:
        out[split] = np.load(root / f"{split}.npy")
    return out


def _precompute_split(ref, cfg: DpoConfig, ctx: TrainContext, split: str, part_dir: Path) -> None:
    ds = PreferenceDataset(str(cfg.records), split, shuffle_buffer=0)
    part_dir.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, ds.num_records, REF_PART))[ctx.rank :: ctx.world_size]
    pending = [s for s in starts if not (part_dir / f"part-{s:08d}.npy").is_file()]
    mbs = cfg.micro_batch_size
    # (part start, record ids) per forward; a part is saved after its last forward.
    plan = [
        (s, list(range(a, min(a + mbs, s + REF_PART, ds.num_records))))
        for s in pending
        for a in range(s, min(s + REF_PART, ds.num_records), mbs)
    ]
    n = len(plan)
    dist = _dist()
    if dist is not None and cfg.ref_zero3:  # ZeRO-3 forwards are collective: every rank runs as many
        t = torch.tensor([n], device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t.item())
    pad_id = ds.pad_id
    acc: dict[int, list[np.ndarray]] = {}
    ref.eval()
    with torch.no_grad():
        for i in progress(range(n), f"reference log-probs ({split})", total=n, unit="batch"):
            if i >= len(plan):  # filler forward for a rank with fewer parts
                ids = torch.zeros(1, 8, dtype=torch.long, device=ctx.device)
                ref(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                continue
            start, ids = plan[i]
            batch = collate_pairs([ds.read(r) for r in ids], pad_id)
            logits = ref(
                input_ids=batch["input_ids"].to(ctx.device),
                attention_mask=batch["attention_mask"].to(ctx.device),
                use_cache=False,
            ).logits
            lp = token_logps(logits, batch["labels"].to(ctx.device))[0].float().cpu().numpy()
            acc.setdefault(start, []).append(np.stack([lp[: len(ids)], lp[len(ids) :]], axis=1))
            last = i + 1 == len(plan) or plan[i + 1][0] != start
            if last:
                tmp = part_dir / f".part-{start:08d}.tmp.npy"
                np.save(tmp, np.concatenate(acc.pop(start)).astype(np.float32))
                os.replace(tmp, part_dir / f"part-{start:08d}.npy")
    ds.close()


def _join_parts(part_dir: Path, final: Path) -> None:
    parts = sorted(part_dir.glob("part-*.npy"))
    arr = np.concatenate([np.load(p) for p in parts]) if parts else np.zeros((0, 2), np.float32)
    tmp = final.with_name(final.stem + ".tmp.npy")
    np.save(tmp, arr.astype(np.float32))
    os.replace(tmp, final)
    shutil.rmtree(part_dir, ignore_errors=True)  # the joined file is what a resumed run reads


# ----------------------------------------------------------------------------- validation
def validate(cfg: DpoConfig, records: Optional[str] = None) -> None:
    """Everything checkable before any work: model, records (format, tokenizer, chat format), strategy, LoRA."""
    from minima.train.lora import check_qlora, check_targets

    if not cfg.model:
        raise ConfigError("dpo needs a model", where="dpo.model", fix="set model=DIR (the sft output)")
    if not (Path(cfg.model) / "config.json").is_file():
        raise InputError(
            f"no model at {cfg.model} (config.json missing)",
            where="dpo.model",
            fix="point model at an HF model dir, e.g. the sft stage's output",
        )
    records = records or cfg.records
    if not records and not cfg.train_files:
        raise ConfigError(
            "dpo needs preference records or raw preference files",
            where="dpo.records",
            fix="set records=DIR (built by `minima records format=preference`) or train_files=[pairs.jsonl, ...]",
        )
    if cfg.records and cfg.train_files:
        raise ConfigError("give either records or train_files, not both", where="dpo.train_files", fix="drop one")
    if cfg.ref_zero3 and cfg.strategy == "fsdp" and not cfg.reference_free() and not cfg.precompute_ref:
        raise ConfigError(
            "ref_zero3 shards the reference with DeepSpeed, and this run uses strategy=fsdp",
            where="ref_zero3",
            fix="set ref_zero3=false (the reference is replicated), precompute_ref=true, or strategy=deepspeed",
        )
    check_qlora(cfg.lora)
    if cfg.strategy == "fsdp" and cfg.lora.qlora:
        raise ConfigError("QLoRA is not supported with strategy=fsdp", where="dpo.strategy", fix="use deepspeed")
    if records and not cfg.train_files:
        check_records(cfg, records)
    if cfg.lora.enabled:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(cfg.model)))
        check_targets(skeleton, cfg.lora)


def check_records(cfg: DpoConfig, records: str) -> None:
    """The records are preference pairs, tokenized by the model's tokenizer, in the model's chat format."""
    from minima.data.preference import tokenizer_fingerprint
    from minima.data.records import read_records_manifest
    from minima.data.records.build import load_tokenizer

    if not _has_split(records, "train"):
        raise InputError(
            f"{records} has no train/*.tfrecord shards",
            where="dpo.records",
            fix="build them with `minima records format=preference ...`",
        )
    meta = read_records_manifest(records)
    if meta.get("format") not in (None, "preference"):
        raise ConfigError(
            f"dpo needs format=preference records; {records} holds format={meta.get('format')} records",
            where="dpo.records",
            fix="build the records with format=preference",
        )
    if meta.get("chat_format") and meta["chat_format"] != cfg.chat_format:
        raise ConfigError(
            f"the records were built with chat_format={meta['chat_format']!r} but dpo.chat_format={cfg.chat_format!r}",
            where="dpo.chat_format",
            fix=f"set chat_format={meta['chat_format']}, or rebuild the records with chat_format={cfg.chat_format}",
        )
    if meta.get("tokenizer_fingerprint") and any((Path(cfg.model) / f).is_file() for f in TOKENIZER_FILES):
        mine = tokenizer_fingerprint(load_tokenizer(cfg.model))
        if mine != meta["tokenizer_fingerprint"]:
            raise InputError(
                f"the records were tokenized by another tokenizer (fingerprint {meta['tokenizer_fingerprint']}, "
                f"the model's is {mine})",
                where=f"{records}/manifest.json",
                fix="build the preference records with tokenizer=<the model dir>",
            )
    rows = _vocab_rows(cfg.model)
    if isinstance(meta.get("vocab_size"), int) and rows and meta["vocab_size"] > rows:
        raise InputError(
            f"the records' tokenizer has {meta['vocab_size']} tokens but the model has {rows} embedding rows",
            where="dpo.records",
            fix="build the records with the model's tokenizer",
        )


def _vocab_rows(model_dir: str) -> Optional[int]:
    import json

    return json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size")


# ----------------------------------------------------------------------------------- run
def build_records(cfg: DpoConfig, force: bool = False) -> Path:
    """Build ``train_files`` into preference records next to the dpo output (cached), with the model's tokenizer."""
    from minima.stages.records import run as records_run

    out = cfg.resolved_out_dir()
    sources = [Source(name=f"file{i}_{Path(p).stem}", path=p) for i, p in enumerate(cfg.train_files)]
    rcfg = RecordsConfig(
        inputs=sources,
        tokenizer=str(cfg.model),
        format="preference",
        chat_format=cfg.chat_format,
        preference_template=cfg.preference_template,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        dev_fraction=cfg.dev_fraction,
        seed=cfg.seed,
        out_dir=str(out.with_name(out.name + ".records")),
        shard_size=100000,
    )
    art = records_run(rcfg, force=force)
    log.info(f"dpo records: {art.path} ({art.metrics.get('num_records')})")
    return art.path


def run(cfg: DpoConfig, force: bool = False) -> Artifact:
    """Train and publish the dpo artifact (skipped when the cache key matches)."""
    from minima.evaluate.callback import training_callbacks
    from minima.train.launch import plan_launch, train_stage

    validate(cfg)
    records = cfg.records
    cfg_run = cfg
    if cfg.train_files:
        out = cfg.resolved_out_dir()
        if plan_launch(cfg).is_leader:
            records = str(build_records(cfg, force=force))
        else:
            from minima.stages.sft import _wait_for_records

            records = str(out.with_name(out.name + ".records"))
            _wait_for_records(Path(records), cfg.launch.init_timeout_s)
        cfg_run = cfg.model_copy(update={"records": records, "train_files": []})
        check_records(cfg_run, records)
    inputs = {"model": cfg.model, "records": records}
    return train_stage(cfg_run, inputs, RECIPE, force=force, callbacks=training_callbacks(cfg_run))
