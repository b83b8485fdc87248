"""LLM-judged chat tasks inside the evaluate stage (mt_bench, belle_eval, zbench, vicuna_bench, alpaca_eval).

The stage hands each chat task to :func:`minima.evaluate.judge.run_chat_eval`: the evaluated model answers in
this process, the judge grades over an OpenAI-compatible endpoint (``judge_base_url``/``judge_model``).
Answers and judgments are JSONL under ``<artifact>/chat/<task>/`` (``chat/<task>/<model>/`` when several
models are evaluated). The stage keeps ``<out_dir>.partial`` between attempts for these tasks, so a
failed or interrupted run resumes with the rows already written; the judge address and key are not
part of the cache key, so a rerun against another address still resumes.

Each task's result in results.json: ``score`` (mean 1-10 grade, single mode) or ``win_rate``
(pairwise, ties and inconsistent verdicts count half), with ``*_stderr`` over judgments/pairs,
``unparseable`` (judge replies without a readable grade; left out of the mean), ``per_category`` and
``info``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from minima.core.config import EvaluateConfig
from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger
from minima.evaluate import metrics as M
from minima.evaluate.tasks import ChatTask, get_task

log = get_logger("minima.evaluate")

QUESTION_SUFFIXES = (".jsonl", ".json", ".csv")


def chat_names(tasks) -> list[str]:
    """The chat task names among ``tasks`` (a list or a name -> spec mapping)."""
    return [n for n in tasks if get_task(n).kind == "chat"]


def _spec(cfg: EvaluateConfig, name: str):
    return cfg.tasks.get(name) if isinstance(cfg.tasks, dict) else None


def _pick(task: ChatTask, folder: Path, where: str) -> Path:
    for f in task.files:
        if (folder / f).is_file():
            return folder / f
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in QUESTION_SUFFIXES)
    if len(found) == 1:
        return found[0]
    what = f"{len(found)} candidates ({', '.join(p.name for p in found[:4])})" if found else "no .jsonl/.json/.csv file"
    raise InputError(
        f"{task.name}: cannot tell the question file in {folder}: {what}",
        where=where,
        fix=f"point tasks.{task.name}.path at the question file itself",
    )


def question_file(task: ChatTask, data_dir: Optional[Path], path: Optional[str]) -> Path:
    """The task's question file: its ``path`` (a file, or a folder holding one), else ``data_dir/<folder>``,
    else a file of ../shared/data (belle_eval: ``instruction/belle_eval_set.jsonl``)."""
    where = f"tasks.{task.name}.path"
    if path:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            return _pick(task, p, where)
        raise InputError(
            f"{task.name}: question file {p} does not exist", where=where, fix="point it at the question file"
        )
    if data_dir is not None:
        for folder in task.folders:
            if (data_dir / folder).is_dir():
                return _pick(task, data_dir / folder, str(data_dir / folder))
        for rel in task.shared_files:
            if (data_dir.parent / rel).is_file():
                return data_dir.parent / rel
    raise InputError(
        f"{task.name}: no question file found" + (f" under {data_dir}" if data_dir else ""),
        where=where,
        fix=f"set tasks.{task.name}.path=FILE (the {task.question_format} question set)",
    )


def baseline_file(cfg: EvaluateConfig, name: str) -> Optional[Path]:
    """``baseline_answers`` for task ``name``: the file itself, or ``<folder>/<name>.jsonl``."""
    if not cfg.baseline_answers:
        return None
    p = Path(cfg.baseline_answers).expanduser()
    if p.is_dir():
        f = p / f"{name}.jsonl"
        if not f.is_file():
            raise InputError(
                f"baseline_answers folder {p} has no {name}.jsonl",
                where="baseline_answers",
                fix=f"add {name}.jsonl (a FastChat answer JSONL) or point baseline_answers at one file",
            )
        return f
    if not p.is_file():
        raise InputError(
            f"baseline_answers {p} does not exist", where="baseline_answers", fix="point it at a FastChat answer JSONL"
        )
    return p


def validate_chat(cfg: EvaluateConfig, data_dir: Optional[Path]) -> dict[str, Path]:
    """Check the chat tasks' settings and question files before any model loads; ``{task: question file}``."""
    from minima.evaluate.judge import FORMATS, load_questions

    names = chat_names(cfg.tasks)
    if not names:
        return {}
    if not cfg.judge_model:
        raise ConfigError(
            f"chat tasks ({', '.join(names)}) need a judge",
            where="judge_model",
            fix="set judge_model=NAME and judge_base_url=http://HOST:PORT/v1 "
            "(any OpenAI-compatible endpoint, e.g. `minima serve`)",
        )
    if not (cfg.judge_base_url or os.environ.get("OPENAI_BASE_URL")):
        raise ConfigError(
            "no judge endpoint",
            where="judge_base_url",
            fix="set judge_base_url=http://HOST:PORT/v1 or env OPENAI_BASE_URL",
        )
    files = {}
    for n in names:
        task: ChatTask = get_task(n)  # type: ignore[assignment]
        spec = _spec(cfg, n)
        if spec is not None and spec.format and spec.format not in FORMATS:
            raise ConfigError(
                f"{n}: unknown question format {spec.format!r}",
                where=f"tasks.{n}.format",
                fix=f"one of {', '.join(FORMATS)}",
            )
        files[n] = question_file(task, data_dir, spec.path if spec else None)
        questions = load_questions(
            files[n], _format(task, spec), categories=_categories(spec), limit=spec.limit if spec else None
        )
        if cfg.chat_mode == "pairwise":
            base = baseline_file(cfg, n)
            if base is None and not all(q["baseline"] for q in questions):
                raise ConfigError(
                    f"chat_mode=pairwise: {n} needs a baseline",
                    where="baseline_answers",
                    fix="set baseline_answers=FILE (FastChat answer JSONL) or a folder with <task>.jsonl",
                )
    return files


