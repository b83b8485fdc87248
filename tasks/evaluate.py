"""Prefect task for the evaluate stage (thin: config -> minima.evaluate -> artifact dict)."""

from tasks._common import make_task

evaluate_task = make_task("evaluate")
