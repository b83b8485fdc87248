"""Prefect task for the optional dpo stage (thin: config -> minima.stages.dpo -> artifact dict)."""

from tasks._common import make_task

dpo_task = make_task("dpo")
