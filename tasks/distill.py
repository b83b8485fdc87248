"""Prefect task for the distill stage (thin: config -> minima.stages.distill -> artifact dict)."""

from tasks._common import make_task

distill_task = make_task("distill")
distill_scratch_task = make_task("distill_scratch")  # the scratch baseline, same distill config
