"""The training loop shared by every training stage and strategy (runs inside each rank).

The loop draws data, normalises the loss, evaluates, checkpoints and exports; the distributed
backend (DeepSpeed or FSDP2) sits behind a :class:`~minima.train.strategies.Strategy`, so this file
names neither.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every rank. The step's
micro-batches are drawn first so the loop knows the step's total label-token count T (summed over
micro-batches and ranks); each micro-batch then back-propagates ``loss_sum * world_size / T``.
Both strategies average gradients over ranks (the ``world_size`` factor undoes that) and neither
divides by the accumulation steps, so the gradient is exactly d(sum of token losses / T): the same
as one big batch, however it is split.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from minima.core.errors import ConfigError, TrainingError
from minima.core.logs import get_logger
from minima.train import checkpoint as ck
from minima.train.metrics import (
    MetricsLogger,
    device_peak_flops,
    flops_per_token,
    non_embedding_params,
    plot_loss_curve,
)
from minima.train.recipe import Recipe, TrainContext
from minima.train.strategies import get_strategy
from minima.train.strategies.base import DTYPES

log = get_logger("minima.train")


@dataclass
class LoopState:
    """Counters saved in every checkpoint."""

    step: int = 0
    tokens: int = 0  # label tokens trained on, all ranks
    best_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False


class DataStream:
    """Examples from an iterable dataset, restarting it (next epoch) when it runs out.

    Its state is (epoch, dataset.state_dict()) taken between steps, so a resumed run draws exactly
    the examples an uninterrupted one would have drawn next.
    """

    def __init__(self, dataset):
        self.ds = dataset
        self.epoch = 0
        self._it = None

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self.ds)
        try:
            return next(self._it)
        except StopIteration:
            pass
        self.epoch += 1
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(self.epoch)
        self._it = iter(self.ds)
        try:
            return next(self._it)
        except StopIteration:
            raise TrainingError(
                "the train split of this rank is empty", fix="use fewer ranks or more records"
            ) from None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "dataset": self.ds.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(self.epoch)
        self.ds.load_state_dict(state["dataset"])
        self._it = None


# ------------------------------------------------------------------------------ helpers
def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _batch_hash(batches: list[dict]) -> str:
    h = hashlib.sha1()
    for b in batches:
        h.update(b["input_ids"].cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def total_steps_for(cfg, recipe: Recipe, world_size: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` over the train records."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.max_steps != -1:
        raise ConfigError(f"max_steps={cfg.max_steps} must be > 0, or -1 for epochs", where="max_steps")
    n = recipe.num_train_examples()
    if not n:
        raise ConfigError(
            "max_steps=-1 needs the number of train records, which the records manifest does not give",
            where="max_steps",
            fix="set max_steps",
        )
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, math.ceil(cfg.epochs * n / per_step))


def epoch_end_steps(cfg, recipe: Recipe, world_size: int, total: int) -> set[int]:
    """The optimizer steps where a pass over the train records ends (``ceil(k * n / global batch)``, k = 1, 2, ...)."""
    if not getattr(cfg, "eval_per_epoch", False):
        return set()
    n = recipe.num_train_examples()
    if not n:
        raise ConfigError(
            "eval_per_epoch needs the number of train records, which the records manifest does not give",
            where="eval_per_epoch",
            fix="set eval_steps instead",
        )
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size
    ends, k = set(), 1
    while (step := math.ceil(k * n / per_step)) <= total:
        ends.add(step)
        k += 1
    return ends


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model, recipe: Recipe, dev_batches: list[dict], ctx: TrainContext) -> dict:
    """Token-weighted dev loss and perplexity over every rank's dev shard, plus the recipe's dev metrics
    (``compute_loss``'s metrics summed like the loss, see :meth:`Recipe.dev_metrics`)."""
    model.eval()
    # Sharded forwards (ZeRO-3, FSDP) are collective: every rank runs as many as the rank with the most batches,
    # padding with a batch whose labels are all masked (it adds nothing to the sums).
    n = _all_reduce(torch.tensor([len(dev_batches)], device=ctx.device), op=_max_op())[0].item()
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    names: list[str] = []
    for i in range(int(n)):
        if i < len(dev_batches):
            batch = dev_batches[i]
        else:
            batch = (
                dict(dev_batches[0])
                if dev_batches
                else {
                    "input_ids": torch.zeros(1, 8, dtype=torch.long),
                    "attention_mask": torch.ones(1, 8, dtype=torch.long),
                }
            )
            batch["labels"] = torch.full_like(batch["input_ids"], -100)
        out = recipe.compute_loss(model, to_device(batch, ctx.device), ctx, train=False)
        if i == 0 and out.metrics:
            names = sorted(out.metrics)
            sums = torch.cat([sums, torch.zeros(len(names), dtype=torch.float64, device=ctx.device)])
        sums[0] += out.loss_sum.detach().double()
        sums[1] += out.num_tokens  # a device tensor or an int: no host sync per batch
        for j, k in enumerate(names):
            sums[2 + j] += out.metrics[k].detach().double()
    _all_reduce(sums)
    model.train()
    loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
    res = {
        "dev_loss": loss,
        "dev_ppl": math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan"),
        "dev_tokens": int(sums[1].item()),
    }
    if names:
        res.update(recipe.dev_metrics({k: (sums[2 + j] / sums[1]).item() for j, k in enumerate(names)}))
    return res


def _max_op():
    import torch.distributed as dist

    return dist.ReduceOp.MAX


def _dev_batches(recipe: Recipe, dev_ds, mbs: int) -> list[dict]:
    if dev_ds is None:
        return []
    out, cur = [], []
    for ex in dev_ds:
        cur.append(ex)
        if len(cur) == mbs:
            out.append(recipe.collate(cur))
            cur = []
    if cur:
        out.append(recipe.collate(cur))
    return out


# ------------------------------------------------------------------------------ export
def export_model(strategy, recipe: Recipe, out_dir: Path, ctx: TrainContext) -> None:
    """Rank 0 writes the HF dir from the whole model (gathered from its shards: a collective)."""
    with strategy.full_model() as model:
        if model is not None:
            recipe.export(model, out_dir, ctx)
    _barrier()


# ------------------------------------------------------------------------------ the loop
def train(cfg, recipe: Recipe, ctx: TrainContext, callbacks: list[Any] = (), heartbeat=None) -> dict:
    """Train, checkpoint, evaluate and export with ``cfg.strategy``. Returns the run's metrics (same on every rank)."""
    strategy = get_strategy(cfg.strategy)
    torch.manual_seed(cfg.seed + ctx.rank)
    # The precision is known before the recipe loads anything (a teacher loads in ctx.dtype).
    ctx.dtype = DTYPES[strategy.precision(cfg, ctx)]
    recipe.setup(ctx)
    from minima.train.model_init import build_context

    with build_context(cfg, ctx, getattr(cfg, "model", None)):
        model = recipe.build_model(ctx)
    if getattr(cfg, "compile", False):
        from minima.train.model_init import compile_blocks

        compile_blocks(model, os.environ.get("MINIMA_COMPILE_BACKEND") or None)
    params = recipe.trainable_parameters(model)
    if not params:
        raise ConfigError(
            "the recipe left no trainable parameters", fix="check the recipe's trainable_parameters / freezing options"
        )
    train_ds, dev_ds = recipe.build_datasets(ctx)
    if cfg.patience and dev_ds is None:
        raise ConfigError(
            f"patience={cfg.patience} needs a dev split, and the records have none",
            where="patience",
            fix="build records with dev_fraction > 0, or set patience=0",
        )

    total = total_steps_for(cfg, recipe, ctx.world_size)
    epoch_ends = epoch_end_steps(cfg, recipe, ctx.world_size, total)
    fpt_params = non_embedding_params(model)
    wrapped = strategy.setup(model, params, cfg, total, ctx)
    del model, params  # the strategy holds them (possibly re-sharded): use wrapped / strategy.module

    mbs, gas, world = cfg.micro_batch_size, cfg.gradient_accumulation_steps, ctx.world_size
    stream = DataStream(train_ds)
    ckpt = ck.Checkpointer(ctx.work_dir / "checkpoints", ctx.rank, world, cfg.keep_last, _barrier)
    state = LoopState()
    latest = ckpt.resume_point()
    resumed_eval: dict = {}
    timing = {"save_s": 0.0, "saves": 0, "load_s": None}  # checkpoint I/O, reported with the run's metrics
    initial_eval: dict = {}  # dev metrics before the first step (Recipe.eval_at_start)
    if latest is not None:
        t_load = time.time()
        saved = ckpt.load(strategy, latest)
        timing["load_s"] = time.time() - t_load
        state = LoopState(**saved["counters"])
        stream.load_state_dict(saved["data"])
        ck.set_rng_state(saved["rng"])
        resumed_eval = dict(saved.get("last_eval") or {})
        initial_eval = dict(saved.get("initial_eval") or {})
        if state.best_step >= 0:
            ckpt.protected.add(state.best_step)
        log.info(f"resumed from {latest} (step {state.step}/{total})")

    seq_len = 0
    metrics = MetricsLogger(
        ctx.work_dir,
        ctx.rank == 0,
        total,
        resume_step=state.step,
        world_size=world,
        peak_flops=device_peak_flops() if ctx.device.type == "cuda" else None,
        log_steps=cfg.log_steps,
    )
    dev_batches: Optional[list[dict]] = None
    checked_counts = False
    last_eval: dict = resumed_eval
    step_delay = float(os.environ.get("MINIMA_STEP_DELAY_S", "0") or 0)
    t_train = time.time()
    steps_this_run, tokens_this_run = 0, 0

    def save(meta: dict) -> Path:
        rs = ck.rank_state(state.step, stream.state_dict(), asdict(state))
        rs["last_eval"] = dict(last_eval)  # so a run resumed at the very end still reports its dev metrics
        rs["initial_eval"] = dict(initial_eval)
        t_save = time.time()
        path = ckpt.save(strategy, state.step, rs, meta)
        timing["save_s"] += time.time() - t_save
        timing["saves"] += 1
        return path

    if dev_ds is not None and recipe.eval_at_start and state.step == 0:
        dev_batches = _dev_batches(recipe, dev_ds, mbs)
        initial_eval = evaluate(wrapped, recipe, dev_batches, ctx)
        metrics.eval_step(0, initial_eval)

    while state.step < total and not state.stopped_early:
        t0 = time.time()
        recipe.begin_step(state.step)
        micro = [recipe.collate([stream.next() for _ in range(mbs)]) for _ in range(gas)]
        counts = [int(recipe.count_tokens(b)) for b in micro]
        local_compute_tokens = sum(int(b["input_ids"].numel()) for b in micro)
        if not seq_len:
            seq_len = int(micro[0]["input_ids"].shape[-1])
            hf = strategy.module
            metrics.fpt = flops_per_token(hf.config, fpt_params, seq_len) if hasattr(hf, "config") else 0.0
            metrics.fpt += recipe.extra_flops_per_token(seq_len)  # e.g. the teacher's forward in distillation
        head = _all_reduce(torch.tensor([sum(counts), local_compute_tokens], dtype=torch.float64, device=ctx.device))
        step_tokens, compute_tokens = int(head[0].item()), int(head[1].item())
        denom = max(step_tokens, 1)
        sums: Optional[torch.Tensor] = None
        names: list[str] = []
        lr = strategy.lr
        for i, batch in enumerate(micro):
            out = recipe.compute_loss(wrapped, to_device(batch, ctx.device), ctx, train=True)
            if not checked_counts and int(out.num_tokens) != counts[i]:
                raise TrainingError(
                    f"compute_loss counted {int(out.num_tokens)} label tokens but count_tokens said {counts[i]}",
                    where=type(recipe).__name__,
                    fix="override Recipe.count_tokens to count the tokens your loss sums over",
                )
            if sums is None:
                names = sorted(out.metrics)
                sums = torch.zeros(1 + len(names), dtype=torch.float64, device=ctx.device)
            strategy.backward(out.loss_sum * (world / denom))
            sums[0] += out.loss_sum.detach().double()
            for j, k in enumerate(names):
                sums[1 + j] += out.metrics[k].detach().double()
        checked_counts = True
        _all_reduce(sums)
        loss = (sums[0] / denom).item()
        if not math.isfinite(loss):
            last = ck.latest_complete(ckpt.root)
            raise TrainingError(
                f"loss is {loss} at step {state.step + 1}/{total}",
                fix=f"last good checkpoint: {last or 'none yet'}; lower lr (now {cfg.lr:g}) or check this step's data; "
                "a rerun resumes from that checkpoint",
            )
        grad_norm = strategy.step()
        state.step += 1
        state.tokens += step_tokens
        steps_this_run += 1
        tokens_this_run += compute_tokens
        if heartbeat is not None:
            heartbeat.beat(state.step)
        extra = {k: (sums[1 + j] / denom).item() for j, k in enumerate(names)}
        hash_ = _batch_hash(micro) if ctx.rank == 0 else None
        metrics.train_step(state.step, loss, lr, grad_norm, compute_tokens, time.time() - t0, extra, hash_)
        if step_delay:
            time.sleep(step_delay)  # tests: widen the window for killing a run mid-way

        final = state.step == total
        did_save = False
        at_eval = (cfg.eval_steps and state.step % cfg.eval_steps == 0) or state.step in epoch_ends
        if dev_ds is not None and (at_eval or final):
            if dev_batches is None:
                dev_batches = _dev_batches(recipe, dev_ds, mbs)
            last_eval = evaluate(wrapped, recipe, dev_batches, ctx)
            for cb in callbacks:
                got = cb.on_eval(state.step, strategy.module, ctx)
                if isinstance(got, dict):
                    last_eval.update(got)
            metrics.eval_step(state.step, last_eval)
            if last_eval["dev_loss"] < state.best_loss:
                state.best_loss, state.best_step, state.bad_evals = last_eval["dev_loss"], state.step, 0
                if cfg.patience:
                    ckpt.protected = {state.step}
                    save({"dev_loss": last_eval["dev_loss"], "best": True})
                    did_save = True
            else:
                state.bad_evals += 1
                if cfg.patience and state.bad_evals >= cfg.patience:
                    state.stopped_early = True
                    log.info(
                        f"early stop at step {state.step}: no dev improvement in {cfg.patience} evaluations "
                        f"(best {state.best_loss:.4g} at step {state.best_step})"
                    )
        if not did_save and ((cfg.save_steps and state.step % cfg.save_steps == 0) or final or state.stopped_early):
            save({"dev_loss": last_eval.get("dev_loss")})

    wall = time.time() - t_train
    if cfg.patience and state.best_step >= 0 and state.best_step != state.step:
        log.info(f"exporting the best checkpoint (step {state.best_step}, dev loss {state.best_loss:.4g})")
        # The whole state, not the weights alone: sharded strategies keep the master weights with the optimizer.
        ckpt.load(strategy, ckpt.root / ck.tag_of(state.best_step))
    export_model(strategy, recipe, ctx.work_dir, ctx)
    metrics.close()
    if ctx.rank == 0:
        plot_loss_curve(metrics.path, metrics.png)

    result = {
        "steps": state.step,
        "total_steps": total,
        "train_tokens": state.tokens,
        "stopped_early": state.stopped_early,
        **strategy.summary(),
        "world_size": world,
        "global_batch": mbs * gas * world,
    }
    if timing["saves"]:
        result["checkpoint_save_s"] = round(timing["save_s"] / timing["saves"], 3)
    if timing["load_s"] is not None:
        result["resume_load_s"] = round(timing["load_s"], 3)
    if ctx.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3)
    if steps_this_run:
        result["tokens_per_s"] = round(tokens_this_run / wall, 2)
    if last_eval:
        result.update({k: v for k, v in last_eval.items() if isinstance(v, (int, float))})
    result.update({f"{k}_initial": v for k, v in initial_eval.items() if isinstance(v, (int, float))})
    if state.best_step >= 0:
        result.update(best_dev_loss=state.best_loss, best_step=state.best_step)
    wrapped = strategy = None  # free the model and optimizer before returning (in-process runs go on)
    gc.collect()
    return result
