"""Stage prune: load the teacher, stream calibration records, prune to the target shape, save the student.

``minima prune teacher=DIR records=DIR num_layers=... hidden_size=...`` (or ``dry_run=true``, which
counts the target's parameters on the meta device and loads no weights). ``init=random`` writes the
target shape with fresh weights instead: the from-scratch baseline a pruned student is compared with.
The pruning itself lives in :mod:`minima.compress.prune`.

``minima prune teacher=DIR records=DIR target_params=3.0e9 search.top_k=3 search.retrain_steps=20``
searches the shape instead (:mod:`minima.compress.search`); the artifact then also holds
``search.json`` (every candidate: shape, params, calibration loss before and after retraining) and
``search.png``. With ``dry_run=true`` it lists the candidates without loading weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from minima.compress.prune import (
    DTYPES,
    TOKENIZER_FILES,
    Shape,
    check_family,
    format_params,
    head_dim,
    log,
    plot_importance,
    prune_model,
    resolve_target,
    student_config,
)
from minima.core.artifacts import Artifact, StageRun, run_stage
from minima.core.config import PruneConfig
from minima.core.errors import ConfigError, DataError, InputError
from minima.data.tokenizers import check_same_tokenizer
from minima.models.counts import count_params
from minima.models.loader import load_model


def calibration_batches(
    records: str | Path,
    num_samples: int,
    max_length: int,
    batch_size: int,
    vocab_size: Optional[int] = None,
    seed: int = 0,
) -> Iterator[dict]:
    """``num_samples`` train records (seeded shuffle), cut to ``max_length`` tokens, batched (streamed).

    Raises:
        DataError: a token id the teacher's embedding does not have (names the batch).
    """
    from minima.data.records import RecordDataset, collate

    ds = RecordDataset(str(records), "train", seed=seed, loop=False)
    buf: list[dict] = []
    seen = 0

    def flush(n: int) -> dict:
        batch = collate(buf, pad_id=ds.pad_id)
        buf.clear()
        if vocab_size is not None and int(batch["input_ids"].max()) >= vocab_size:
            raise DataError(
                f"token id {int(batch['input_ids'].max())} >= the teacher's vocab size {vocab_size}",
                where=f"{records}/train: calibration batch {n}",
                fix="build the records with the teacher's tokenizer",
            )
        return batch

    try:
        for sample in ds:
            buf.append({k: v[:max_length] for k, v in sample.items()})
            seen += 1
            if len(buf) == batch_size:
                yield flush(seen // batch_size - 1)
            if seen >= num_samples:
                break
        if buf:
            yield flush(seen // batch_size)
    finally:
        ds.close()


def cached_batches(records: str | Path, cache_dir: str | Path, num_batches: int, batch_size: int, seed: int = 0):
    """Up to ``num_batches`` train batches with the logit cache's teacher targets (for search retraining)."""
    from minima.compress.logit_cache import CachedRecordDataset, collate_targets, read_cache_meta
    from minima.data.records import collate

    meta = read_cache_meta(cache_dir)
    ds = CachedRecordDataset(str(records), "train", str(cache_dir), seed=seed, loop=False)
    out, buf = [], []

    def flush():
        b = collate(buf, pad_id=ds.pad_id)
        b.update(
            collate_targets(buf, b["input_ids"].shape[1]), kd_mode=meta["mode"], kd_temperature=meta["temperature"]
        )
        out.append(b)
        buf.clear()

    try:
        for sample in ds:
            buf.append(sample)
            if len(buf) == batch_size:
                flush()
                if len(out) >= num_batches:
                    break
        if buf and len(out) < num_batches:
            flush()
    finally:
        ds.close()
    return out


def num_calibration_batches(records: str | Path, num_samples: int, batch_size: int) -> int:
    from minima.data.records import RecordDataset

    ds = RecordDataset(str(records), "train", shuffle_buffer=0)
    n = min(num_samples, ds.num_records)
    ds.close()
    return math.ceil(n / batch_size)


