"""Flows to rerun one stage: on the pipeline's existing artifacts, or standalone with its own config.

``rerun_stage`` is the Prefect side of ``minima run --only-stage S``; ``stage_run`` is the flow behind
the per-stage deployments in prefect.yaml (e.g. a nightly evaluation of the newest checkpoint).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from prefect import flow, get_run_logger, task

from flows.pipeline import pipeline
from minima.core.registry import STAGE_RUNNERS, stage_config


@flow(name="minima-rerun-stage", log_prints=True)
def rerun_stage(
    stage: str, config: Optional[dict] = None, preset: Optional[str] = None, overrides: Optional[list[str]] = None
) -> dict[str, Any]:
    """Rerun one stage (e.g. distill, or records_chat) of a pipeline run on the artifacts it already has."""
    return pipeline(config=config, preset=preset, overrides=overrides, only_stage=stage)


@task(name="stage", retries=0)
def _stage_task(stage: str, preset: Optional[str], overrides: list[str], force: bool) -> dict:
    cfg = stage_config(stage, preset, None, overrides)
    module, fn = STAGE_RUNNERS[stage].split(":")
    art = getattr(importlib.import_module(module), fn)(cfg, force=force)
    return {"stage": stage, "path": str(art.path), "skipped": art.skipped, "metrics": art.metrics}


@flow(name="minima-stage", log_prints=True)
def stage_run(
    stage: str, preset: Optional[str] = None, overrides: Optional[list[str]] = None, force: bool = False
) -> dict:
    """Run one stage with a standalone config: ``stage_run("evaluate", overrides=["model=runs/x/06_sft"])``."""
    result = _stage_task(stage, preset, list(overrides or []), force)
    get_run_logger().info("%s -> %s%s", stage, result["path"], " (cached)" if result["skipped"] else "")
    return result
