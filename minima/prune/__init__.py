"""Stable import path for structured pruning: ``from minima.prune import prune_model``.

The implementation lives in :mod:`minima.compress.prune`; the stage in :mod:`minima.stages.prune`.
"""

from minima.compress.prune import PruneReport, Shape, prune_model, resolve_target

__all__ = ["PruneReport", "Shape", "prune_model", "resolve_target"]
