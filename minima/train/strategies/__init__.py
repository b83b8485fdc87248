"""Training strategies: how the one loop's model, optimizer and checkpoints are distributed.

``get_strategy("deepspeed")`` (DeepSpeed ZeRO 0-3 from ``ds_config``) or ``get_strategy("fsdp")``
(torch FSDP2 ``fully_shard`` per transformer block). Both implement :class:`Strategy`; the loop in
:mod:`minima.train.loop` only talks to that interface.
"""

from __future__ import annotations

from minima.core.errors import ConfigError
from minima.train.strategies.base import Strategy

STRATEGIES = ("deepspeed", "fsdp")

__all__ = ["STRATEGIES", "Strategy", "get_strategy"]


def get_strategy(name: str) -> Strategy:
    """A fresh strategy object for ``name`` (imports its backend only now)."""
    if name == "deepspeed":
        from minima.train.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy()
    if name == "fsdp":
        from minima.train.strategies.fsdp import FSDPStrategy

        return FSDPStrategy()
    raise ConfigError(
        f"unknown training strategy {name!r}", where="strategy", fix=f"use one of {', '.join(STRATEGIES)}"
    )