def _teacher_config(cfg: PruneConfig):
    from transformers import AutoConfig, LlamaConfig

    if cfg.teacher is None:
        from minima.core.presets import LLAMA2_7B

        return LlamaConfig(**dict(LLAMA2_7B, vocab_size=cfg.vocab_size or LLAMA2_7B["vocab_size"]))
    p = Path(cfg.teacher)
    if not (p / "config.json").is_file():
        raise InputError(
            f"teacher {p} has no config.json",
            where="PruneConfig.teacher",
            fix="point teacher= at an HF model directory",
        )
    c = AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    check_family(c, where=f"{p}/config.json")
    return c


def _needs_data(cfg: PruneConfig, teacher: Shape, shape: Shape) -> bool:
    if cfg.target_params is not None:  # candidates are scored by their calibration loss
        return True
    drops = (
        cfg.keep_layers is None and shape.num_layers < teacher.num_layers and cfg.layer_importance == "block-influence"
    )
    return cfg.init == "pruned" and (cfg.importance in ("activation", "gradient") or drops)


def validate_inputs(cfg: PruneConfig, for_dry_run: bool = False, check_device: bool = True):
    """Everything checkable before loading weights: teacher config, target shape, records. Returns (config, shape).

    ``check_device=False`` skips the check that this machine has the asked-for device (the job runs elsewhere).
    """
    tc = _teacher_config(cfg)
    shape = resolve_target(tc, cfg)
    if cfg.target_params is not None:
        from minima.compress.search import candidate_shapes

        candidate_shapes(tc, cfg.target_params, cfg.search)  # no shape fits: fail before loading anything
        if cfg.search.logit_cache and not for_dry_run:
            from minima.compress.logit_cache import read_cache_meta

            meta = read_cache_meta(cfg.search.logit_cache)
            if abs(float(meta["temperature"]) - cfg.search.temperature) > 1e-9:
                raise ConfigError(
                    f"the logit cache was built at temperature {meta['temperature']}, search.temperature is "
                    f"{cfg.search.temperature}",
                    where="PruneConfig.search.temperature",
                    fix=f"set search.temperature={meta['temperature']}",
                )
    if not for_dry_run:
        device = _device(cfg)  # a malformed device string is an error wherever the job runs
        if check_device and device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device={cfg.device} but no CUDA device is visible",
                where="PruneConfig.device",
                fix="use device=cpu (or auto), or run where a GPU is available",
            )
        if cfg.teacher is None:
            raise ConfigError(
                "no teacher given", where="PruneConfig.teacher", fix="set teacher=<HF model dir> (or dry_run=true)"
            )
        if _needs_data(cfg, Shape.of(tc), shape):
            if cfg.records is None:
                raise ConfigError(
                    f"importance={cfg.importance} / layer_importance={cfg.layer_importance} needs calibration records",
                    where="PruneConfig.records",
                    fix="set records=<records artifact>, or use magnitude/random with keep_layers",
                )
            from minima.data.records import read_records_manifest

            if num_calibration_batches(cfg.records, cfg.num_samples, cfg.batch_size) == 0:
                raise InputError(
                    f"records {cfg.records} have no train records",
                    where="PruneConfig.records",
                    fix="build records from more text",
                )
            m = read_records_manifest(cfg.records)
            if m:
                if m.get("format") not in (None, "lm"):
                    raise InputError(
                        f"records {cfg.records} are format={m.get('format')}, calibration needs format=lm",
                        where="PruneConfig.records",
                        fix="build pretraining-text records (format=lm)",
                    )
                if m.get("vocab_size") and m["vocab_size"] > tc.vocab_size:
                    raise InputError(
                        f"records vocab {m['vocab_size']} > teacher vocab {tc.vocab_size}",
                        where="PruneConfig.records",
                        fix="build the records with the teacher's tokenizer",
                    )
            check_same_tokenizer(cfg.records, {"teacher": cfg.teacher}, "prune")
    return tc, shape


