"""The minima DAG as a Prefect flow: vocab -> records (lm + chat, concurrently) -> adapt -> prune ->
distill -> sft [-> records_pref -> dpo, when ``dpo.enabled``] -> evaluate (-> export, when
``export.enabled``), each step's input being the previous steps' artifacts. With ``scratch=true`` the scratch
arm (prune_scratch -> distill_scratch) runs beside prune -> distill and is evaluated too.

Run it with ``minima run --config pipeline.yaml``, as a deployment (prefect.yaml), or by calling
``pipeline(...)`` from Python.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from minima.core.artifacts import is_complete
from minima.core.config import PipelineConfig, build
from minima.core.errors import ConfigError
from minima.core.presets import get_preset
from minima.core.registry import default_out_dirs, pipeline_steps, select_steps
from tasks._common import artifact_current, make_task
from tasks.adapt import adapt_task
from tasks.distill import distill_scratch_task, distill_task
from tasks.dpo import dpo_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.prune import prune_scratch_task, prune_task
from tasks.records import records_chat_task, records_lm_task, records_pref_task
from tasks.sft import sft_task
from tasks.vocab import vocab_task

TASKS = {
    "vocab": vocab_task,
    "records_lm": records_lm_task,
    "records_chat": records_chat_task,
    "adapt": adapt_task,
    "prune": prune_task,
    "prune_scratch": prune_scratch_task,
    "distill": distill_task,
    "distill_scratch": distill_scratch_task,
    "sft": sft_task,
    "records_pref": records_pref_task,
    "dpo": dpo_task,
    "evaluate": evaluate_task,
    "export": export_task,
}


def resolve_config(
    config: Optional[dict | str] = None, preset: Optional[str] = None, overrides: list[str] = ()
) -> PipelineConfig:
    """Preset, then a YAML file path (or a dict), then dotted overrides such as distill.loss.temperature=2."""
    base = get_preset(preset).model_dump(mode="json") if preset else {}
    if isinstance(config, dict):
        from minima.core.config import deep_merge

        base, config = deep_merge(base, config), None
    return build(PipelineConfig, base=base, file=config, overrides=list(overrides))


@flow(name="minima-pipeline", log_prints=True)
def pipeline(
    config: Optional[dict] = None,
    preset: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    from_stage: Optional[str] = None,
    only_stage: Optional[str] = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the DAG. Finished steps are cache hits; ``from_stage`` reruns it and what follows,
    ``only_stage`` reruns one stage on the existing upstream artifacts, ``force`` reruns all."""
    from minima.stages.report import cpu_seconds

    t0, cpu0 = time.time(), cpu_seconds()
    log = get_run_logger()
    cfg = resolve_config(config, preset, overrides or [])
    steps = pipeline_steps(cfg)
    run_keys, forced = select_steps(from_stage, only_stage, steps)
    if force:
        forced = set(run_keys)
    payload = cfg.model_dump(mode="json")
    outs = default_out_dirs(cfg)
    futures: dict[str, Any] = {}
    active = {s.key for s in steps}
    for step in steps:
        if step.key not in run_keys:
            continue
        upstream: dict[str, Any] = {}
        for need in step.inputs(active):
            if need in futures:
                upstream[need] = futures[need]
            elif is_complete(outs[need]):
                upstream[need] = {"path": outs[need]}
            else:
                raise ConfigError(
                    f"{step.key} needs the {need} artifact at {outs[need]}, which is missing or incomplete",
                    fix=f"run the pipeline without --only-stage, or --from-stage {need}",
                )
        refresh = step.key in forced or not artifact_current(cfg, step.key, outs)
        t = (TASKS.get(step.key) or make_task(step.key)).with_options(refresh_cache=refresh)  # round steps: own tasks
        futures[step.key] = t.submit(payload, step.key, upstream, step.key in forced)
    results = {k: f.result() for k, f in futures.items()}
    states = {k: f.state.name for k, f in futures.items()}
    for k, r in results.items():
        r["state"] = states[k]
        log.info("%-12s %-8s %s%s", k, states[k], r["path"], " (artifact reused)" if r.get("skipped") else "")
    _publish_report(
        cfg, results, [{"what": "pipeline flow", "wall_s": time.time() - t0, "cpu_s": cpu_seconds() - cpu0}]
    )
    return results


def _publish_report(cfg: PipelineConfig, results: dict[str, dict], timing: list[dict]) -> None:
    """Write runs/<id>/report.md (+ html) and attach the tables to the flow run as Prefect artifacts."""
    from minima.stages.report import write_report

    report = write_report(Path(cfg.run_dir), results, timing=timing)
    md = Path(report["markdown"]).read_text()
    create_markdown_artifact(key="minima-report", markdown=md, description=f"minima pipeline report for {cfg.run_dir}")
