"""Prefect task for the vocab stage (thin: config -> minima.data.vocab -> artifact dict)."""

from tasks._common import make_task

vocab_task = make_task("vocab")
