"""Prefect task for the sft stage (thin: config -> minima.sft -> artifact dict)."""
from ._common import make_task

sft_task = make_task("sft")
