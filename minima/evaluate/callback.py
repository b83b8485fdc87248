"""Benchmarks during training: ``EvalCallback.on_eval`` scores tasks at each dev evaluation.

``training_callbacks(cfg)`` turns a train config's ``eval_tasks`` into the ``callbacks`` argument of
``minima.train.train_stage``; each rank builds the callback with ``callback_factory(cfg)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger
from minima.evaluate.core import default_data_dir, evaluate_model
from minima.evaluate.tasks import get_task, task_root

log = get_logger("minima.evaluate")


def per_task_shots(tasks, shots):
    """``(tasks, shots)`` for :func:`evaluate_model`: a ``{task: n}`` shots dict becomes each task's ``shots``.

    A task's own ``shots`` in ``tasks`` wins; a name in ``shots`` that ``tasks`` lacks is an error.
    """
    if not isinstance(shots, dict):
        return tasks, shots
    specs = {t: {} for t in tasks} if not isinstance(tasks, dict) else {t: dict(s or {}) for t, s in tasks.items()}
    unknown = sorted(set(shots) - set(specs))
    if unknown:
        raise ConfigError(
            f"eval_shots names {', '.join(unknown)}, which is not among the eval tasks ({', '.join(specs)})",
            where="eval_shots",
            fix="add the task to eval_tasks or drop it from eval_shots",
        )
    for t, n in shots.items():
        if specs[t].get("shots") is None:
            specs[t]["shots"] = n
    return specs, None


class EvalCallback:
    """Evaluate a task subset every ``every_n_steps`` during training and return the scores.

    The training engine calls ``on_eval(step, model, ctx)`` after each dev evaluation (``model`` may be a
    training strategy's module; ``ctx`` the loop's TrainContext) and logs the returned
    ``{"eval/<task>/<metric>": value}`` with its dev metrics (JSONL + TensorBoard). Steps that are not
    multiples of ``every_n_steps`` return ``{}``. With ``log_dir`` the scores are
    also written to TensorBoard here, on rank 0.

    Every rank must call ``on_eval``: the requests are split over the ranks and the scores gathered. A
    replicated model (DeepSpeed ZeRO 0-2) scores its share independently; a sharded one (ZeRO-3, FSDP: every
    forward is collective) scores its share with the ranks calling the model in lock step, generating with
    ``synced_gpus`` (see :class:`minima.evaluate.lm.LM`).

    Args:
        tasks: task names or ``{name: spec}`` as in :func:`evaluate_model` (the JAX instruction-tuning
            recipe's ``evaluation_datasets``).
        shots: few-shot count (that recipe's ``evaluation_shots``): one int for every task, or
            ``{task: shots}`` (a task left out gets its default); None = each task's default.
        every_n_steps: run on steps divisible by this (0 = on every call).
        tokenizer: the model's tokenizer, or a directory to load it from (default: ``ctx.tokenizer``, or
            ``ctx`` itself when it is a tokenizer).
        limit: items per task, to keep it quick.
    """

    def __init__(
        self,
        tasks,
        shots: Optional[Union[int, dict[str, int]]] = None,
        every_n_steps: int = 0,
        tokenizer=None,
        data_dir: Optional[str] = None,
        limit: Optional[int] = 100,
        batch_size: int = 8,
        log_dir: Optional[str] = None,
        prefix: str = "eval",
    ):
        self.tasks, self.shots = per_task_shots(tasks, shots)
        self.every, self.data_dir = int(every_n_steps), data_dir
        self.tokenizer, self.limit, self.batch_size, self.log_dir, self.prefix = (
            tokenizer,
            limit,
            batch_size,
            log_dir,
            prefix,
        )
        self._writer = None
        self.history: list[tuple[int, dict]] = []

    def _tok(self, ctx):
        if isinstance(self.tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer))
        tok = self.tokenizer or (ctx if hasattr(ctx, "encode") else getattr(ctx, "tokenizer", None))
        if tok is None:
            raise InputError("EvalCallback has no tokenizer", fix="pass tokenizer=... (an object or a model dir)")
        return tok

    def on_eval(self, step: int, model, ctx=None) -> dict:
        if not self.tasks or (self.every and step % self.every):
            return {}
        tok = self._tok(ctx)
        net = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
        was_training = net.training
        try:
            res = evaluate_model(
                net,
                tok,
                self.tasks,
                data_dir=self.data_dir,
                shots=self.shots,
                limit=self.limit,
                batch_size=self.batch_size,
                distributed=True,
            )
        finally:
            if was_training:
                net.train()
        flat = {
            f"{self.prefix}/{t}/{k}": v
            for t, r in res.items()
            for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_stderr")
        }
        self.history.append((step, flat))
        if getattr(ctx, "rank", int(os.environ.get("RANK", "0"))) == 0:
            writer = self._tb()
            if writer is not None:
                for k, v in flat.items():
                    writer.add_scalar(k, v, step)
                writer.flush()
            log.info(f"step {step} | " + " | ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in flat.items()))
        return flat

    def _tb(self):
        if self._writer is None and self.log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir)
        return self._writer


CALLBACK = "minima.evaluate:callback_factory"


def _eval_tokenizer(cfg) -> Optional[str]:
    """The tokenizer the training data was built with (records/tokenizer), else the starting model's dir."""
    records = getattr(cfg, "records", None)
    if records and (Path(records) / "tokenizer").is_dir():
        return str(Path(records) / "tokenizer")
    return getattr(cfg, "model", None) or getattr(cfg, "student", None)


def callback_factory(cfg) -> EvalCallback:
    """``"minima.evaluate:callback_factory"`` for ``run_training(callbacks=[...])``, configured by the train config.

    ``cfg.eval_tasks`` (empty: the callback does nothing), ``cfg.eval_shots``, ``cfg.eval_limit`` and
    ``cfg.eval_data_dir`` (see TrainConfig). The engine calls it at every dev evaluation (``eval_steps``
    and the last step), so it scores on every call.
    """
    return EvalCallback(
        list(getattr(cfg, "eval_tasks", None) or []),
        shots=getattr(cfg, "eval_shots", None),
        every_n_steps=0,
        tokenizer=_eval_tokenizer(cfg),
        limit=getattr(cfg, "eval_limit", None),
        data_dir=getattr(cfg, "eval_data_dir", None),
    )


def training_callbacks(cfg) -> list[str]:
    """The callbacks a training stage passes to ``train_stage``: ``[CALLBACK]`` when ``cfg.eval_tasks`` is set.

    Checks the tasks before anything launches: known names, no chat (judged) tasks, data found, and a
    dev split in the records (the engine evaluates, and so calls the callback, only when there is one).
    """
    tasks = list(getattr(cfg, "eval_tasks", None) or [])
    if not tasks:
        return []
    data_dir = Path(cfg.eval_data_dir) if getattr(cfg, "eval_data_dir", None) else default_data_dir()
    if getattr(cfg, "eval_data_dir", None) and not data_dir.is_dir():
        raise InputError(
            f"eval_data_dir {data_dir} does not exist",
            where="eval_data_dir",
            fix="point it at a folder with one subfolder per benchmark",
        )
    for name in tasks:
        t = get_task(name)
        if t.kind == "chat":
            raise ConfigError(
                f"eval_tasks: {name} is an LLM-judged chat task and cannot run during training",
                where="eval_tasks",
                fix=f"evaluate it after training: minima evaluate model=OUT tasks=[{name}] judge_model=...",
            )
        if t.kind != "loglikelihood_rolling":
            task_root(t, data_dir, None)
    records = getattr(cfg, "records", None)
    if records and Path(records).is_dir() and not any((Path(records) / "dev").glob("part-*.tfrecord")):
        raise ConfigError(
            f"eval_tasks run at each dev evaluation, and the records at {records} have no dev split",
            where="eval_tasks",
            fix="build the records with dev_fraction > 0, or clear eval_tasks",
        )
    if _eval_tokenizer(cfg) is None:
        raise ConfigError("eval_tasks need a tokenizer and the config names no model", where="model")
    return [CALLBACK]
