"""Prefect task for the adapt stage (thin: config -> minima.stages.adapt -> artifact dict)."""

from tasks._common import make_task

adapt_task = make_task("adapt")
