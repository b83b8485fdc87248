"""The one shape every stage task has: build the step config, call minima, return the artifact.

Caching works on two levels that agree with each other:
- Prefect: the cache key is the step's config hash plus the upstream artifacts' cache keys; the
  result (a small dict) is persisted, so a rerun of the flow returns it without running the task.
  The flow refreshes the cache of a step whose artifact on disk is missing or was built from another
  config (see ``artifact_current``), so a cached result never points at a deleted or stale dir.
- minima: the stage itself skips when its manifest's cache key matches (a CLI rerun, or a Prefect
  cache miss after the result store was wiped), and inside the flow replaces a stale artifact.
Retries happen only for transient failures; a MinimaError (bad config, bad input) never retries.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any, Optional

from prefect import task
from prefect.context import TaskRunContext

from minima.core.artifacts import (
    Artifact,
    canonical_json,
    config_hash,
    is_complete,
    read_manifest,
    replacing_stale,
    sha256_text,
    verify_files,
)
from minima.core.config import PipelineConfig
from minima.core.errors import MinimaError
from minima.core.registry import STAGE_RUNNERS, find_step, step_config

TRANSIENT = (ConnectionError, TimeoutError)


def _drop_prefect_exit_hooks_in_forked_child() -> None:
    """Prefect 3.8 registers a thread-exit drain for each of its services and, in a forked child,
    resets the services without unregistering it; the drain then fails an assertion and the child
    exits with code 1 (e.g. DataLoader workers or a records pool forked by a process that ran a flow).
    A child never owns those services, so drop their hooks there."""
    import threading

    from prefect._internal.concurrency.services import _QueueServiceBase

    def owner(hook):
        fn = getattr(hook, "func", hook)  # threading wraps each hook in functools.partial
        return getattr(fn, "__self__", None)

    hooks = getattr(threading, "_threading_atexits", None)
    if hooks:
        hooks[:] = [h for h in hooks if not isinstance(owner(h), _QueueServiceBase)]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_prefect_exit_hooks_in_forked_child)


def _upstream_paths(upstream: dict[str, Any]) -> dict[str, str]:
    return {k: (v["path"] if isinstance(v, dict) else str(v)) for k, v in upstream.items()}


def step_cache_key(context: Optional[TaskRunContext], params: dict[str, Any]) -> Optional[str]:
    """Cache key of a step: its config hash plus its upstream artifacts' cache keys."""
    try:
        pipeline = PipelineConfig.model_validate(params["pipeline"])
        upstream = params.get("upstream") or {}
        cfg = step_config(pipeline, params["key"], _upstream_paths(upstream))
    except Exception:  # invalid config: no caching; the task runs and raises its clear error
        return None
    up_keys = {}
    for k, v in upstream.items():
        if isinstance(v, dict) and v.get("cache_key"):
            up_keys[k] = v["cache_key"]
        else:
            p = _upstream_paths({k: v})[k]
            up_keys[k] = read_manifest(p)["cache_key"] if is_complete(p) else None
    return f"minima-{params['key']}-" + sha256_text(
        canonical_json({"out": str(cfg.resolved_out_dir()), "config": config_hash(cfg), "up": up_keys})
    )


def artifact_current(pipeline: PipelineConfig, key: str, upstream_paths: dict[str, str]) -> bool:
    """True when the step's artifact on disk is complete, intact (cfg.verify) and was built for this step config."""
    try:
        cfg = step_config(pipeline, key, upstream_paths)
    except Exception:
        return False
    out = cfg.resolved_out_dir()
    if not is_complete(out):
        return False
    manifest = read_manifest(out)
    if manifest.get("config_hash") != config_hash(cfg):
        return False
    return verify_files(out, manifest, cfg.verify) is None  # a damaged one reruns (and is rebuilt)


def _retry_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(exc, MinimaError):
        return bool(getattr(exc, "transient", False))
    return isinstance(exc, TRANSIENT)


_IMPORT_LOCK = threading.Lock()
# transformers resolves these names lazily, importing a submodule on first use; two task threads doing that
# at once can see a half-imported module ("cannot import name 'AutoTokenizer'"). Resolved once, under a lock.
_LAZY_NAMES = (
    "AutoConfig",
    "AutoTokenizer",
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "PreTrainedTokenizerFast",
    "GenerationConfig",
)


def warm_imports() -> None:
    """Import the stage modules' heavy dependencies in one thread at a time (idempotent, cheap when done)."""
    with _IMPORT_LOCK:
        import transformers

        for name in _LAZY_NAMES:
            getattr(transformers, name)


def run_step(pipeline: dict, key: str, upstream: dict[str, Any], force: bool = False) -> dict:
    """Run one pipeline step in this process (the training stages launch their own subprocesses)."""
    pcfg = PipelineConfig.model_validate(pipeline)
    cfg = step_config(pcfg, key, _upstream_paths(upstream))
    stage = find_step(pcfg, key).stage
    module, fn = STAGE_RUNNERS[stage].split(":")
    warm_imports()
    with _IMPORT_LOCK:
        importlib.import_module(module)
    with replacing_stale():
        artifact: Artifact = getattr(importlib.import_module(module), fn)(cfg, force=force)
    return {
        "key": key,
        "stage": stage,
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
