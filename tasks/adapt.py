"""Prefect task for the adapt stage (thin: config -> minima.adapt -> artifact dict)."""
from ._common import make_task

adapt_task = make_task("adapt")
