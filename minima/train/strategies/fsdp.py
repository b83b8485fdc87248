"""``strategy=fsdp``: torch FSDP2, ``fully_shard`` on each transformer block and then on the root.

Blocks are the model's ``_no_split_modules`` classes (under a peft wrapper, the base model's). On
a GPU with ``precision=bf16`` the blocks compute in bf16 (``MixedPrecisionPolicy``) over fp32
master weights and fp32 gradient reduction; on CPU everything is fp32. The optimizer is torch
AdamW (``lr``, ``betas``, ``weight_decay`` of the stage config, eps 1e-8, as the default DeepSpeed
config), the schedule :class:`~minima.train.schedule.WarmupCosine`; ``ds_config`` and
``zero_stage`` do not apply. Checkpoints are torch.distributed.checkpoint (DCP) directories of the
sharded model and optimizer state, with the scheduler's state beside them.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from minima.core.errors import ConfigError, TrainingError
from minima.core.logs import get_logger
from minima.train.model_init import (
    block_classes,
    has_meta_params,
    materialize_from_files,
    materialize_from_rank0,
    source_of,
)
from minima.train.schedule import WarmupCosine, sync_lr
from minima.train.strategies.base import DTYPES, Strategy

log = get_logger("minima.train")

DCP_DIR = "dcp"
SCHEDULER_FILE = "scheduler.pt"


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model's structure with every parameter on the meta device (no memory); buffers are real copies.

    Export loads the gathered full state dict into it, so no second copy of the weights is built.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 parameter's own tensor is an empty partition
        meta = torch.empty(shape, dtype=p.dtype, device="meta")
        memo[id(p)] = torch.nn.Parameter(meta, requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Parameter names that share one tensor (tied embeddings), each group in module order."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _set_param(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, param)


def fill_skeleton(model: torch.nn.Module, state: dict, ties: list[list[str]]) -> torch.nn.Module:
    """Put a full state dict into a :func:`meta_copy` skeleton (no copy), re-sharing tied parameters."""
    model.load_state_dict(state, strict=False, assign=True)
    for group in ties:  # assign=True gives every name its own tensor: share them again
        first = model.get_parameter(group[0])
        for name in group[1:]:
            _set_param(model, name, first)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise TrainingError(
            f"the gathered state dict lacks {len(left)} parameters (first: {left[0]})",
            fix="report this model family; meanwhile train it with zero_stage=2 (no sharded weights)",
        )
    return model


def _broadcast_real_params(model: torch.nn.Module, device: torch.device) -> None:
    """Collective: rank 0's values of the parameters that are not on the meta device (a recipe's additions)."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_meta:
                t = p.data.to(device)
                torch.distributed.broadcast(t, src=0)
                p.data.copy_(t)


