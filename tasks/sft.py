"""Prefect task for the sft stage (thin: config -> minima.stages.sft -> artifact dict)."""

from tasks._common import make_task

sft_task = make_task("sft")
