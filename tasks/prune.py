"""Prefect task for the prune stage (thin: config -> minima.compress.prune -> artifact dict)."""

from tasks._common import make_task

prune_task = make_task("prune")
prune_scratch_task = make_task("prune_scratch")  # init=random: the scratch baseline
