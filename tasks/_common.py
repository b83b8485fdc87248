"""The one shape every stage task has: build the step config, call minima, return the artifact.

Caching works on two levels that agree with each other:
- Prefect: the cache key is the step's config hash plus the upstream artifacts' cache keys, and is
  offered only while the step's artifact on disk is complete and was built from that config; the
  result (a small dict) is persisted, so a rerun of the flow returns it without running the task.
- minima: the stage itself skips when its manifest's cache key matches (a CLI rerun, or a Prefect
  cache miss after the result store was wiped).
Retries happen only for transient failures; a MinimaError (bad config, bad input) never retries.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

from prefect import task
from prefect.context import TaskRunContext

from minima.artifacts import Artifact, config_hash, is_complete, read_manifest, sha256_text, canonical_json
from minima.cli import STAGE_RUNNERS
from minima.config import PipelineConfig
from minima.errors import MinimaError
from minima.pipeline import STEP, step_config

TRANSIENT = (ConnectionError, TimeoutError)


def _upstream_paths(upstream: dict[str, Any]) -> dict[str, str]:
    return {k: (v["path"] if isinstance(v, dict) else str(v)) for k, v in upstream.items()}


def step_cache_key(context: Optional[TaskRunContext], params: dict[str, Any]) -> Optional[str]:
    """Cache key for a step, or None (no caching) when its artifact is missing or stale."""
    try:
        pipeline = PipelineConfig.model_validate(params["pipeline"])
        ups = _upstream_paths(params.get("upstream") or {})
        cfg = step_config(pipeline, params["key"], ups)
    except Exception:  # invalid config: let the task run and raise its clear error
        return None
    out = cfg.resolved_out_dir()
    if not is_complete(out):
        return None
    manifest = read_manifest(out)
    if manifest.get("config_hash") != config_hash(cfg):
        return None
    up_keys = {k: read_manifest(p)["cache_key"] if is_complete(p) else None for k, p in ups.items()}
    return f"minima-{params['key']}-" + sha256_text(canonical_json({"config": config_hash(cfg), "up": up_keys, "artifact": manifest["cache_key"]}))


def _retry_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(exc, MinimaError):
        return bool(getattr(exc, "transient", False))
    return isinstance(exc, TRANSIENT)


def run_step(pipeline: dict, key: str, upstream: dict[str, Any], force: bool = False) -> dict:
    """Run one pipeline step in this process (the training stages launch their own subprocesses)."""
    cfg = step_config(PipelineConfig.model_validate(pipeline), key, _upstream_paths(upstream))
    module, fn = STAGE_RUNNERS[STEP[key].stage].split(":")
    artifact: Artifact = getattr(importlib.import_module(module), fn)(cfg, force=force)
    return {
        "key": key,
        "stage": STEP[key].stage,
        "path": str(artifact.path),
        "cache_key": artifact.cache_key,
        "skipped": artifact.skipped,
        "wall_time_s": artifact.manifest.get("wall_time_s"),
        "metrics": artifact.metrics,
    }


def make_task(key: str):
    """The Prefect task for pipeline step ``key``."""

    def _run(pipeline: dict, key: str = key, upstream: Optional[dict] = None, force: bool = False) -> dict:
        return run_step(pipeline, key, upstream or {}, force)

    _run.__name__ = f"{key}_task"
    return task(
        _run,
        name=key,
        cache_key_fn=step_cache_key,
        persist_result=True,
        retries=2,
        retry_delay_seconds=5,
        retry_condition_fn=_retry_transient,
        task_run_name=f"{key}",
    )