class FSDPStrategy(Strategy):
    """FSDP2 data parallelism; gradients are reduce-scattered (averaged) after every micro-batch's backward."""

    name = "fsdp"

    def __init__(self):
        self.model: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.params: list = []
        self.clip = 0.0
        self.rank = 0
        self._precision = "fp32"
        self._skeleton: Optional[torch.nn.Module] = None
        self._ties: list[list[str]] = []

    def precision(self, cfg, ctx) -> str:
        if ctx.device.type != "cuda":
            return "fp32"
        if cfg.precision == "fp16":
            raise ConfigError(
                "strategy=fsdp trains in bf16 or fp32, not fp16",
                where="precision",
                fix="use precision=bf16, or strategy=deepspeed for fp16",
            )
        return cfg.precision

    def setup(self, model, params, cfg, total_steps, ctx):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        names = {id(p): n for n, p in model.named_parameters()}
        missing = [p for p in params if id(p) not in names]
        if missing:
            raise TrainingError(
                f"{len(missing)} trainable parameters are not parameters of the model",
                fix="return the model's own parameters from Recipe.trainable_parameters",
            )
        wanted = {names[id(p)] for p in params}
        self.rank, self.clip = ctx.rank, float(cfg.grad_clip)
        self._precision = self.precision(cfg, ctx)
        self._ties = tied_groups(model)
        self._skeleton = meta_copy(model) if ctx.rank == 0 else None
        # More than one rank. Either every rank built the model on the meta device with each parameter
        # tagged with its checkpoint tensor (minima.train.model_init.load_pretrained): after sharding each
        # rank reads its own rows from the files, and no rank ever holds the whole model. Or only rank 0
        # holds the weights: it keeps them on the host and shards a meta copy, so no device ever holds the
        # whole model, and materialize_from_rank0 then sends each rank its shard.
        full_state, sources = None, None
        if ctx.world_size > 1:
            sources = self._file_sources(model, ctx)
            if sources is not None:
                _broadcast_real_params(model, ctx.device)  # parameters a recipe added after loading: rank 0's
            elif ctx.rank == 0:
                if has_meta_params(model):
                    left = next(n for n, p in model.named_parameters() if p.is_meta)
                    raise TrainingError(
                        f"rank 0 has parameters on the meta device that no checkpoint tensor backs (first: {left})",
                        fix="a recipe that changes the parameters after loading must load with "
                        "load_pretrained(..., rank0_copy=True)",
                    )
                full_state = dict(model.state_dict())
                model = meta_copy(model)
            elif not has_meta_params(model):
                model = meta_copy(model)  # a recipe that built real weights everywhere: rank 0's win

        dtype = DTYPES[self._precision]
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
        kw = {"mesh": init_device_mesh(ctx.device.type, (ctx.world_size,))}
        if mp is not None:
            kw["mp_policy"] = mp
        blocks = block_classes(model)
        units = [m for m in model.modules() if type(m).__name__ in blocks]
        if not units and ctx.rank == 0:
            log.warning("fsdp: the model names no transformer blocks (_no_split_modules); sharding it as one unit")
        for m in units:
            fully_shard(m, **kw)
        fully_shard(model, **kw)
        if sources is not None:
            materialize_from_files(model, sources, ctx.device)
        elif ctx.world_size > 1:
            materialize_from_rank0(model, full_state, ctx.device)
            del full_state
        self.model = model
        # fully_shard swapped every parameter for a sharded one: select the trainable ones again by name.
        self.params = [p for n, p in model.named_parameters() if n in wanted]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, weight_decay=cfg.weight_decay
        )
        self.scheduler = WarmupCosine.from_config(cfg, total_steps).build(self.optimizer)
        model.train()
        return model

    @staticmethod
    def _file_sources(model: torch.nn.Module, ctx) -> Optional[dict[str, tuple[str, str]]]:
        """Collective: ``{name: (file, key)}`` of the meta parameters when every rank can read its shards
        from the checkpoint files (each meta parameter names its tensor, on every rank), else None."""
        sources, ok = {}, True
        for name, p in model.named_parameters():
            if p.is_meta:
                src = source_of(p)
                ok = ok and src is not None
                if src is not None:
                    sources[name] = src
        flag = torch.tensor([int(ok and bool(sources))], device=ctx.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return sources if int(flag) else None

    def backward(self, loss):
        loss.backward()

    def step(self):
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def module(self):
        return self.model

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = Path(path)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_DIR))
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), path / SCHEDULER_FILE)

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(path)
        if not (path / DCP_DIR).is_dir() or not (path / SCHEDULER_FILE).is_file():
            raise TrainingError(
                f"checkpoint {path} has no FSDP state ({DCP_DIR}/, {SCHEDULER_FILE})",
                fix="resume with the strategy that wrote it, or delete the checkpoint",
            )
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # templates: where each shard goes
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
        sync_lr(self.optimizer, self.scheduler)

    def full_state_dict(self) -> dict:
        """Collective: the unsharded model state dict, on CPU, on rank 0 (empty on other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @contextmanager
    def full_model(self):
        state = self.full_state_dict()
        if self.rank != 0:
            yield None
            return
        yield fill_skeleton(self._skeleton, state, self._ties)

    def summary(self) -> dict:
        return {"strategy": self.name, "precision": self._precision}
