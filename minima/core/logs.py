"""Rank-0 logging, the fixed training step line, and progress bars for data work."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Optional, TypeVar

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


class _Rank0(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_rank0() or record.levelno >= logging.ERROR


def get_logger(name: str = "minima") -> logging.Logger:
    """A logger that prints on rank 0 only (errors print on every rank, prefixed with the rank)."""
    root = logging.getLogger("minima")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname).1s minima: %(message)s"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            fmt = f"%(asctime)s %(levelname).1s [rank {rank()}] minima: %(message)s"
        h.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        h.addFilter(_Rank0())
        root.addHandler(h)
        root.setLevel(os.environ.get("MINIMA_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name if name.startswith("minima") else f"minima.{name}")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_rate(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}" if x < 10 * div else f"{x / div:.0f}{unit}"
    return f"{x:.0f}"


def step_line(
    step: int,
    total: int,
    loss: float,
    lr: float,
    tok_s: float,
    mfu: Optional[float] = None,
    eta_s: Optional[float] = None,
    **extra: float,
) -> str:
    """The one fixed step line: ``step 120/3000 | loss 2.31 | lr 3.0e-05 | tok/s 41k | mfu 38% | eta 1h02m``."""
    parts = [f"step {step}/{total}", f"loss {loss:.4g}"]
    parts += [f"{k} {v:.4g}" for k, v in extra.items()]
    parts += [f"lr {lr:.1e}", f"tok/s {format_rate(tok_s)}"]
    if mfu is not None:
        parts.append(f"mfu {mfu * 100:.0f}%")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def progress(iterable: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it") -> Iterable[T]:
    """A tqdm bar on rank 0 (silent elsewhere and when MINIMA_NO_PROGRESS is set)."""
    from tqdm.auto import tqdm

    disable = not is_rank0() or bool(os.environ.get("MINIMA_NO_PROGRESS"))
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, leave=False)
