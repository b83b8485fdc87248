"""``strategy=deepspeed``: DeepSpeed ZeRO 0-3, configured by ``ds_config`` (see :mod:`minima.train.ds_config`).

The optimizer comes from the DeepSpeed config. A ``WarmupCosineLR`` scheduler block (the default)
runs as minima's :class:`~minima.train.schedule.WarmupCosine` client scheduler with the block's resolved
params (explicit values in it still win) and the config's ``lr_schedule`` kind, so ``linear``,
``constant`` and ``wsd`` give FSDP's numbers too; any other scheduler type is DeepSpeed's own.
"""

from __future__ import annotations

import copy
import dataclasses
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
        self._skeleton: Optional[torch.nn.Module] = None
        self._ties: list[list[str]] = []

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
            save_resolved(_as_run(self.ds_cfg, cfg), ctx.work_dir / "ds_config.resolved.json")
        self.stage = zero_stage(self.ds_cfg)
        if self.stage == 3 and ctx.rank == 0:
            from minima.train.strategies.fsdp import meta_copy, tied_groups

            # The export fills this structure (no memory: meta parameters) module by module.
            self._skeleton, self._ties = meta_copy(model), tied_groups(model)
        engine_cfg, schedule = copy.deepcopy(self.ds_cfg), None
        block = engine_cfg.get("scheduler")
        if isinstance(block, dict) and block.get("type") == "WarmupCosineLR":
            schedule = WarmupCosine.from_ds(block.get("params", {}), where=str(cfg.ds_config))
            schedule = dataclasses.replace(
                schedule,
                kind=getattr(cfg, "lr_schedule", "cosine"),
                decay_proportion=getattr(cfg, "decay_proportion", 0.1),
            )
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
        if self.stage != 3:
            yield module if self.rank == 0 else None
            return
        from minima.train.strategies.fsdp import fill_skeleton

        state = self.gather_16bit()
        yield fill_skeleton(self._skeleton, state, self._ties) if state is not None else None

    def gather_16bit(self) -> Optional[dict]:
        """Collective (ZeRO-3): the model's weights in their training dtype (16-bit on GPU), on rank 0's host.

        One module's parameters are gathered at a time, so no device ever holds the whole model (a 7B
        model gathered at once takes 13 GiB on every GPU next to its optimizer partition). None off rank 0.
        """
        import deepspeed

        state: dict = {}
        for prefix, mod in self.engine.module.named_modules():
            params = dict(mod.named_parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                if self.rank == 0:
                    for name, p in params.items():
                        state[f"{prefix}.{name}" if prefix else name] = p.data.detach().to("cpu", copy=True)
        return state if self.rank == 0 else None

    def summary(self) -> dict:
        return {"strategy": self.name, "zero_stage": self.stage, "precision": precision_of(self.ds_cfg)}


def _as_run(ds_cfg: dict, cfg) -> dict:
    """The resolved config as it runs: a ``WarmupCosineLR`` block is minima's schedule of ``lr_schedule``
    (cosine, linear, constant or wsd) with the block's warmup, length and floor, which the saved copy says."""
    block = ds_cfg.get("scheduler")
    if not (isinstance(block, dict) and block.get("type") == "WarmupCosineLR"):
        return ds_cfg
    out = copy.deepcopy(ds_cfg)
    kind = getattr(cfg, "lr_schedule", "cosine")
    out["scheduler"]["runs_as"] = {"lr_schedule": kind, "by": "minima.train.schedule"}
    if kind == "wsd":
        out["scheduler"]["runs_as"]["decay_proportion"] = getattr(cfg, "decay_proportion", 0.1)
    return out
