"""Prefect task for the vocab stage (thin: config -> minima.vocab -> artifact dict)."""
from ._common import make_task

vocab_task = make_task("vocab")
