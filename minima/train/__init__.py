"""The training engine shared by adapt, distill and sft: one loop, two strategies.

May import minima.infer, minima.models, minima.data and minima.core.

A stage supplies a :class:`Recipe` (importable as ``"module:Class"``) and calls :func:`train_stage`;
the engine owns launching, the loop, loss normalisation, checkpoints/resume, metrics and export. A
stage's ``run`` is::

    def run(cfg, force=False):
        return train_stage(cfg, {"model": cfg.model, "records": cfg.records}, "minima.stages.adapt:AdaptRecipe",
                           force=force)

Pieces:

- :mod:`~minima.train.recipe`: the Recipe hooks (model, data, ``compute_loss`` returning loss
  *sums*, ``count_tokens`` counted before the forward so each micro-batch can be divided by the
  whole step's label tokens, ``build_callbacks`` with ``on_eval(step, model, ctx)``, ``export`` on
  rank 0 with the whole model gathered).
- :mod:`~minima.train.loop`: the loop (exact token-weighted loss under accumulation and across
  ranks, NaN/inf abort, dev evaluation, patience with the best checkpoint exported, callbacks,
  metrics.jsonl / TensorBoard / loss plot, MFU, heartbeat).
- :mod:`~minima.train.strategies`: ``strategy=deepspeed`` (ZeRO 0-3 from ``ds_config``) or
  ``strategy=fsdp`` (torch FSDP2); the backend behind setup / backward / step / save / load / export.
- :mod:`~minima.train.schedule`: the one lr schedule (warmup, then cosine, linear, constant or wsd).
- :mod:`~minima.train.checkpoint`: checkpoint directories with a ``COMPLETE`` marker and per-rank
  RNG/data state; resume is automatic from the newest complete one and exact.
- :mod:`~minima.train.launch` / :mod:`~minima.train.worker`: torchrun, in-process, Slurm or the
  DeepSpeed ssh launcher start the same worker for both strategies.
- :mod:`~minima.train.synthetic`: ``SyntheticConfig``/``SyntheticRecipe`` (generated, learnable
  token sequences) for engine tests and benchmarks.

Layout of a run (``<out_dir>.partial`` while training, ``out_dir`` once published): the HF model
files at the top, ``checkpoints/step_NNNNNNNN/`` (strategy state + per-rank RNG/reader state +
``COMPLETE`` marker, newest ``keep_last`` kept, plus the best one with ``patience``),
``metrics.jsonl``, ``tensorboard/``, ``loss_curve.png`` and, under DeepSpeed, ``ds_config.resolved.json``.

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
    "train_stage",
]


def train_stage(cfg, inputs, recipe: str, *, force: bool = False, callbacks=(), validate=None):
    """A training stage's ``run``: train ``recipe`` with ``cfg`` and publish the artifact (see ``launch.train_stage``).

    Args:
        cfg: the stage config (a TrainConfig subclass).
        inputs: name -> input path (their hashes go into the cache key).
        recipe: ``"module:Class"`` of the Recipe subclass (imported inside each rank).
        force: rebuild even if a matching artifact exists.
        callbacks: ``"module:factory"`` strings; ``factory(cfg)`` returns an object with ``on_eval``.
        validate: optional no-argument check run on node 0 before anything is created or launched.

    Returns:
        The Artifact; its metrics hold final/best dev loss, steps, tokens, tokens/s, strategy ...
    """
    from minima.train.launch import train_stage as _train_stage

    return _train_stage(cfg, inputs, recipe, force=force, callbacks=list(callbacks), validate=validate)
