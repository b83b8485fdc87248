"""The DeepSpeed training engine shared by adapt, distill and sft.

A stage supplies a :class:`Recipe` (importable as ``"module:Class"``); the engine owns launching,
the loop, loss normalisation, checkpoints/resume, metrics and export. A stage's ``run`` is::

    def run(cfg, force=False):
        return run_stage(cfg, inputs, body=lambda r: run_training(cfg, "minima.stages.adapt:AdaptRecipe", r),
                         force=force, resumable=True)

Contract (see ``recipe.py``), with these additions to the agreed API:

- ``Recipe.count_tokens(batch)``: the label tokens of a micro-batch, counted *before* the forward
  (default: ``labels[:, 1:] != -100``). The engine needs the whole optimizer step's token count up
  front to divide each micro-batch's ``loss_sum`` by it (exact under gradient accumulation and across
  ranks); it checks that ``LossOut.num_tokens`` agrees. A recipe whose loss counts other tokens
  overrides both together.
- ``Recipe.build_callbacks(ctx)`` returns the callbacks (objects with ``on_eval(step, model, ctx)``,
  optionally returning a dict of metrics to log); ``run_training(..., callbacks=["mod:factory"])``
  adds more: each ``factory(cfg)`` is called inside every rank.
- ``Recipe.num_train_examples()`` sizes epochs when ``max_steps = -1`` (default: the records manifest).
- ``Recipe.export`` runs on rank 0 only, with ZeRO-3 parameters gathered.
- ``TrainContext.is_rank0``.
- ``train_stage(cfg, inputs, recipe, force=, callbacks=, validate=)`` (in ``launch.py``): the whole
  ``run`` of a training stage. Node 0 calls ``run_stage`` as above; on other nodes of a multi-node job
  (and non-zero ranks under an external torchrun) it only runs the ranks, so nothing races on the
  artifact. Prefer it to calling ``run_stage`` directly.
- ``minima.train.synthetic``: ``SyntheticConfig``/``SyntheticRecipe`` (generated, learnable token
  sequences) for engine tests and benchmarks.

Layout of a run (``<out_dir>.partial`` while training, ``out_dir`` once published): the HF model
files at the top, ``checkpoints/step_NNNNNNNN/`` (DeepSpeed state + per-rank RNG/reader state +
``COMPLETE`` marker, newest ``keep_last`` kept, plus the best one with ``patience``),
``metrics.jsonl``, ``tensorboard/``, ``loss_curve.png``, ``ds_config.resolved.json``.

Environment knobs: ``MINIMA_NUM_THREADS`` (torch threads per rank), ``MINIMA_DS_LOG_LEVEL``
(DeepSpeed's logger, default WARNING), ``MINIMA_STEP_DELAY_S`` (tests: sleep after each step).

In-process mode: ``launch.launcher == "local"``, ``nproc_per_node == nnodes == 1`` and the env var
``MINIMA_INPROCESS=1`` runs the worker in the calling process (tests use it to save the subprocess
start-up cost).
"""

from __future__ import annotations

from minima.train.recipe import (
    IGNORE_INDEX,
    LossOut,
    Recipe,
    TrainContext,
    causal_lm_loss_sum,
    shifted_label_count,
)

__all__ = [
    "IGNORE_INDEX",
    "LossOut",
    "Recipe",
    "TrainContext",
    "causal_lm_loss_sum",
    "shifted_label_count",
    "run_training",
    "train_stage",
]


def train_stage(cfg, inputs, recipe: str, *, force: bool = False, callbacks=(), validate=None):
    """A training stage's ``run`` (see ``launch.train_stage``)."""
    from minima.train.launch import train_stage as _train_stage

    return _train_stage(cfg, inputs, recipe, force=force, callbacks=list(callbacks), validate=validate)


def run_training(cfg, recipe: str, run, callbacks: list[str] | None = None) -> dict:
    """Train ``recipe`` with ``cfg`` into ``run.work_dir`` and export the HF model there.

    Args:
        cfg: the stage config (a TrainConfig subclass).
        recipe: ``"module:Class"`` of the Recipe subclass (imported inside each rank).
        run: the StageRun from ``run_stage`` (work_dir = ``<out_dir>.partial``, kept for resume).
        callbacks: optional ``"module:factory"`` strings; ``factory(cfg)`` returns an ``on_eval`` object.

    Returns:
        Metrics for the manifest (final/best dev loss, steps, tokens, tokens/s, ...).
    """
    from minima.train.launch import launch_training

    return launch_training(cfg, recipe, run, callbacks=callbacks or [])