def _format(task: ChatTask, spec) -> str:
    return spec.format if spec is not None and spec.format else task.question_format


def _categories(spec) -> list[str]:
    return list(spec.subjects or []) if spec is not None else []


def _engine_chat(engine, cfg: EvaluateConfig):
    # The judge's worker threads call this at once; the engine decodes their conversations as one batch.
    def chat(messages: list[dict]) -> str:
        return engine.chat(
            messages, max_tokens=cfg.chat_max_new_tokens, temperature=cfg.chat_temperature, seed=cfg.seed
        )

    return chat


def _stderr_from(rows: list[dict], mode: str) -> Optional[float]:
    from minima.evaluate.judge import pairwise_outcomes

    if mode == "single":
        vals = [float(r["score"]) for r in rows if r.get("score") is not None]
    else:
        value = {"win": 1.0, "tie": 0.5, "inconsistent": 0.5, "loss": 0.0}
        vals = [value[o["outcome"]] for o in pairwise_outcomes(rows) if o["outcome"] in value]
    return M.stderr(vals)  # nan (null in results.json) below 2 values


def run_chat_tasks(
    cfg: EvaluateConfig, models: dict[str, str], files: dict[str, Path], work_dir: Path
) -> dict[str, dict]:
    """Answer and judge every chat task for every model into ``work_dir/chat``; ``{model: {task: result}}``."""
    from minima.core.io import read_journal
    from minima.evaluate.judge import ChatEvalConfig, run_chat_eval
    from minima.infer.engine import Engine

    out: dict[str, dict] = {}
    for name, path in models.items():
        engine = None
        out[name] = {}
        for task_name, qfile in files.items():
            task: ChatTask = get_task(task_name)  # type: ignore[assignment]
            spec = _spec(cfg, task_name)
            rel = Path("chat") / task_name / (name if len(models) > 1 else "")
            task_dir = work_dir / rel
            answers_done = (task_dir / "answers").is_dir() and any((task_dir / "answers").iterdir())
            if engine is None:
                log.info(f"chat tasks: loading {name} ({path}) to answer")
                engine = Engine.from_dir(
                    path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
                )
            base = baseline_file(cfg, task_name) if cfg.chat_mode == "pairwise" else None
            ccfg = ChatEvalConfig(
                questions=str(qfile),
                question_format=_format(task, spec),
                categories=_categories(spec),
                limit=spec.limit if spec is not None else None,
                model_id=name,
                answer_max_tokens=cfg.chat_max_new_tokens,
                answer_temperature=cfg.chat_temperature,
                mode=cfg.chat_mode,
                baseline_answers=str(base) if base else None,
                judge_base_url=cfg.judge_base_url,
                judge_model=cfg.judge_model,
                judge_api_key_env=cfg.judge_api_key_env,
                judge_max_tokens=cfg.judge_max_tokens,
                concurrency=cfg.judge_concurrency,
                out_dir=str(task_dir),
                seed=cfg.seed,
            )
            resuming = " - resuming" if answers_done else ""
            log.info(f"{task_name}: {name} judged by {cfg.judge_model} ({cfg.chat_mode}){resuming}")
            res = run_chat_eval(ccfg, answer_chat=_engine_chat(engine, cfg))
            rows = read_journal(Path(res["judgments_file"]))
            metric, count = ("score", "judged") if cfg.chat_mode == "single" else ("win_rate", "pairs")
            entry: dict[str, Any] = {
                metric: res[metric],
                f"{metric}_stderr": _stderr_from(rows, cfg.chat_mode),
                "unparseable": res["unparseable"],
                count: res[count],
                "per_category": res["per_category"],
            }
            entry["info"] = {
                "kind": "chat",
                "n": res["questions"],
                "mode": f"judge {cfg.chat_mode}",
                "shots": 0,
                "judge": cfg.judge_model,
                "questions_file": str(qfile),
                "format": ccfg.question_format,
                "dir": str(rel),
                "answers_file": str(Path(res["answers_file"]).relative_to(work_dir)),
                "judgments_file": str(Path(res["judgments_file"]).relative_to(work_dir)),
            }
            if cfg.chat_mode == "pairwise":
                entry["info"]["baseline"] = res.get("baseline")
            out[name][task_name] = entry
        if engine is not None:
            engine.close()
        del engine
    return out
