"""Prefect task for the distill stage (thin: config -> minima.distill -> artifact dict)."""
from ._common import make_task

distill_task = make_task("distill")
