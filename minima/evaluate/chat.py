"""LLM-judged chat tasks inside the evaluate stage (mt_bench, belle_eval, zbench, vicuna_bench, alpaca_eval).

The stage hands each chat task to :func:`minima.evaluate.judge.run_chat_eval`: the evaluated model answers in
this process, the judge grades over an OpenAI-compatible endpoint (``judge_base_url``/``judge_model``).
Answers and judgments are JSONL under ``<artifact>/chat/<task>/`` (``chat/<task>/<model>/`` when several
models are evaluated). The stage keeps ``<out_dir>.partial`` between attempts for these tasks, so a
failed or interrupted run resumes with the rows already written; the judge address and key are not
part of the cache key, so a rerun against another address still resumes.

Each task's result in results.json: ``score`` (mean 1-10 grade, single mode) or ``win_rate``
(pairwise, ties and inconsistent verdicts count half) and ``lc_win_rate`` (AlpacaEval 2's
length-controlled win rate), with ``*_stderr`` over judgments/pairs, ``unparseable`` (judge replies
without a readable grade; left out of the mean), ``per_category`` and ``info``.

Generate now, judge later: with ``answers_only=true`` the stage writes the answers and makes no judge
call (``info.mode`` is ``answers only``); ``minima evaluate judge answers=DIR judge_model=...`` then
judges the answers of that artifact (:func:`judge_answers`) into its own ``results.json`` and
``report.md``, with the same entries the one-shot run writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from minima.core.config import Closed, EvaluateConfig, command_config
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
    if cfg.answers_only:  # answers are written now and judged later: no judge settings needed
        return {n: question_file(get_task(n), data_dir, _path(_spec(cfg, n))) for n in names}
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
        files[n] = question_file(task, data_dir, _path(spec))
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


def _path(spec) -> Optional[str]:
    return spec.path if spec is not None else None


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


def _entry(res: dict, rows: list[dict], mode: str, judge: Optional[str], info: dict) -> dict:
    """A judged chat task's results.json entry from :func:`run_chat_eval`'s result and judgment rows."""
    metric, count = ("score", "judged") if mode == "single" else ("win_rate", "pairs")
    entry: dict[str, Any] = {
        metric: res[metric],
        f"{metric}_stderr": _stderr_from(rows, mode),
        "unparseable": res["unparseable"],
        count: res[count],
        "per_category": res["per_category"],
    }
    if mode == "pairwise":
        entry["lc_win_rate"] = res.get("lc_win_rate")
    entry["info"] = {**info, "kind": "chat", "n": res["questions"], "mode": f"judge {mode}", "judge": judge}
    if mode == "pairwise":
        entry["info"]["baseline"] = res.get("baseline")
    return entry


def _chat_eval_config(cfg, task_name: str, model: str, info: dict, out_dir: Path, **kw):
    """The judge run of one chat task and model; ``cfg`` (an EvaluateConfig or a JudgeAnswersConfig) names
    the judge, the mode and the baseline, ``info`` the question set, ``kw`` the answering side."""
    from minima.evaluate.judge import ChatEvalConfig

    base = baseline_file(cfg, task_name) if cfg.chat_mode == "pairwise" else None
    return ChatEvalConfig(
        questions=str(info["questions_file"]),
        question_format=info["format"],
        categories=info.get("categories") or [],
        limit=info.get("limit"),
        model_id=model,
        mode=cfg.chat_mode,
        baseline_answers=str(base) if base else None,
        judge_base_url=cfg.judge_base_url,
        judge_model=cfg.judge_model,
        judge_api_key_env=cfg.judge_api_key_env,
        judge_max_tokens=cfg.judge_max_tokens,
        concurrency=cfg.judge_concurrency,
        out_dir=str(out_dir),
        **kw,
    )


def run_chat_tasks(
    cfg: EvaluateConfig, models: dict[str, str], files: dict[str, Path], work_dir: Path
) -> dict[str, dict]:
    """Answer and judge every chat task for every model into ``work_dir/chat``; ``{model: {task: result}}``.

    With ``cfg.answers_only`` the answers are written and nothing is judged.
    """
    from minima.core.io import read_journal
    from minima.evaluate.judge import _safe, generate_answers, load_questions, run_chat_eval
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
            info = {
                "questions_file": str(qfile),
                "format": _format(task, spec),
                "categories": _categories(spec),
                "limit": spec.limit if spec is not None else None,
                "dir": str(rel),
                "answers_file": str(rel / "answers" / f"{_safe(name)}.jsonl"),
            }
            if cfg.answers_only:
                questions = load_questions(qfile, info["format"], categories=info["categories"], limit=info["limit"])
                log.info(f"{task_name}: {name} answers only (no judge)")
                generate_answers(
                    questions,
                    _engine_chat(engine, cfg),
                    work_dir / info["answers_file"],
                    _safe(name),
                    cfg.judge_concurrency,
                )
                out[name][task_name] = {
                    "answers": len(questions),
                    "info": {**info, "kind": "chat", "n": len(questions), "mode": "answers only", "shots": 0},
                }
                continue
            ccfg = _chat_eval_config(
                cfg,
                task_name,
                name,
                info,
                task_dir,
                answer_max_tokens=cfg.chat_max_new_tokens,
                answer_temperature=cfg.chat_temperature,
                seed=cfg.seed,
            )
            resuming = " - resuming" if answers_done else ""
            log.info(f"{task_name}: {name} judged by {cfg.judge_model} ({cfg.chat_mode}){resuming}")
            res = run_chat_eval(ccfg, answer_chat=_engine_chat(engine, cfg))
            rows = read_journal(Path(res["judgments_file"]))
            info.update(
                shots=0,
                answers_file=str(Path(res["answers_file"]).relative_to(work_dir)),
                judgments_file=str(Path(res["judgments_file"]).relative_to(work_dir)),
            )
            out[name][task_name] = _entry(res, rows, cfg.chat_mode, cfg.judge_model, info)
        if engine is not None:
            engine.close()
        del engine
    return out


# ------------------------------------------------------------------------------ judge later
class JudgeAnswersConfig(Closed):
    """``minima evaluate judge answers=DIR judge_model=NAME [judge_base_url=URL] [key=value ...]``: judge the
    answers an ``answers_only=true`` evaluate run wrote."""

    answers: str = Field(
        ..., description="The artifact of an answers_only=true evaluate run (its results.json lists the answer files)."
    )
    out_dir: Optional[str] = Field(
        None, description="Where judgments, results.json and report.md go (default: <answers>.judged)."
    )
    judge_base_url: Optional[str] = Field(
        None, description="The judge's OpenAI-compatible endpoint (default: env OPENAI_BASE_URL)."
    )
    judge_model: Optional[str] = Field(None, description="The judge model id at the endpoint.")
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="Env var holding the judge endpoint's key.")
    judge_max_tokens: int = Field(1024, ge=16, description="Judge reply token limit.")
    judge_concurrency: int = Field(4, ge=1, description="Judge requests in flight at once.")
    chat_mode: Literal["single", "pairwise"] = Field("single", description="single: 1-10 grades; pairwise: win rate.")
    baseline_answers: Optional[str] = Field(
        None, description="pairwise: the baseline's answer JSONL, or a folder with <task>.jsonl per chat task."
    )


def judge_answers(cfg: JudgeAnswersConfig, judge_chat=None) -> dict:
    """Judge every answers-only chat entry of ``cfg.answers``; writes and returns the results dict.

    ``judge_chat`` replaces the endpoint (tests, custom backends).
    """
    import json
    import time

    from minima.core.io import read_journal, write_json_atomic
    from minima.evaluate.judge import run_chat_eval
    from minima.evaluate.report import render_report

    src = Path(cfg.answers).expanduser()
    results_file = src / "results.json"
    if not results_file.is_file():
        raise InputError(
            f"no results.json in {src}",
            where="answers",
            fix="point answers= at the artifact of `minima evaluate ... answers_only=true`",
        )
    if not cfg.judge_model and judge_chat is None:
        raise ConfigError(
            "judging needs a judge", where="judge_model", fix="set judge_model=NAME and judge_base_url=URL"
        )
    before = json.loads(results_file.read_text(encoding="utf-8"))
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else src.with_name(src.name + ".judged")
    t0 = time.time()
    results: dict[str, Any] = {
        "models": {},
        "meta": {"answers": str(src), "out_dir": str(out_dir), "judge": cfg.judge_model, "chat_mode": cfg.chat_mode},
    }
    found = 0
    for name, m in before["models"].items():
        tasks = {}
        for task_name, r in m.get("tasks", {}).items():
            info = r.get("info", {})
            if info.get("mode") != "answers only":
                continue
            found += 1
            ccfg = _chat_eval_config(
                cfg, task_name, name, info, out_dir / info["dir"], answers=str(src / info["answers_file"])
            )
            log.info(f"{task_name}: judging the answers of {name} with {cfg.judge_model} ({cfg.chat_mode})")
            res = run_chat_eval(ccfg, judge_chat=judge_chat)
            rows = read_journal(Path(res["judgments_file"]))
            new_info = {k: v for k, v in info.items() if k not in ("kind", "n", "mode")}
            new_info.update(shots=0, judgments_file=str(Path(res["judgments_file"]).relative_to(out_dir)))
            tasks[task_name] = _entry(res, rows, cfg.chat_mode, cfg.judge_model, new_info)
        if tasks:
            results["models"][name] = {"path": m.get("path", ""), "tasks": tasks}
    if not found:
        raise InputError(
            f"{src} holds no answers-only chat results",
            where="answers",
            fix="run `minima evaluate ... tasks=[mt_bench] answers_only=true` first",
        )
    results["meta"]["seconds"] = round(time.time() - t0, 2)
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "report.md").write_text(render_report(results), encoding="utf-8")
    return results


def judge_main(argv: Optional[list[str]] = None) -> int:
    """``minima evaluate judge answers=DIR judge_model=NAME [judge_base_url=URL] [chat_mode=pairwise ...]``."""
    cfg = command_config(JudgeAnswersConfig, argv, JudgeAnswersConfig.__doc__ or "")
    if cfg is None:
        return 0
    res = judge_answers(cfg)
    for name, m in res["models"].items():
        for task, r in m["tasks"].items():
            main = "score" if cfg.chat_mode == "single" else "win_rate"
            print(
                f"{name} {task}: {main} {r[main]}" + (f", lc_win_rate {r['lc_win_rate']}" if "lc_win_rate" in r else "")
            )
    print(f"evaluate judge: done -> {res['meta']['out_dir']}")
    return 0
