"""Dataset mixing: how many documents each source contributes, and which ones.

- ``size="all"``: every document; an integer: exactly that many; ``"N%"``: ``round(N/100 * n)``
  (halves round up), chosen uniformly without replacement and kept in file order.
- ``weight``: the weighted sources share one group whose mix matches the weights: the group is as
  large as it can be without repeating a document (the scarcest source, relative to its weight,
  is used in full), and each count is within one document of ``weight / sum(weights) * group``.

The choice depends on the seed and the source's *name* (not its position), so adding a source
leaves the others' choice unchanged.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Optional, Union

import numpy as np

from minima.core.errors import ConfigError


@dataclass
class SourcePlan:
    """A source's size spec and the number of documents it has."""

    name: str
    available: int
    size: Union[int, str] = "all"
    weight: Optional[float] = None


def fixed_count(size: Union[int, str], available: int, name: str) -> int:
    """Documents taken from a source with an ``all`` / integer / ``N%`` size."""
    if size == "all":
        return available
    if isinstance(size, int):
        if size > available:
            raise ConfigError(
                f"source {name!r} has {available} documents but size={size} asks for more",
                where=f"inputs[{name}].size",
                fix=f"use size <= {available}, 'all', or a percentage",
            )
        return size
    pct = Decimal(str(size).rstrip("%"))
    return int((pct * available / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def weighted_counts(available: list[int], weights: list[float]) -> list[int]:
    """Counts proportional to ``weights``, as many as possible without exceeding ``available``.

    Largest-remainder rounding: each count is floor or ceil of its exact share; on equal remainders the
    source nearest to using all it has goes first, so the scarcest source is used in full.
    """
    if not available:
        return []
    total_w = float(sum(weights))
    shares = [w / total_w for w in weights]
    group = min(math.floor(a / s + 1e-9) for a, s in zip(available, shares))
    exact = [s * group for s in shares]
    counts = [min(math.floor(x + 1e-9), a) for x, a in zip(exact, available)]
    left = group - sum(counts)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), available[i] - exact[i], i))
    for i in order:
        if left <= 0:
            break
        if counts[i] < available[i]:
            counts[i] += 1
            left -= 1
    return counts


def plan_counts(sources: list[SourcePlan]) -> list[int]:
    """Documents taken from each source (fixed sizes as given, weighted sources mixed)."""
    counts = [0] * len(sources)
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    for i, s in enumerate(sources):
        if s.weight is None:
            counts[i] = fixed_count(s.size, s.available, s.name)
    for i, c in zip(
        weighted, weighted_counts([sources[i].available for i in weighted], [sources[i].weight for i in weighted])
    ):
        counts[i] = c
    return counts


def source_rng(seed: int, name: str, purpose: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), purpose])


def choose(available: int, count: int, seed: int, name: str) -> np.ndarray:
    """``count`` distinct document indices out of ``available``, sorted (file order kept)."""
    if count >= available:
        return np.arange(available, dtype=np.int64)
    return np.sort(source_rng(seed, name).choice(available, size=count, replace=False)).astype(np.int64)


def dev_count(n: int, dev_fraction: float) -> int:
    """Documents held out for dev: ``round(dev_fraction * n)``, at least 1 when the fraction is > 0
    and there are 2+ documents, never all of them."""
    if dev_fraction <= 0 or n < 2:
        return 0
    k = int((Decimal(str(dev_fraction)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return min(max(k, 1), n - 1)
