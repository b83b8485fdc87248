"""The pipeline's wiring, without Prefect: which artifact feeds which stage field.

flows/pipeline.py runs these steps as Prefect tasks; this module only knows the DAG:

    base ──> vocab ──> records_lm ──┬──> adapt ──> prune ──> distill ──> sft ──> evaluate
                  └──> records_chat ┘      │                            ↑          ↑
                                           └──> prune_scratch ──> distill_scratch ─┘
                                     (records_chat feeds sft)

Each step is a (stage, key) pair: ``records`` runs twice (``records_lm`` for pretraining text and
``records_chat`` for chat data); ``prune_scratch`` and ``distill_scratch`` are the optional scratch arm
(``PipelineConfig.scratch``): the student's shape with random weights (prune ``init=random``), distilled
with the distill config on the same records for the same steps, the baseline a pruned student must beat.
Every other step is named after its stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minima.core.config import STAGE_CONFIGS, STAGE_NUMBER, PipelineConfig, StageConfig, build
from minima.core.errors import ConfigError


@dataclass(frozen=True)
class Step:
    key: str  # step name
    stage: str  # minima stage name
    needs: tuple[str, ...]  # upstream step keys (those whose step is switched off are left out)
    out_name: str  # directory name under run_dir
    config: str = ""  # PipelineConfig field holding the step's config; "" = key. A shared config's out_dir is not used.
    switch: str = ""  # PipelineConfig bool field that turns the step on; "" = always on

    @property
    def config_key(self) -> str:
        return self.config or self.key


STEPS: tuple[Step, ...] = (
    Step("vocab", "vocab", (), "01_vocab"),
    Step("records_lm", "records", ("vocab",), "02_records_lm"),
    Step("records_chat", "records", ("vocab",), "02_records_chat"),
    Step("adapt", "adapt", ("vocab", "records_lm"), "03_adapt"),
    Step("prune", "prune", ("adapt", "records_lm"), "04_prune"),
    Step("prune_scratch", "prune", ("adapt",), "04_prune_scratch", config="prune", switch="scratch"),
    Step("distill", "distill", ("adapt", "prune", "records_lm"), "05_distill"),
    Step(
        "distill_scratch",
        "distill",
        ("adapt", "prune_scratch", "records_lm"),
        "05_distill_scratch",
        config="distill",
        switch="scratch",
    ),
    Step("sft", "sft", ("distill", "records_chat"), "06_sft"),
    Step("evaluate", "evaluate", ("adapt", "prune", "distill", "distill_scratch", "sft"), "07_evaluate"),
)
STEP = {s.key: s for s in STEPS}
STAGE_TO_STEPS = {}
for _s in STEPS:
    STAGE_TO_STEPS.setdefault(_s.stage, []).append(_s.key)


def active_steps(pipeline: Optional[PipelineConfig] = None) -> list[str]:
    """Keys of the steps this pipeline runs, in DAG order (all of them when no pipeline is given)."""
    return [s.key for s in STEPS if pipeline is None or not s.switch or getattr(pipeline, s.switch)]


def step_needs(key: str, active: Optional[list[str]] = None) -> tuple[str, ...]:
    """The step's upstream steps among the active ones."""
    return tuple(n for n in STEP[key].needs if active is None or n in active)


def downstream(step_key: str) -> list[str]:
    """The step and everything that (transitively) depends on it, in DAG order."""
    out = {step_key}
    for s in STEPS:
        if any(n in out for n in s.needs):
            out.add(s.key)
    return [s.key for s in STEPS if s.key in out]


def select_steps(
    from_stage: Optional[str] = None, only_stage: Optional[str] = None, active: Optional[list[str]] = None
) -> tuple[set[str], set[str]]:
    """Steps to run and steps to force, among the ``active`` ones (default all). ``from_stage`` forces it and
    all that follows; ``only_stage`` forces just that stage (its inputs must already exist)."""

    def keys(name: str) -> list[str]:
        if name in STEP:
            return [name]
        if name in STAGE_TO_STEPS:
            return STAGE_TO_STEPS[name]
        import difflib

        close = difflib.get_close_matches(name, list(STEP) + list(STAGE_TO_STEPS), n=1)
        raise ConfigError(
            f"unknown stage '{name}'", fix=f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(STEP)}"
        )

    if from_stage and only_stage:
        raise ConfigError("--from-stage and --only-stage cannot be combined", fix="use one of them")
    all_keys = set(active_steps()) if active is None else set(active)
    if only_stage:
        ks = set(keys(only_stage)) & all_keys
        return ks, ks
    if from_stage:
        forced: set[str] = set()
        for k in keys(from_stage):
            forced |= set(downstream(k))
        return all_keys, forced & all_keys
    return all_keys, set()


