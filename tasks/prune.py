"""Prefect task for the prune stage (thin: config -> minima.prune -> artifact dict)."""
from ._common import make_task

prune_task = make_task("prune")
