"""``strategy=deepspeed``: DeepSpeed ZeRO 0-3, configured by ``ds_config`` (see :mod:`minima.train.ds_config`).

The optimizer comes from the DeepSpeed config. A ``WarmupCosineLR`` scheduler block (the default)
runs as minima's :class:`~minima.train.schedule.WarmupCosine` with the block's resolved params, so
explicit values in it still win; any other scheduler type is DeepSpeed's own.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from minima.core.errors import TrainingError
from minima.train.ds_config import precision_of, resolve_ds_config, save_resolved, zero_stage
from minima.train.schedule import WarmupCosine, sync_lr
from minima.train.strategies.base import Strategy


def _as_float(x) -> Optional[float]:
    if x is None:
        return None
    return float(x.item() if isinstance(x, torch.Tensor) else x)


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine around the model; gradient accumulation is DeepSpeed's (no division by it)."""

    name = "deepspeed"

    def __init__(self):
        self.engine = None
        self.stage = 0
        self.ds_cfg: dict = {}
        self.rank = 0
        self._own_schedule = False

    def precision(self, cfg, ctx) -> str:
        probe = resolve_ds_config(cfg, world_size=ctx.world_size, total_steps=1, on_gpu=ctx.device.type == "cuda")
        return precision_of(probe)

    def setup(self, model, params, cfg, total_steps, ctx):
        import deepspeed

        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        self.ds_cfg = resolve_ds_config(
            cfg,
            world_size=ctx.world_size,
            total_steps=total_steps,
            on_gpu=ctx.device.type == "cuda",
            hidden_size=hidden,
        )
        self.rank = ctx.rank
        if ctx.rank == 0:
            save_resolved(self.ds_cfg, ctx.work_dir / "ds_config.resolved.json")
        self.stage = zero_stage(self.ds_cfg)
        engine_cfg, schedule = copy.deepcopy(self.ds_cfg), None
        block = engine_cfg.get("scheduler")
        if isinstance(block, dict) and block.get("type") == "WarmupCosineLR":
            schedule = WarmupCosine.from_ds(block.get("params", {}), where=str(cfg.ds_config))
            del engine_cfg["scheduler"]  # DeepSpeed builds the client scheduler over its own optimizer instead
        self._own_schedule = schedule is not None
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=params,
            config=engine_cfg,
            lr_scheduler=schedule.build if schedule is not None else None,
        )
        self.engine.train()
        sched = self.engine.lr_scheduler
        if sched is not None and getattr(sched, "last_batch_iteration", 0) == -1:
            # DeepSpeed's own warmup schedulers start at iteration -1 (lr 0); one step here makes optimizer
            # step 1 use iteration 0, as minima's schedule does. A resume overwrites it.
            sched.step()
        return self.engine

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # a no-op inside the accumulation window that advances DeepSpeed's micro-step count

    def step(self):
        self.engine.step()
        return _as_float(self.engine.get_global_grad_norm())

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def module(self):
        return self.engine.module

    def save(self, path: Path) -> None:
        path = Path(path)
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={}, save_latest=False)

    def load(self, path: Path) -> None:
        path = Path(path)
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise TrainingError(
                f"DeepSpeed could not load checkpoint {path}", fix="delete it; resume falls back to the previous one"
            )
        if self._own_schedule:
            sync_lr(self.engine.lr_scheduler.optimizer, self.engine.lr_scheduler)

    @contextmanager
    def full_model(self):
        module = self.engine.module
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield module if self.rank == 0 else None
        else:
            yield module if self.rank == 0 else None

    def summary(self) -> dict:
        return {"strategy": self.name, "zero_stage": self.stage, "precision": precision_of(self.ds_cfg)}