# How a step's config gets its inputs from upstream artifact dirs.
Wiring = Callable[[StageConfig, dict[str, str]], dict]
WIRING: dict[str, Wiring] = {
    "vocab": lambda c, up: {},
    "records_lm": lambda c, up: {"tokenizer": up["vocab"]},
    "records_chat": lambda c, up: {"tokenizer": up["vocab"], "format": "chat"},
    "adapt": lambda c, up: {"model": up["vocab"], "records": up["records_lm"]},
    "prune": lambda c, up: {"teacher": up["adapt"], "records": up["records_lm"]},
    "prune_scratch": lambda c, up: {"teacher": up["adapt"], "records": None, "init": "random"},
    "distill": lambda c, up: {"teacher": up["adapt"], "student": up["prune"], "records": up["records_lm"]},
    "distill_scratch": lambda c, up: {
        "teacher": up["adapt"],
        "student": up["prune_scratch"],
        "records": up["records_lm"],
    },
    "sft": lambda c, up: {"model": up["distill"], "records": up["records_chat"]},
    "evaluate": lambda c, up: {
        "models": {
            "teacher": up["adapt"],
            "pruned": up["prune"],
            "distilled": up["distill"],
            **({"scratch": up["distill_scratch"]} if "distill_scratch" in up else {}),
            "chat": up["sft"],
        },
        "chat_models": c.chat_models or ["chat"],  # asked through its chat template, the others as base models
    },
}
# What each evaluated model is, for reports.
MODEL_LABELS = {
    "teacher": "teacher",
    "pruned": "pruned",
    "distilled": "pruned+distilled",
    "scratch": "scratch+distilled",
    "chat": "chat",
}


def step_config(pipeline: PipelineConfig, key: str, upstream: dict[str, str]) -> StageConfig:
    """The step's stage config with run_dir, out_dir and upstream inputs filled in (validated)."""
    step = STEP[key]
    cfg: StageConfig = getattr(pipeline, step.config_key)
    needs = step_needs(key, active_steps(pipeline))
    missing = [n for n in needs if n not in upstream]
    if missing:
        raise ConfigError(f"step {key} needs the artifacts of {', '.join(missing)}", fix="run the earlier stages first")
    changes = dict(WIRING[key](cfg, {n: upstream[n] for n in needs}))
    changes["run_dir"] = pipeline.run_dir
    changes["out_dir"] = step_out_dir(pipeline, key)
    data = cfg.model_dump()
    data.update(changes)
    return type(cfg).model_validate(data)


def step_out_dir(pipeline: PipelineConfig, key: str) -> str:
    """The step's artifact dir: its config's out_dir, else <run_dir>/<out_name> (always for a shared config)."""
    step = STEP[key]
    own = None if step.config else getattr(pipeline, key).out_dir
    return own or str(Path(pipeline.run_dir) / step.out_name)


def default_out_dirs(pipeline: PipelineConfig) -> dict[str, str]:
    return {s.key: step_out_dir(pipeline, s.key) for s in STEPS}


assert all(STAGE_NUMBER[s.stage] for s in STEPS)


# stage -> "module:function"; function(cfg, force=False) -> Artifact
STAGE_RUNNERS = {
    "vocab": "minima.stages.vocab:run",
    "records": "minima.stages.records:run",
    "adapt": "minima.stages.adapt:run",
    "prune": "minima.stages.prune:run",
    "distill": "minima.stages.distill:run",
    "sft": "minima.stages.sft:run",
    "evaluate": "minima.stages.evaluate:run",
}
# extra command -> ("module:function", help); function(argv: list[str]) -> int
COMMANDS = {
    "run": ("flows.cli:run_main", "run the Prefect pipeline flow (vocab -> ... -> evaluate)"),
    "demo": ("flows.cli:demo_main", "run the whole pipeline on the tiny preset with built-in data"),
    "plan": ("minima.train.plan:main", "memory/time sizing of a stage before any GPU time"),
    "chat": ("minima.infer.chat:main", "interactive terminal chat with a model dir"),
    "serve": ("minima.infer.serve:main", "OpenAI-compatible HTTP server for a model dir"),
    "self-instruct": (
        "minima.stages.self_instruct:main",
        "bootstrap instruction data from an OpenAI-compatible endpoint",
    ),
    "chat-eval": (
        "minima.evaluate.judge:main",
        "LLM-judged chat benchmarks (MT-Bench, BELLE, Z-Bench, Vicuna, AlpacaEval)",
    ),
    "distill-cache": ("minima.stages.distill:cache_main", "run the teacher once and cache sparse logits"),
    "demo-data": ("minima.data.demo:main", "write the built-in bilingual demo corpus and tokenizers"),
}


def stage_config(stage: str, preset: Optional[str], file: Optional[str], overrides: list[str]):
    """Resolve a stage config: preset, then YAML file, then key=value overrides."""
    from minima.core.presets import get_preset, stage_part  # presets build on config; imported when used

    base = stage_part(get_preset(preset), stage).model_dump(mode="json") if preset else {}
    return build(STAGE_CONFIGS[stage], base=base, file=file, overrides=overrides)
