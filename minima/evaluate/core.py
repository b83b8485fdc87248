"""``evaluate_model``: run tasks on an in-memory model and return scores (no files written).

Used by the evaluate stage (``run``), the pipeline's report, and the training engine's callback
(:class:`EvalCallback`). The runner knows no task: each task (``tasks/``) loads its docs and turns them
into requests; the runner sends each request type to the model in one batched call (``lm.py``), and the
task scores the outputs and aggregates them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from minima.core.errors import InputError
from minima.core.logs import get_logger, progress
from minima.evaluate.lm import LM
from minima.evaluate.tasks import Instance, Settings, Task, get_task

log = get_logger("minima.evaluate")


def default_data_dir() -> Optional[Path]:
    """``../shared/data/eval`` next to the working directory or to this checkout, when it exists."""
    here = Path(__file__).resolve().parents[2]
    for cand in (Path.cwd().parent / "shared" / "data" / "eval", here.parent / "shared" / "data" / "eval"):
        if cand.is_dir():
            return cand
    return None


def _spec(tasks, name) -> dict:
    if isinstance(tasks, Mapping):
        s = tasks[name]
        if s is None:
            return {}
        return s.model_dump() if hasattr(s, "model_dump") else dict(s)
    return {}


def task_names(tasks) -> list[str]:
    return list(tasks) if isinstance(tasks, Mapping) else list(tasks)


def _bar(desc: str, total: int):
    return progress(None, desc=desc, total=total, unit="req")


def chat_wrap(tokenizer, context: str) -> str:
    """The context as one user turn in the model's chat template, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "chat_template=true but the tokenizer has no chat template",
            fix="use a chat model (after sft) or set chat_template=false",
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
    )


def evaluate_model(
    model,
    tokenizer,
    tasks: Union[list[str], Mapping[str, Any]],
    data_dir: Optional[str | Path] = None,
    shots: Optional[int] = None,
    limit: Optional[int] = None,
    batch_size: int = 16,
    mode: str = "loglikelihood",
    chat_template: bool = False,
    max_new_tokens: int = 256,
    fewshot_seed: int = 1234,
    seed: int = 0,
    distributed: bool = False,
    samples: Optional[list] = None,
    max_length: Optional[int] = None,
) -> dict[str, dict]:
    """Evaluate ``model`` on ``tasks`` and return ``{task: scores}``.

    Args:
        model: a causal LM (``*ForCausalLM``) or an encoder-decoder one (T5); put on its device by the caller.
        tokenizer: its tokenizer.
        tasks: task names, or ``{name: TaskSpec | dict}`` with per-task ``path``/``shots``/``limit``/``mode``/...
        data_dir: benchmark root with one folder per task (default ``../shared/data/eval`` if present).
        shots: few-shot count for every task (default: each task's standard count).
        limit: items per task (per subject for tasks with subjects).
        batch_size: contexts per forward pass.
        mode: default scoring of multiple-choice tasks: ``loglikelihood`` (lm-eval) or, where a task offers it,
            ``letter`` (next-token A/B/C/D, hendrycks).
        chat_template: wrap each prompt in the tokenizer's chat template (one user turn).
        max_new_tokens: generation limit of generate_until tasks.
        fewshot_seed: seed of the random few-shot sampler (lm-eval's 1234 by default).
        seed: sampling seed (tasks that sample several generations per doc).
        distributed: split requests over ``torch.distributed`` ranks (every rank must call this).
        samples: if a list is given, one dict per evaluated item is appended to it.
        max_length: override the model's context length.

    Returns:
        ``{task: {"acc": .., "acc_stderr": .., ..., "info": {...}, "subjects": {...}, "categories": {...}}}``.
    """
    for name in task_names(tasks):
        if get_task(name).kind == "chat":
            raise InputError(
                f"{name} is an LLM-judged chat task: it needs a judge endpoint and runs in the evaluate stage only",
                fix=f"run `minima evaluate model=DIR tasks=[{name}] judge_model=NAME ...`, or remove it from tasks",
            )
    lm = LM(model, tokenizer, batch_size=batch_size, distributed=distributed, max_length=max_length)
    data_root = Path(data_dir) if data_dir else default_data_dir()
    render = (lambda text: chat_wrap(tokenizer, text)) if chat_template else (lambda text: text)
    out: dict[str, dict] = {}
    for name in task_names(tasks):
        task = get_task(name)
        spec = _spec(tasks, name)
        t0, calls0 = time.time(), lm.forward_calls
        settings = Settings(
            shots=spec["shots"]
            if spec.get("shots") is not None
            else (shots if shots is not None else task.default_shots),
            limit=spec.get("limit") or limit,
            mode=spec.get("mode") or mode,
            chat_template=chat_template,
            max_new_tokens=max_new_tokens,
            fewshot_seed=fewshot_seed,
            seed=seed,
            max_length=lm.max_length,
            spec=spec,
            render=render,
        )
        res = run_task(lm, task, settings, data_root, samples)
        dt = time.time() - t0
        n = res["info"].get("n", 0)
        res["info"].update(
            seconds=round(dt, 3),
            items_per_s=round(n / dt, 2) if dt > 0 else None,
            forward_calls=lm.forward_calls - calls0,
        )
        main = next((k for k in res if not isinstance(res[k], dict) and not k.endswith("_stderr")), None)
        log.info(
            f"{name}: {main} {res[main]:.4f} on {n} items in {dt:.1f}s"
            if main and res[main] is not None
            else f"{name}: done"
        )
        out[name] = res
    return out


