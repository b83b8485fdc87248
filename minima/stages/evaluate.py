"""The evaluate stage (``minima evaluate``) and the training-time callback.

``run(cfg)`` loads each model of ``cfg.model`` / ``cfg.models``, evaluates the tasks with
:func:`evaluate_model`, and publishes an artifact with ``results.json`` (per task, subject and
category, with stderr), ``samples.jsonl`` (one line per item and model) and ``report.md``.
Under ``torchrun`` with several processes the requests are split across ranks; ``launch.nproc_per_node``
(or ``launch.launcher=slurm|ssh``) starts such a job (:func:`minima.train.launch.stage_job`).

LLM-judged chat tasks (``mt_bench``, ``belle_eval``, ``zbench``, ``vicuna_bench``, ``alpaca_eval``) run
after the benchmarks through :mod:`minima.evaluate.chat`: answers and judgments go to
``chat/<task>/`` in the artifact, the score or win rate into results.json and report.md. With chat
tasks the stage is resumable: ``<out_dir>.partial`` and its JSONL survive a failed attempt.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from minima.core.artifacts import (
    Artifact,
    StageRun,
    run_stage,
)
from minima.core.config import EvaluateConfig
from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger
from minima.evaluate.chat import chat_names, run_chat_tasks, validate_chat
from minima.evaluate.core import default_data_dir, evaluate_model, task_names
from minima.evaluate.report import _jsonable, render_report
from minima.evaluate.sandbox import allowing_unsafe_code, require_isolation
from minima.evaluate.tasks import TASKS, get_task, task_root
from minima.models.loader import load_model_and_tokenizer

log = get_logger("minima.evaluate")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def model_dirs(cfg: EvaluateConfig) -> dict[str, str]:
    if cfg.models:
        return dict(cfg.models)
    if cfg.model:
        return {Path(cfg.model).name or "model": cfg.model}
    raise ConfigError("no model to evaluate", where="EvaluateConfig.model", fix="set model=DIR (or models.NAME=DIR)")


def validate_inputs(cfg: EvaluateConfig, here: bool = True) -> tuple[dict[str, str], Optional[Path]]:
    """Check model dirs, tokenizers, task names and data paths before loading anything.

    ``here=False`` (the job runs on other machines) skips the check of this machine's code sandbox.
    """
    models = model_dirs(cfg)
    for name, d in models.items():
        p = Path(d)
        if not (p / "config.json").is_file():
            raise InputError(
                f"model '{name}': {p} is not a Hugging Face model dir (no config.json)",
                where=f"models.{name}" if cfg.models else "model",
                fix="point it at a saved model directory",
            )
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise InputError(
                f"model '{name}': {p} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])} missing)",
                where=str(p),
                fix="save the tokenizer into the model dir: AutoTokenizer.from_pretrained(src).save_pretrained(dir)",
            )
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if cfg.data_dir and not data_dir.is_dir():
        raise InputError(
            f"data_dir {data_dir} does not exist",
            where="data_dir",
            fix="point it at a folder with one subfolder per benchmark",
        )
    names = task_names(cfg.tasks)
    if not names:
        raise ConfigError(
            "no tasks", where="EvaluateConfig.tasks", fix=f"e.g. tasks=[mmlu,arc_easy] (known: {', '.join(TASKS)})"
        )
    for n in names:
        t = get_task(n)
        spec = cfg.tasks[n] if isinstance(cfg.tasks, dict) else None
        if t.kind not in ("loglikelihood_rolling", "chat"):
            task_root(t, data_dir, spec.path if spec else None)
    validate_chat(cfg, data_dir)
    if "humaneval" in names and here:
        require_isolation(cfg.allow_unsafe_code)  # refuse before any model loads where code cannot be isolated
    return models, data_dir


def task_inputs(cfg: EvaluateConfig, models: dict[str, str], data_dir: Optional[Path]) -> dict[str, Optional[str]]:
    inputs: dict[str, Optional[str]] = {f"model:{n}": d for n, d in models.items()}
    chat_files = validate_chat(cfg, data_dir)
    for n in task_names(cfg.tasks):
        t = get_task(n)
        spec = cfg.tasks[n] if isinstance(cfg.tasks, dict) else None
        if n in chat_files:
            inputs[f"task:{n}"] = str(chat_files[n])
        elif spec and spec.path:
            inputs[f"task:{n}"] = spec.path
        elif t.kind != "loglikelihood_rolling":
            inputs[f"task:{n}"] = str(task_root(t, data_dir, None))
    if chat_files and cfg.chat_mode == "pairwise":
        inputs["baseline_answers"] = cfg.baseline_answers
    return inputs


def _init_distributed() -> tuple[int, int]:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _benchmark_tasks(cfg: EvaluateConfig):
    """``cfg.tasks`` without the chat tasks (same shape: a list or a name -> spec dict)."""
    chat = set(chat_names(cfg.tasks))
    if isinstance(cfg.tasks, dict):
        return {k: v for k, v in cfg.tasks.items() if k not in chat}
    return [t for t in cfg.tasks if t not in chat]


def _evaluate_all(cfg: EvaluateConfig, models: dict[str, str], data_dir: Optional[Path], distributed: bool):
    results: dict[str, Any] = {"models": {}, "meta": {}}
    samples: list[dict] = []
    t0 = time.time()
    bench = _benchmark_tasks(cfg)
    for name, path in models.items():
        if not bench:  # only chat tasks: run_chat_tasks loads the model to answer them
            results["models"][name] = {"path": str(path), "tasks": {}}
            continue
        log.info(f"evaluating {name} ({path})")
        attn = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model, tok = load_model_and_tokenizer(
            path, cfg.dtype, cfg.device, trust_remote_code=cfg.trust_remote_code, **attn
        )
        s: list[dict] = []
        tasks = evaluate_model(
            model,
            tok,
            bench,
            data_dir=data_dir,
            shots=cfg.shots,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            mode=cfg.mode,
            chat_template=cfg.chat_template or name in cfg.chat_models,
            max_new_tokens=cfg.max_new_tokens,
            fewshot_seed=cfg.fewshot_seed,
            seed=cfg.seed,
            distributed=distributed,
            samples=s,
        )
        samples += [{"model": name, **x} for x in s]
        results["models"][name] = {
            "path": str(path),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "tasks": tasks,
        }
        del model
    results["meta"] = {
        "data_dir": str(data_dir) if data_dir else None,
        "shots": cfg.shots,
        "limit": cfg.limit,
        "chat_template": cfg.chat_template,
        "chat_models": list(cfg.chat_models),
        "seconds": round(time.time() - t0, 2),
        "created": time.strftime("%Y-%m-%d %H:%M"),
    }
    return results, samples


def _write_outputs(work: Path, results: dict, samples: list[dict]) -> dict:
    results = _jsonable(results)
    (work / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    with open(work / "samples.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(_jsonable(s), ensure_ascii=False) + "\n")
    (work / "report.md").write_text(render_report(results))
    metrics: dict[str, Any] = {}
    for name, m in results["models"].items():
        for task, r in m["tasks"].items():
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_stderr"):
                    metrics[f"{name}/{task}/{k}"] = v
    metrics["seconds"] = results["meta"]["seconds"]
    return metrics


def run(cfg: EvaluateConfig, force: bool = False) -> Artifact:
    """Evaluate ``cfg.model`` (or every model of ``cfg.models``) and publish the artifact."""
    with allowing_unsafe_code(cfg.allow_unsafe_code):
        return _run(cfg, force)


def _run(cfg: EvaluateConfig, force: bool) -> Artifact:
    from minima.train.launch import runs_here, stage_job

    chat = bool(chat_names(cfg.tasks))
    ranks = 1 if chat else None  # chat tasks are answered and judged in one process
    models, data_dir = validate_inputs(cfg, here=runs_here(cfg, ranks))
    inputs = task_inputs(cfg, models, data_dir)
    chat_files = validate_chat(cfg, data_dir)
    # A launch block with several ranks, or Slurm / ssh: the job's ranks score their shares there.
    art = stage_job(cfg, "minima.stages.evaluate:run", force, ranks=ranks, inputs=inputs)
    if art is not None:
        return art
    # Chat tasks are answered and judged in one process (stage_job left them to rank 0 alone).
    _, world = (0, 1) if chat else _init_distributed()
    if world == 1:

        def body(run: StageRun):
            results, samples = _evaluate_all(cfg, models, data_dir, distributed=False)
            if chat_files:
                t0 = time.time()
                for name, tasks in run_chat_tasks(cfg, models, chat_files, run.work_dir).items():
                    results["models"][name]["tasks"].update(tasks)
                results["meta"].update(
                    judge=cfg.judge_model,
                    chat_mode=cfg.chat_mode,
                    seconds=round(results["meta"]["seconds"] + time.time() - t0, 2),
                )
            return _write_outputs(run.work_dir, results, samples)

        # A judge run is slow: keep <out_dir>.partial (the answers/judgments JSONL) for the next attempt.
        return run_stage(cfg, inputs, body, force=force, resumable=bool(chat_files))

    # Several ranks: rank 0 decides as one process would; every rank scores its share; rank 0 writes.
    from minima.train.launch import run_stage_ranks

    def work(_work_dir: Path):
        return _evaluate_all(cfg, models, data_dir, distributed=True)

    def finish(work_dir: Path, scored) -> dict:
        return _write_outputs(work_dir, *scored)

    return run_stage_ranks(cfg, inputs, work, finish, force=force)


# ------------------------------------------------------------------------------ training callback
