"""Stage distill: train the (pruned) student to match the teacher, MiniMA / Minitron style.

Per label token the loss is ``alpha * CE(hard label) + (1 - alpha) * T^2 * KD(teacher_T, student_T)``
with KD one of forward_kl (default, Minitron), reverse_kl, jsd or soft_ce (MiniMA, with alpha 0.5);
the maths and its checks live in :mod:`minima.train.objectives.kd`. The engine (:mod:`minima.train`) does everything
else: launch, loop, exact gradient accumulation, checkpoints and resume, step line, TensorBoard and
export. The KD and CE terms are logged separately (``kd`` and ``ce`` on the step line). The dev loss
is the student's hard-label CE (so dev perplexity compares with the teacher and with CE-only runs).

Two additions need the live teacher (the logit cache holds neither hidden states nor scores of the
student's own samples, so they are refused with ``cache_logits``):

- **hidden states** (Minitron): ``loss.hidden_weight`` times the per-token distance (``hidden_kind``:
  mse or cosine) between student block outputs and the teacher blocks ``hidden_layers`` maps them to,
  averaged over the mapped layers. Where the widths differ a learned linear projection per mapped
  layer (a submodule of the student while training, so it is optimised, sharded and checkpointed with
  it) maps the student's states to the teacher's width; the export drops it. Logged as ``hidden``.
- **on-policy batches** (GKD): a share ``on_policy_fraction`` of micro-batches are the student's own
  continuations of record prefixes (:mod:`minima.train.objectives.onpolicy`), scored by the teacher;
  only the KD term trains on them (usually ``kd=jsd`` with ``jsd_beta``). The share of label tokens
  trained on-policy is logged as ``on_policy``.

Two ways to get the teacher's distribution:

- **online** (default): the teacher runs inside the same job, no grad, eval mode, bf16 on GPU (fp32
  on CPU), replicated on every rank or sharded with ZeRO-3 inference (``teacher_zero3``). The loss is
  fused and chunked over the vocab so the [batch, seq, vocab] logits are never held twice.
- **cached**: ``minima distill-cache`` (or ``cache_logits=true``) runs the teacher once over the
  records and stores sparse targets next to them; training then needs no teacher in memory.

The logit cache (an artifact, default ``<run_dir>/05_distill_cache``)::

    cache.json                      format, mode, k, temperature, dtype, vocab size, splits
    <split>/<records shard stem>/   one dir per records shard, in the records' file order
        offsets.npy      int64 [R + 1]   record r's positions are rows offsets[r]:offsets[r + 1]
        fingerprints.npy uint64 [R]      blake2b-64 of each record's token ids (alignment check)
        ids.npy          int32 [P, k]    token ids (top-k, or sampled draws)
        values.npy       fp16/fp32 [P, k] top_k: logits minus the row's top-1; sampled: log p_T
        rest.npy         fp32 [P]         top_k: teacher mass outside ids at temperature T
        weights.npy      fp16/fp32 [P, k] sampled: importance weights
        done.json        written last: the shard is complete (an interrupted build resumes per shard)

Row ``offsets[r] + t`` holds the teacher's distribution for the token after position t of record r.
Records are matched to the cache by global record id (the reader's file order), and every lookup
checks the record's fingerprint, so a cache built from other records fails loudly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from minima.compress.logit_cache import (
    CACHE_META,
    CachedRecordDataset,
    _split_files,
    cache_ranks,
    collate_targets,
    read_cache_meta,
    shifted_labels,
    write_cache,
)
from minima.core.artifacts import Artifact, run_stage
from minima.core.config import DistillCacheConfig, DistillConfig, build
from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger
from minima.data.records import collate
from minima.models.loader import load_teacher
from minima.train import LossOut, Recipe, TrainContext
from minima.train.objectives.kd import (
    IGNORE_INDEX,
    HiddenProjection,
    SparseTargets,
    dense_loss,
    hidden_distance,
    sparse_loss,
    uniform_layer_map,
)
from minima.train.objectives.onpolicy import (
    is_on_policy,
    on_policy_batch,
    prefix_length,
    sample_continuations,
    sample_seed,
)

log = get_logger("minima.stages.distill")
RECIPE = "minima.stages.distill:DistillRecipe"
#: The attribute of the student that holds the hidden-state projection while training (dropped at export).
PROJECTION = "kd_hidden_proj"


# ------------------------------------------------------------------------------- validation
def _model_config(path: str, role: str, field: str) -> dict:
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise InputError(
            f"{role} {path} is not a Hugging Face model dir (no config.json)",
            where=field,
            fix=f"point {field} at a dir written by save_pretrained (e.g. the prune or adapt output)",
        )
    return json.loads(cfg_file.read_text())


def student_dir(cfg: DistillConfig) -> str:
    """The student dir (the config keeps ``student`` and the engine's ``model`` equal)."""
    s = cfg.student
    if not s:
        raise ConfigError("distill needs a student model dir", where="student", fix="set student=<prune output dir>")
    return s


def needs_teacher_online(cfg: DistillConfig) -> bool:
    return (cfg.loss.alpha < 1.0 or cfg.loss.hidden_weight > 0) and not cfg.cache_logits


def hidden_layer_map(cfg: DistillConfig, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """The student -> teacher block map of the hidden-state term (checked against both depths)."""
    layer_map = (
        dict(cfg.loss.hidden_layers) if cfg.loss.hidden_layers else uniform_layer_map(student_layers, teacher_layers)
    )
    bad = [(i, j) for i, j in layer_map.items() if not (1 <= i <= student_layers and 1 <= j <= teacher_layers)]
    if bad or not layer_map:
        raise ConfigError(
            f"loss.hidden_layers {layer_map} maps outside the student's 1..{student_layers} "
            f"or the teacher's 1..{teacher_layers} blocks: {bad}",
            where="loss.hidden_layers",
            fix="map 1-based block outputs, e.g. {1: 2, 2: 4}, or leave it unset for the uniform map",
        )
    return layer_map


def check_loss_options(cfg: DistillConfig) -> None:
    """Hidden-state KD and on-policy batches need the live teacher (the logit cache holds neither)."""
    for field, on in (
        ("hidden_weight", cfg.loss.hidden_weight > 0),
        ("on_policy_fraction", cfg.loss.on_policy_fraction > 0),
    ):
        if on and cfg.cache_logits:
            raise ConfigError(
                f"loss.{field} > 0 needs the live teacher, and cache_logits=true trains from cached logits, "
                "which hold no hidden states and cannot score the student's own samples",
                where=f"loss.{field}",
                fix=f"set cache_logits=false (the teacher runs in the job), or loss.{field}=0",
            )
    if cfg.loss.on_policy_fraction > 0 and cfg.loss.alpha >= 1.0:
        raise ConfigError(
            "loss.on_policy_fraction > 0 with alpha=1: on-policy batches train on the KD term only, whose weight is 0",
            where="loss.on_policy_fraction",
            fix="set loss.alpha < 1, or loss.on_policy_fraction=0",
        )


def cache_config(cfg: DistillConfig) -> DistillCacheConfig:
    """The logit cache a distill config trains from (its own artifact, reused across distill runs)."""
    return DistillCacheConfig(
        out_dir=cfg.cache_dir,
        run_dir=cfg.run_dir,
        seed=cfg.seed,
        teacher=cfg.teacher,
        records=cfg.records,
        mode=cfg.cache_mode,
        top_k=cfg.cache_top_k,
        temperature=cfg.loss.temperature,
        proposal_power=cfg.cache_proposal_power,
        dtype=cfg.cache_dtype,
        batch_size=cfg.micro_batch_size,
        precision=cfg.precision,
        device=cfg.cache_device,
        attn_implementation=cfg.attn_implementation,
        launch=cfg.launch,
    )


def validate_inputs(cfg: DistillConfig) -> None:
    """Every check that needs the file system, before any model is loaded or anything is written."""
    check_loss_options(cfg)
    if (
        cfg.cache_mode == "sampled"
        and cfg.cache_logits
        and cfg.loss.kd not in ("forward_kl", "soft_ce")
        and cfg.loss.alpha < 1
    ):
        raise ConfigError(
            f"cache_mode=sampled supports loss.kd forward_kl or soft_ce, not {cfg.loss.kd}",
            where="loss.kd",
            fix="reverse_kl and jsd need the teacher's probability of the student's samples: use top_k or online",
        )
    if cfg.teacher_zero3 and cfg.strategy == "fsdp" and needs_teacher_online(cfg):
        raise ConfigError(
            "teacher_zero3 shards the teacher with DeepSpeed, and this run uses strategy=fsdp",
            where="teacher_zero3",
            fix="set teacher_zero3=false (the teacher is replicated), cache_logits=true, or strategy=deepspeed",
        )
    if not cfg.records:
        raise ConfigError("distill needs records", where="records", fix="set records=<records artifact dir>")
    rec = Path(cfg.records)
    if not (rec / "train").is_dir() or not any((rec / "train").glob("*.tfrecord")):
        raise InputError(
            f"{cfg.records} has no train/*.tfrecord shards",
            where="records",
            fix="point records at the output of `minima records`",
        )
    s_dir = student_dir(cfg)
    from minima.data.records.reader import check_records_format
    from minima.data.tokenizers import check_same_tokenizer

    check_records_format(cfg.records, "lm", "distill")
    check_same_tokenizer(cfg.records, {"teacher": cfg.teacher, "student": s_dir}, "distill")
    student = _model_config(s_dir, "student", "student")
    if cfg.loss.hidden_weight > 0:
        if not cfg.teacher:
            raise ConfigError(
                "loss.hidden_weight > 0 needs a teacher", where="teacher", fix="set teacher=<teacher dir>"
            )
        teacher = _model_config(cfg.teacher, "teacher", "teacher")
        hidden_layer_map(cfg, int(student["num_hidden_layers"]), int(teacher["num_hidden_layers"]))
    s_vocab = int(student.get("vocab_size", 0))
    t_vocab: Optional[int] = None
    t_where = "teacher"
    cache_ready = bool(cfg.cache_dir) and (Path(cfg.cache_dir) / CACHE_META).is_file()
    if cfg.loss.alpha < 1.0 and (not cfg.cache_logits or not cache_ready):
        if not cfg.teacher:
            raise ConfigError(
                "distill with alpha < 1 needs a teacher",
                where="teacher",
                fix="set teacher=<teacher dir>, or alpha=1 for a CE-only run",
            )
        t_vocab = int(_model_config(cfg.teacher, "teacher", "teacher").get("vocab_size", 0))
        t_where = f"{cfg.teacher}/config.json"
    elif cfg.loss.alpha < 1.0 and cache_ready:
        meta = read_cache_meta(cfg.cache_dir)
        t_vocab, t_where = int(meta["vocab_size"]), f"{cfg.cache_dir}/{CACHE_META}"
        check_cache_matches(meta, cfg)
    if t_vocab is not None and t_vocab != s_vocab:
        raise InputError(
            f"teacher vocab_size {t_vocab} != student vocab_size {s_vocab}: "
            "KD compares distributions over the same tokens",
            where=t_where,
            fix="distill a student pruned from this teacher (prune keeps the vocab), "
            "or resize both with `minima vocab`",
        )
    from minima.data.records import read_records_manifest

    r_vocab = read_records_manifest(str(rec)).get("vocab_size")
    if isinstance(r_vocab, int) and r_vocab > s_vocab:
        raise InputError(
            f"records were tokenized with {r_vocab} tokens but the student has {s_vocab}",
            where="records",
            fix="build the records with the student's tokenizer",
        )


# ------------------------------------------------------------------------------- the teacher


# ------------------------------------------------------------------------------- logit cache


def check_cache_matches(meta: dict, cfg: DistillConfig) -> None:
    """The cached targets must be the ones this config asks for (temperature enters the rest mass)."""
    want = {"mode": cfg.cache_mode, "k": cfg.cache_top_k, "temperature": cfg.loss.temperature}
    for key, value in want.items():
        got = meta.get(key)
        if (abs(float(got) - float(value)) > 1e-9) if key == "temperature" else got != value:
            field = {"mode": "cache_mode", "k": "cache_top_k", "temperature": "loss.temperature"}[key]
            raise ConfigError(
                f"the logit cache has {key}={got} but the config asks for {value}",
                where=field,
                fix=f"set {field}={got}, or rebuild the cache (`minima distill-cache` with these settings)",
            )


def build_cache(ccfg: DistillCacheConfig, force: bool = False) -> Artifact:
    """The logit cache artifact (skipped when one with the same teacher, records and settings exists).

    A launch block with several ranks, or ``launch.launcher=slurm|ssh``, builds it as a job
    (:func:`minima.train.launch.stage_job`): each rank takes its share of the shards, and this process
    only validates and waits. Under torchrun every rank builds its share here.
    """
    from minima.train.launch import stage_job

    if not ccfg.teacher or not ccfg.records:
        raise ConfigError(
            "distill-cache needs teacher and records",
            where="teacher" if not ccfg.teacher else "records",
            fix="set teacher=<dir> records=<records artifact>",
        )
    t_vocab = int(_model_config(ccfg.teacher, "teacher", "teacher").get("vocab_size", 0))
    if not _split_files(ccfg.records, "train"):
        raise InputError(
            f"{ccfg.records} has no train/*.tfrecord shards",
            where="records",
            fix="point records at the output of `minima records`",
        )
    from minima.data.records import read_records_manifest

    r_vocab = read_records_manifest(str(ccfg.records)).get("vocab_size")
    if isinstance(r_vocab, int) and r_vocab > t_vocab:
        raise InputError(
            f"records were tokenized with {r_vocab} tokens but the teacher has {t_vocab}",
            where="records",
            fix="build the records with the teacher's tokenizer",
        )
    inputs = {"teacher": ccfg.teacher, "records": ccfg.records}
    art = stage_job(ccfg, "minima.stages.distill:build_cache", force, inputs=inputs)
    if art is not None:
        return art
    rank, world = cache_ranks()
    if world == 1:
        return run_stage(
            ccfg, inputs, lambda run: write_cache(ccfg, Path(run.work_dir), 0, 1), force=force, resumable=True
        )
    # torchrun: rank 0 decides as one process would; every rank writes its shards into rank 0's work dir.
    from minima.train.launch import run_stage_ranks

    return run_stage_ranks(
        ccfg,
        inputs,
        lambda work_dir: write_cache(ccfg, work_dir, rank, world),
        lambda work_dir, metrics: metrics,
        force=force,
        resumable=True,
    )


# ------------------------------------------------------------------------------- the recipe
class DistillRecipe(Recipe):
    """The engine recipe: student = ``student``; loss = alpha CE + (1 - alpha) T^2 KD (see module doc)."""

    def __init__(self, cfg: DistillConfig):
        super().__init__(cfg)
        self.teacher = None
        self.cache_meta: Optional[dict] = None
        self.layer_map: dict[int, int] = {}
        self.rank, self.step, self.micro = 0, 0, 0

    def tokenizer_source(self) -> Optional[Path]:
        rec = Path(self.cfg.records) / "tokenizer" if self.cfg.records else None
        if rec is not None and rec.is_dir():
            return rec
        s = Path(student_dir(self.cfg))
        return (
            s
            if any((s / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
            else None
        )

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.rank = ctx.rank
        if self.cfg.cache_logits and self.cfg.loss.alpha < 1.0:
            if not self.cfg.cache_dir:
                raise ConfigError(
                    "cache_logits=true but no cache_dir reached the training job",
                    where="cache_dir",
                    fix="run through `minima distill` (it builds the cache first) or set cache_dir",
                )
            self.cache_meta = read_cache_meta(self.cfg.cache_dir)
            check_cache_matches(self.cache_meta, self.cfg)
        elif needs_teacher_online(self.cfg):
            self.teacher = load_teacher(self.cfg.teacher, ctx.device, self.cfg.teacher_zero3, self.cfg.micro_batch_size)
            if self.cfg.attn_implementation:
                getattr(self.teacher, "module", self.teacher).set_attn_implementation(self.cfg.attn_implementation)

    def build_model(self, ctx: TrainContext) -> torch.nn.Module:
        from minima.train.model_init import load_pretrained

        model = load_pretrained(student_dir(self.cfg), self.cfg, ctx, dtype=torch.float32)
        if self.cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.cfg.loss.hidden_weight > 0:
            t = _model_config(self.cfg.teacher, "teacher", "teacher")
            s_layers, s_width = model.config.num_hidden_layers, model.config.hidden_size
            self.layer_map = hidden_layer_map(self.cfg, s_layers, int(t["num_hidden_layers"]))
            if int(t["hidden_size"]) != s_width:
                # a submodule of the student: trained, sharded and checkpointed with it, removed by export()
                setattr(model, PROJECTION, HiddenProjection(sorted(self.layer_map), s_width, int(t["hidden_size"])))
        return model

    def export(self, model, out_dir: Path, ctx: TrainContext) -> None:
        """The student alone: the hidden-state projection is a training aid, not part of the model."""
        proj = model._modules.pop(PROJECTION, None)
        try:
            super().export(model, out_dir, ctx)
        finally:
            if proj is not None:
                model._modules[PROJECTION] = proj

    def begin_step(self, step: int) -> None:
        self.step, self.micro = step, 0

    def count_tokens(self, batch: dict) -> int:
        """Label tokens; decides here (before the forward) whether this micro-batch is on-policy."""
        micro, self.micro = self.micro, self.micro + 1
        frac = self.cfg.loss.on_policy_fraction
        if frac > 0 and self.teacher is not None and is_on_policy(self.cfg.seed, self.step, micro, frac):
            new = self.cfg.loss.on_policy_tokens
            batch["on_policy"] = (
                prefix_length(batch["attention_mask"], new),
                sample_seed(self.cfg.seed, self.step, micro, self.rank),
            )
            return int(batch["input_ids"].shape[0]) * new
        return super().count_tokens(batch)

    def extra_flops_per_token(self, seq_len: int) -> float:
        """The online teacher's forward: ``2 N + 4 L d T`` per token (a third of training's 6N + 12LdT)."""
        if self.teacher is None:
            return 0.0
        from minima.train.metrics import non_embedding_params

        t = getattr(self.teacher, "module", self.teacher)
        c = t.config
        return 2.0 * non_embedding_params(t) + 4.0 * c.num_hidden_layers * c.hidden_size * seq_len

    def build_datasets(self, ctx: TrainContext):
        if self.cache_meta is None:
            return super().build_datasets(ctx)
        kw = dict(rank=ctx.rank, world_size=ctx.world_size, seed=ctx.seed)
        train = CachedRecordDataset(self.cfg.records, "train", self.cfg.cache_dir, **kw)
        dev = None
        if _split_files(self.cfg.records, "dev"):
            dev = CachedRecordDataset(self.cfg.records, "dev", self.cfg.cache_dir, **kw)
        return train, dev

    def collate(self, batch: list[dict]) -> dict:
        out = collate(batch, self.pad_id)
        if "kd_ids" in batch[0]:
            out.update(collate_targets(batch, out["input_ids"].shape[1]))
        return out

    def vocab_chunk(self, device: torch.device) -> int:
        """Columns per KD/CE chunk: the config's, or auto (1024 on CPU for cache locality, 8192 on GPU)."""
        return self.cfg.vocab_chunk or (8192 if device.type == "cuda" else 1024)

    def compute_loss(self, model, batch: dict, ctx: TrainContext, train: bool) -> LossOut:
        cfg = self.cfg
        on_policy = batch.pop("on_policy", None) if train else None
        if on_policy is not None:  # the student continues the record's prefix; the loss runs on its samples
            prefix, seed = on_policy
            seq = sample_continuations(
                model,
                batch["input_ids"][:, :prefix],
                cfg.loss.on_policy_tokens,
                cfg.loss.on_policy_temperature,
                seed,
                self.pad_id,
            )
            batch = on_policy_batch(batch, seq, prefix)
        hidden = train and cfg.loss.hidden_weight > 0
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
            output_hidden_states=hidden,
        )
        logits = out.logits
        b, n, v = logits.shape
        labels = shifted_labels(batch["labels"]).reshape(-1)
        flat = logits.reshape(b * n, v)
        num = (labels != IGNORE_INDEX).sum()  # stays on the device: no host sync per micro step
        alpha, kind, T = cfg.loss.alpha, cfg.loss.kd, cfg.loss.temperature
        chunk = self.vocab_chunk(flat.device)
        if not train or (alpha >= 1.0 and not hidden):  # dev loss = hard CE; alpha = 1 is plain LM training
            ce, _ = dense_loss(flat, labels, None, chunk=chunk)
            ce_sum = ce.sum()
            return LossOut(loss_sum=ce_sum, num_tokens=num, metrics={"ce": ce_sum.detach()} if train else {})
        t_out = None
        if self.cache_meta is not None:
            targets = SparseTargets(
                self.cache_meta["mode"],
                batch["kd_ids"].reshape(b * n, -1),
                batch["kd_values"].reshape(b * n, -1),
                batch["kd_rest"].reshape(-1) if "kd_rest" in batch else torch.zeros(b * n, device=flat.device),
                batch["kd_weights"].reshape(b * n, -1) if "kd_weights" in batch else None,
                float(self.cache_meta["temperature"]),
            )
            ce, kd = sparse_loss(flat, labels, targets, kind, T, chunk, beta=cfg.loss.jsd_beta)
        else:
            with torch.no_grad():
                t_out = self.teacher(
                    input_ids=batch["input_ids"],
                    attention_mask=batch.get("attention_mask"),
                    use_cache=False,
                    output_hidden_states=hidden,
                )
            t_logits = t_out.logits
            if t_logits.shape[-1] != v:
                raise InputError(
                    f"teacher logits have {t_logits.shape[-1]} columns, student {v}",
                    where="teacher",
                    fix="teacher and student must share the vocabulary",
                )
            ce, kd = dense_loss(flat, labels, t_logits.reshape(b * n, v), kind, T, chunk, beta=cfg.loss.jsd_beta)
            del t_logits
        ce_sum, kd_sum = ce.sum(), kd.sum()
        # on-policy labels are the student's own samples: no hard-label term on them
        loss = (0.0 if on_policy is not None else alpha) * ce_sum + (1.0 - alpha) * kd_sum
        metrics = {"kd": kd_sum.detach(), "ce": ce_sum.detach()}
        if hidden:
            proj = getattr(getattr(model, "module", model), PROJECTION, None)
            dist = hidden_distance(out.hidden_states, t_out.hidden_states, self.layer_map, cfg.loss.hidden_kind, proj)
            h_sum = (dist * (labels != IGNORE_INDEX).to(dist.dtype)).sum()
            loss = loss + cfg.loss.hidden_weight * h_sum
            metrics["hidden"] = h_sum.detach()
        if cfg.loss.on_policy_fraction > 0:  # logged / label tokens: the share of tokens trained on-policy
            metrics["on_policy"] = (
                num.detach().to(torch.float32) if on_policy is not None else torch.zeros((), device=flat.device)
            )
        return LossOut(loss_sum=loss, num_tokens=num, metrics=metrics)


# ------------------------------------------------------------------------------- entry points
def run(cfg: DistillConfig, force: bool = False) -> Artifact:
    """Distil ``cfg.teacher`` into ``cfg.student`` on ``cfg.records``; an HF student dir artifact."""
    from minima.train.launch import train_stage

    validate_inputs(cfg)
    if cfg.cache_logits and cfg.loss.alpha < 1.0:
        ccfg = cache_config(cfg)
        cache = build_cache(ccfg)  # a job on the launch block's ranks (under torchrun: each rank's share here)
        data = cfg.model_dump()
        data["cache_dir"] = str(cache.path)
        cfg = DistillConfig.model_validate(data)
        check_cache_matches(read_cache_meta(cache.path), cfg)
    inputs = {
        "student": cfg.student,
        "records": cfg.records,
        "teacher": cfg.teacher if needs_teacher_online(cfg) else None,
        "cache": cfg.cache_dir if cfg.cache_logits and cfg.loss.alpha < 1.0 else None,
    }
    from minima.evaluate.callback import (
        training_callbacks,  # eval_tasks: benchmark scores at each dev evaluation
    )

    return train_stage(
        cfg, inputs, RECIPE, force=force, callbacks=training_callbacks(cfg), validate=lambda: validate_inputs(cfg)
    )


def cache_main(argv: list[str]) -> int:
    """``minima distill-cache [--config F] [--preset P] [--force] key=value ...`` (the distill config's keys)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="minima distill-cache",
        description="Run the teacher once over the records and store sparse targets "
        "(cache_mode, cache_top_k, loss.temperature, cache_dtype of the distill config).",
    )
    p.add_argument("--config", help="YAML file with distill config fields")
    p.add_argument("--preset", help="named preset: tiny, minima-3b")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching cache exists")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    base = None
    if args.preset:
        from minima.core.presets import get_preset

        base = get_preset(args.preset).distill.model_dump(mode="json")
    cfg = build(DistillConfig, base=base, file=args.config, overrides=args.overrides)
    art = build_cache(cache_config(cfg), force=args.force)
    print(f"distill-cache: {'cached, skipped' if art.skipped else 'done'} -> {art.path}")
    print(json.dumps({k: v for k, v in art.metrics.items() if isinstance(v, (int, float, str))}))
    return 0
