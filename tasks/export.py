"""Prefect task for the export stage (thin: config -> minima.stages.export -> artifact dict)."""

from tasks._common import make_task

export_task = make_task("export")