def _device(cfg: PruneConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(
            f"device={cfg.device!r} is not a torch device",
            where="PruneConfig.device",
            fix="use auto, cpu, cuda or cuda:N",
        ) from None


def dry_run(cfg: PruneConfig) -> dict:
    """Print the target shape and parameter counts (meta device, no weights)."""
    tc, shape = validate_inputs(cfg, for_dry_run=True)
    if cfg.target_params is not None:
        return _dry_run_search(cfg, tc)
    before, after = count_params(tc), count_params(student_config(tc, shape))
    t = Shape.of(tc)
    src = cfg.teacher or "LLaMA-2-7B shape (presets.LLAMA2_7B)"
    print(f"teacher  {t.describe()}, vocab {tc.vocab_size}: {format_params(before)} params  [{src}]")
    print(
        f"target   {shape.describe()}, vocab {tc.vocab_size}, head_dim {head_dim(tc)}: {format_params(after)} params "
        f"({100 * after / before:.1f}%)"
    )
    if cfg.keep_layers is not None:
        print(f"layers   keep {cfg.keep_layers}")
    elif shape.num_layers < t.num_layers:
        print(f"layers   chosen by {cfg.layer_importance}")
    print("dry run: nothing loaded, nothing written")
    return {
        "dry_run": True,
        "params_before": before,
        "params_after": after,
        "teacher_shape": asdict(t),
        "target_shape": asdict(shape),
        "vocab_size": tc.vocab_size,
    }


def _dry_run_search(cfg: PruneConfig, tc) -> dict:
    """List the search's candidates (exact counts on the meta device, no weights)."""
    from minima.compress.search import candidate_shapes, format_table

    cands = candidate_shapes(tc, cfg.target_params, cfg.search)
    before = count_params(tc)
    src = cfg.teacher or "LLaMA-2-7B shape (presets.LLAMA2_7B)"
    print(f"teacher  {Shape.of(tc).describe()}, vocab {tc.vocab_size}: {format_params(before)} params  [{src}]")
    print(
        f"search   {len(cands)} candidates within {cfg.search.tolerance:.1%} of "
        f"{format_params(int(cfg.target_params))}; "
        f"top {cfg.search.top_k} retrained for {cfg.search.retrain_steps} steps"
    )
    print(format_table(cands))
    print("dry run: nothing loaded, nothing written")
    return {
        "dry_run": True,
        "params_before": before,
        "target_params": cfg.target_params,
        "teacher_shape": asdict(Shape.of(tc)),
        "candidates": [c.row() for c in cands],
        "vocab_size": tc.vocab_size,
    }


def _peak_memory(device: torch.device) -> dict:
    """GPU: the allocator's peak since the stage started; CPU: the process's peak RSS (whole process)."""
    if device.type == "cuda":
        return {
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_memory_kind": "cuda_max_allocated",
        }
    import resource

    return {
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # KiB on Linux
        "peak_memory_kind": "process_max_rss",
    }


def random_student(teacher_config, shape: Shape, seed: int, dtype: torch.dtype):
    """A model of the target shape with freshly initialised weights: the student trained from scratch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(student_config(teacher_config, shape), dtype=dtype)


def _body(cfg: PruneConfig, run: StageRun) -> dict:

    if cfg.init == "random":
        return _random_body(cfg, run)

    device = _device(cfg)
    dtype = DTYPES[cfg.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    attn = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    teacher = load_model(cfg.teacher, dtype=dtype, device=device, family="causal", **attn)
    load_s = time.time() - t0
    t = Shape.of(teacher.config)
    shape = resolve_target(teacher.config, cfg)
    batches, nb = None, None
    if _needs_data(cfg, t, shape):
        batches = calibration_batches(
            cfg.records,
            cfg.num_samples,
            cfg.max_length,
            cfg.batch_size,
            vocab_size=teacher.config.vocab_size,
            seed=cfg.seed,
        )
        nb = num_calibration_batches(cfg.records, cfg.num_samples, cfg.batch_size)
    search = None
    if cfg.target_params is not None:
        from minima.compress.search import search_shape

        cached = None
        if cfg.search.logit_cache and cfg.search.retrain_steps > 0:
            cached = cached_batches(
                cfg.records, cfg.search.logit_cache, cfg.search.retrain_steps, cfg.batch_size, cfg.seed
            )

        search = search_shape(
            teacher,
            list(batches),
            cfg.target_params,
            cfg.search,
            importance=cfg.importance,
            rescale_norms=cfg.rescale_norms,
            seed=cfg.seed,
            retrain_batches=cached,
        )
        student, report = search.student, search.report
    else:
        student, report = prune_model(
            teacher,
            batches,
            cfg,
            importance=cfg.importance,
            layer_importance=cfg.layer_importance,
            rescale_norms=cfg.rescale_norms,
            seed=cfg.seed,
            num_batches=nb,
        )
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    del teacher
    out = run.work_dir
    _save_student(cfg, student, out)
    (out / "importance.json").write_text(json.dumps(report.to_json()))
    plot_importance(report, out / "importance.png")
    if search is not None:
        from minima.compress.search import plot_search

        (out / "search.json").write_text(json.dumps(search.to_json(), indent=1))
        plot_search(search.candidates, out / "search.png", cfg.target_params)
    metrics = report.metrics()
    metrics.update(
        device=str(device),
        dtype=cfg.dtype,
        load_s=round(load_s, 2),
        teacher_gb=round(teacher_bytes / 2**30, 3),
        **_peak_memory(device),
    )
    del student
    if device.type == "cuda":  # the next stage of a pipeline process gets the device back
        torch.cuda.empty_cache()
    log.info(
        "prune: %s",
        {k: metrics[k] for k in ("params_before", "params_after", "calibration_tokens_per_s", "peak_memory_gb")},
    )
    return metrics


def _save_student(cfg: PruneConfig, student, out: Path) -> None:
    """The student's weights, the teacher's tokenizer files and a generation config."""
    from transformers import GenerationConfig

    student.save_pretrained(str(out))
    src = Path(cfg.teacher)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    if not (out / "generation_config.json").is_file():
        GenerationConfig.from_model_config(student.config).save_pretrained(str(out))


def _random_body(cfg: PruneConfig, run: StageRun) -> dict:
    """init=random: the target shape from the teacher's config, random weights, the teacher's tokenizer."""
    tc, shape = validate_inputs(cfg)
    student = random_student(tc, shape, cfg.seed, DTYPES[cfg.dtype])
    _save_student(cfg, student, run.work_dir)
    metrics = {
        "init": "random",
        "params_before": count_params(tc),
        "params_after": sum(p.numel() for p in student.parameters()),
        "teacher_shape": asdict(Shape.of(tc)),
        "target_shape": asdict(shape),
        "dtype": cfg.dtype,
    }
    log.info("prune: init=random, %s params of shape %s", format_params(metrics["params_after"]), shape.describe())
    return metrics


def run(cfg: PruneConfig, force: bool = False) -> Artifact:
    """Stage entry point: validate, then prune into an artifact (or print the plan when dry_run).

    With ``launch.launcher=slurm`` or ``ssh`` the pruning runs as a one-process job on one GPU of a node
    (:func:`minima.train.launch.stage_job`); this process only validates and waits.
    """
    from minima.train.launch import runs_here, stage_job

    if cfg.dry_run:
        return Artifact(cfg.resolved_out_dir(), {"stage": "prune", "metrics": dry_run(cfg)})
    validate_inputs(cfg, check_device=runs_here(cfg, ranks=1))
    inputs = {"teacher": cfg.teacher, "records": cfg.records}
    art = stage_job(cfg, "minima.stages.prune:run", force, ranks=1, inputs=inputs)
    if art is not None:
        return art
    return run_stage(cfg, inputs, lambda r: _body(cfg, r), force=force)
