"""The strategy interface: what the training loop asks of a distributed backend.

A strategy owns the wrapped model, the optimizer, the lr scheduler and their checkpoint files. The
loop owns everything else (data, loss normalisation, evaluation, per-rank RNG/data state, markers).
Gradients are averaged over the data-parallel ranks by every strategy; the loop scales each
micro-batch's loss by ``world_size / step_tokens`` so the step's gradient is exact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar, Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Strategy(ABC):
    """One training run's backend. Every method is called on every rank (the collective ones say so)."""

    name: ClassVar[str]

    @abstractmethod
    def precision(self, cfg, ctx) -> str:
        """``bf16``, ``fp16`` or ``fp32``: the compute precision, known before any model is loaded."""

    @abstractmethod
    def setup(self, model: torch.nn.Module, params: list, cfg, total_steps: int, ctx) -> torch.nn.Module:
        """Wrap ``model``, build the optimizer over ``params`` and the lr schedule of ``total_steps``.

        Returns the module to run forwards through (it accepts the HF model's keyword arguments).
        """

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's (already normalised) loss."""

    @abstractmethod
    def step(self) -> Optional[float]:
        """Clip, apply the optimizer and advance the schedule; zero the gradients. Returns the pre-clip grad norm."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate the next ``step()`` applies."""

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The HF model inside the wrapper (its forward works on every rank, for callbacks and eval)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Collective: write model, optimizer and scheduler state into the directory ``path``."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Collective: restore what ``save`` wrote into ``path``."""

    @abstractmethod
    def full_model(self) -> AbstractContextManager[Optional[torch.nn.Module]]:
        """Collective context: the whole unsharded HF model on rank 0 (None on other ranks), for export."""

    def summary(self) -> dict:
        """Fields for the run's metrics (strategy name, precision, sharding)."""
        return {"strategy": self.name}
