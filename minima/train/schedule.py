"""The learning-rate schedule of every training stage: warmup, then cosine, linear, constant or WSD.

One implementation for both strategies: a torch ``LambdaLR`` whose multiplier at iteration ``i`` is

- warmup (``i < W``, ``W = max(2, warmup_steps)``): ``warmup_min_ratio + r * (1 - warmup_min_ratio)``
  with ``r = i / W`` (linear) or ``log(i + 1) / log(W)`` (log);
- then, with ``p = min(1, (i - W + 1) / max(1, total_steps - W))`` and ``m = min_ratio``:

  - ``cosine``: ``max(0, m + (1 - m) * (1 + cos(pi * p)) / 2)``;
  - ``linear``: ``m + (1 - m) * (1 - p)``;
  - ``constant``: ``1``;
  - ``wsd`` (warmup-stable-decay): ``1`` until the last ``D = max(1, round(decay_proportion * total_steps))``
    iterations, which decay linearly to ``m``: ``m + (1 - m) * (1 - q)`` with
    ``q = min(1, (i - (total_steps - D) + 1) / D)``.

Cosine gives the numbers of DeepSpeed's ``WarmupCosineLR`` with the same parameters (a test compares
them), so the ``"scheduler"`` block of a DeepSpeed config means the same under both strategies; the
other kinds run as the same client scheduler under DeepSpeed and FSDP.
Optimizer step ``k`` (1-based) runs at iteration ``k - 1``: with a warmup, step 1 runs at
``warmup_min_ratio`` (0 by default, so the first step only fills Adam's moments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from minima.core.errors import ConfigError

KINDS = ("cosine", "linear", "constant", "wsd")


@dataclass(frozen=True)
class WarmupCosine:
    """Warmup then the decay of ``kind`` (cosine by default), as multipliers of the optimizer's peak lr."""

    total_steps: int
    warmup_steps: int
    warmup_min_ratio: float = 0.0
    min_ratio: float = 0.0
    warmup_type: Literal["linear", "log"] = "linear"
    kind: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_proportion: float = 0.1  # wsd: the share of all steps spent decaying

    @classmethod
    def from_config(cls, cfg, total_steps: int) -> WarmupCosine:
        """The schedule a TrainConfig asks for (``lr_schedule``, ``warmup_proportion``, ``min_lr_ratio``)."""
        return cls(
            total_steps=total_steps,
            warmup_steps=max(1, round(cfg.warmup_proportion * total_steps)),
            # A warmup always lasts >= 2 iterations; starting them at the peak is "no warmup".
            warmup_min_ratio=0.0 if cfg.warmup_proportion > 0 else 1.0,
            min_ratio=cfg.min_lr_ratio,
            kind=getattr(cfg, "lr_schedule", "cosine"),
            decay_proportion=getattr(cfg, "decay_proportion", 0.1),
        )

    @classmethod
    def from_ds(cls, params: dict, where: str = "ds_config") -> WarmupCosine:
        """The schedule of a resolved DeepSpeed ``WarmupCosineLR`` params block (DeepSpeed's defaults apply)."""
        try:
            return cls(
                total_steps=int(params["total_num_steps"]),
                warmup_steps=int(params.get("warmup_num_steps", 1000)),
                warmup_min_ratio=float(params.get("warmup_min_ratio", 0.0)),
                min_ratio=float(params.get("cos_min_ratio", 0.0001)),
                warmup_type="linear" if params.get("warmup_type", "log") == "linear" else "log",
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"WarmupCosineLR params are incomplete or not numbers: {e}",
                where=f"{where}: scheduler.params",
                fix='set total_num_steps (or "auto") and numeric warmup/cosine fields',
            ) from None

    def ds_params(self) -> dict:
        """The DeepSpeed ``WarmupCosineLR`` params of this schedule (fills a config's ``"auto"`` fields)."""
        return {
            "total_num_steps": self.total_steps,
            "warmup_num_steps": self.warmup_steps,
            "warmup_min_ratio": self.warmup_min_ratio,
            "cos_min_ratio": self.min_ratio,
        }

    def ratio(self, iteration: int) -> float:
        """The lr multiplier at ``iteration`` (0 = the first optimizer step)."""
        warm = max(2, self.warmup_steps)
        if iteration < 0:
            return 0.0
        if iteration < warm:
            if self.warmup_type == "linear":
                r = iteration / warm
            else:
                r = (1.0 / math.log(warm)) * math.log(iteration + 1)
            return self.warmup_min_ratio + r * (1.0 - self.warmup_min_ratio)
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            decay = max(1, round(self.decay_proportion * self.total_steps))
            start = self.total_steps - decay
            if iteration < start:
                return 1.0
            q = min(1.0, (iteration - start + 1) / decay)
            return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - q)
        progress = min(1.0, (iteration - warm + 1) / max(1, self.total_steps - warm))
        if self.kind == "linear":
            return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - progress)
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.min_ratio + (1.0 - self.min_ratio) * cosine)

    def build(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR over ``optimizer``: its lr is ``peak * ratio(0)`` now, and ``step()`` advances one iteration."""
        # A plain function (not a bound method or callable object): LambdaLR leaves it out of its state_dict.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: self.ratio(i))


def sync_lr(optimizer, scheduler) -> None:
    """Put the scheduler's current lrs into the optimizer (after loading either from a checkpoint)."""
    last = getattr(scheduler, "get_last_lr", None)
    if last is None:
        return
    for group, lr in zip(optimizer.param_groups, last()):
        group["lr"] = lr