def run_task(lm: LM, task: Task, settings: Settings, data_root: Optional[Path], samples: Optional[list]) -> dict:
    """One task: load its docs, send its requests to the model, let it score and aggregate them."""
    task.check(settings)
    data = task.load(data_root, settings)
    instances = task.instances(data, settings)
    scored = task.score(instances, _execute(lm, task, instances, settings), settings)
    if samples is not None:
        samples.extend(task.sample(s) for s in scored)
    res = task.aggregate(scored, settings)
    res["info"] = {**task.info(scored, settings), **task.data_info(data)}
    return res


# ------------------------------------------------------------------------------ requests -> model
def _execute(lm: LM, task: Task, instances: list[Instance], settings: Settings) -> list[list]:
    """Each instance's request outputs, in order; all requests of one type go to the model in one call."""
    flat = [(i, r) for i, inst in enumerate(instances) for r in inst.requests]
    by_type: dict[str, list[int]] = {}
    for k, (_, r) in enumerate(flat):
        by_type.setdefault(r.type, []).append(k)
    results: list[Any] = [None] * len(flat)
    for rtype, idx in by_type.items():
        if rtype not in _SENDERS:
            raise InputError(f"{task.name}: unknown request type {rtype!r}", fix=f"one of: {', '.join(_SENDERS)}")
        outs = _SENDERS[rtype](lm, task, [flat[k][1].args for k in idx], settings)
        for k, o in zip(idx, outs):
            results[k] = o
    per: list[list] = [[] for _ in instances]
    for (i, _), o in zip(flat, results):
        per[i].append(o)
    return per


def _loglikelihood(lm: LM, task: Task, args: list[tuple], settings: Settings) -> list:
    bar = _bar(task.name, len(args))
    out = lm.loglikelihood([tuple(a) for a in args], progress=bar.update)
    bar.close()
    return out


def _next_token(lm: LM, task: Task, args: list[tuple], settings: Settings) -> list:
    """Logprobs of the candidates' last tokens after each context (one candidate set per call)."""
    out: list = [None] * len(args)
    groups: dict[tuple, list[int]] = {}
    for k, (_, cands) in enumerate(args):
        groups.setdefault(tuple(cands), []).append(k)
    for cands, idx in groups.items():
        ids = [lm.tok.encode(c, add_special_tokens=False)[-1] for c in cands]
        for k, lp in zip(idx, lm.next_token_logprobs([args[k][0] for k in idx], ids)):
            out[k] = lp
    return out


def _generate_until(lm: LM, task: Task, args: list[tuple], settings: Settings) -> list:
    bar = _bar(task.name, len(args))
    out = lm.generate_until([a[0] for a in args], **task.generation_kwargs(settings), progress=bar.update)
    bar.close()
    return out


def _loglikelihood_rolling(lm: LM, task: Task, args: list[tuple], settings: Settings) -> list:
    """Each text's (summed NLL, token count); the windows of all texts with one window size go in one call."""
    out: list = [None] * len(args)
    groups: dict[tuple, list[tuple[int, list[int]]]] = {}
    for k, (text, window, stride) in enumerate(args):
        toks = lm.tok_encode(text)
        if len(toks) >= 2:
            groups.setdefault((window, stride), []).append((k, toks))
    for (window, stride), docs in groups.items():
        for (k, _), res in zip(docs, lm.rolling_nll_many([t for _, t in docs], window=window, stride=stride)):
            out[k] = res
    return out


_SENDERS: dict[str, Callable[[LM, Task, list[tuple], Settings], list]] = {
    "loglikelihood": _loglikelihood,
    "next_token": _next_token,
    "generate_until": _generate_until,
    "loglikelihood_rolling": _loglikelihood_rolling,
}
