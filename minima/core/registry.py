"""The pipeline's wiring, without Prefect: which artifact feeds which stage field.

flows/pipeline.py runs these steps as Prefect tasks; this module only knows the DAG:

    base ──> vocab ──> records_lm ──┬──> adapt ──> prune ──> distill ──> sft ─────────────> evaluate ··> export
                  └──> records_chat ┘      │                            ↑   └─> records_pref ─> dpo ─┘  ↑
                                           │ (records_chat feeds sft) ──┘       (optional: dpo.enabled,  │
                                           │                                     export.enabled)       │
                                           └──> prune_scratch ──> distill_scratch ─────────────────────┘
                                                (optional: scratch=true)

Each step is a (stage, key) pair: ``records`` runs for ``records_lm`` (pretraining text),
``records_chat`` (chat data) and ``records_pref`` (preference pairs), every other step is named after
its stage. ``STEPS`` always run; an ``OPTIONAL_STEPS`` step (records_pref, dpo; export; the scratch arm)
runs only when its switch is on (``dpo.enabled``, ``export.enabled``, ``scratch``). A step's ``after`` are
optional steps it then also waits for and takes as inputs (evaluate adds the dpo model and the scratch
student to its comparison; export exports the dpo model when there is one).

The scratch arm (``prune_scratch`` -> ``distill_scratch``) is the baseline a pruned student must beat:
the student's shape with random weights (prune ``init=random``), distilled with the distill config on the
same records for the same steps. Its steps share the prune and distill configs (``Step.config``).

**Iterative compression.** With ``compress.rounds`` of R > 1 rounds, prune -> distill runs R times:
round i < R is the steps ``prune_r<i>`` and ``distill_r<i>`` (artifacts ``04_prune_r<i>``,
``05_distill_r<i>``), and round R is the ordinary ``prune`` and ``distill`` steps, so everything
downstream is wired as in a one-shot run. Each round prunes the previous round's student; its
distill teacher is that same model (``compress.teacher=previous``) or the adapted teacher
(``original``). Each round's configs are the pipeline's prune / distill configs with the round's
settings over them (``target_params``, ``tokens`` and the ``prune`` / ``distill`` maps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minima.core.config import STAGE_CONFIGS, STAGE_NUMBER, PipelineConfig, StageConfig, build, deep_merge
from minima.core.errors import ConfigError


@dataclass(frozen=True)
class Step:
    key: str  # step name
    stage: str  # minima stage name
    needs: tuple[str, ...]  # upstream step keys
    out_name: str  # directory name under run_dir
    switch: Optional[str] = None  # optional steps: the PipelineConfig field (a bool, or a config's ``enabled``)
    after: tuple[str, ...] = ()  # optional upstream steps: inputs too, when they run
    rename: tuple[tuple[str, str], ...] = ()  # (name the wiring reads, upstream step it is): compression rounds
    round: int = 0  # 1-based compression round of a prune / distill step; 0 = no rounds
    config: str = ""  # PipelineConfig field holding the step's config; "" = key. A shared config's out_dir is unused.

    @property
    def config_key(self) -> str:
        return self.config or self.key

    def inputs(self, active: Collection[str]) -> tuple[str, ...]:
        """Upstream step keys of this step when the steps ``active`` run."""
        return self.needs + tuple(k for k in self.after if k in active)


STEPS: tuple[Step, ...] = (
    Step("vocab", "vocab", (), "01_vocab"),
    Step("records_lm", "records", ("vocab",), "02_records_lm"),
    Step("records_chat", "records", ("vocab",), "02_records_chat"),
    Step("adapt", "adapt", ("vocab", "records_lm"), "03_adapt"),
    Step("prune", "prune", ("adapt", "records_lm"), "04_prune"),
    Step("distill", "distill", ("adapt", "prune", "records_lm"), "05_distill"),
    Step("sft", "sft", ("distill", "records_chat"), "06_sft"),
    Step("evaluate", "evaluate", ("adapt", "prune", "distill", "sft"), "07_evaluate", after=("dpo", "distill_scratch")),
)
# Steps that run only when ``<switch>.enabled`` is true (see ``pipeline_steps``). The preference records
# are tokenized by the sft model's own tokenizer (a chat format may have added tokens to it).
OPTIONAL_STEPS: tuple[Step, ...] = (
    Step("records_pref", "records", ("sft",), "06_records_pref", switch="dpo"),
    Step("dpo", "dpo", ("sft", "records_pref"), "06_dpo", switch="dpo"),
    Step("export", "export", ("sft", "evaluate"), "08_export", switch="export", after=("dpo",)),
    Step("prune_scratch", "prune", ("adapt",), "04_prune_scratch", switch="scratch", config="prune"),
    Step(
        "distill_scratch",
        "distill",
        ("adapt", "prune_scratch", "records_lm"),
        "05_distill_scratch",
        switch="scratch",
        config="distill",
    ),
)
_ORDER = (
    "vocab",
    "records_lm",
    "records_chat",
    "adapt",
    "prune",
    "prune_scratch",
    "distill",
    "distill_scratch",
    "sft",
    "records_pref",
    "dpo",
    "evaluate",
    "export",
)
# DAG order: an optional step runs before the steps that take it as input (evaluate after dpo), after its own.
ALL_STEPS: tuple[Step, ...] = tuple(sorted(STEPS + OPTIONAL_STEPS, key=lambda s: _ORDER.index(s.key)))
STEP = {s.key: s for s in ALL_STEPS}
STAGE_TO_STEPS = {}
for _s in ALL_STEPS:
    STAGE_TO_STEPS.setdefault(_s.stage, []).append(_s.key)


def switched_on(pipeline: PipelineConfig, switch: Optional[str]) -> bool:
    """Whether ``switch`` (a bool field, or a config with ``enabled``) is on; no switch is always on."""
    if switch is None:
        return True
    value = getattr(pipeline, switch)
    return value if isinstance(value, bool) else value.enabled


def switch_name(switch: str) -> str:
    """The key=value override that turns ``switch`` on."""
    return (
        f"{switch}=true" if isinstance(PipelineConfig.model_fields[switch].default, bool) else f"{switch}.enabled=true"
    )


def pipeline_steps(pipeline: PipelineConfig) -> tuple[Step, ...]:
    """The steps this pipeline config runs, in DAG order: ``STEPS`` plus the switched-on optional ones, with
    prune -> distill repeated for each compression round (see the module doc)."""
    base = tuple(s for s in ALL_STEPS if switched_on(pipeline, s.switch))
    n = len(pipeline.compress.rounds)
    if n == 0:
        return base
    previous = pipeline.compress.teacher == "previous"
    out: list[Step] = []
    for s in base:
        if s.key == "prune":
            src = "adapt"  # the model this round prunes
            for r in range(1, n):
                pk, dk = f"prune_r{r}", f"distill_r{r}"
                out.append(_round_step(pk, "prune", (src, "records_lm"), f"04_prune_r{r}", (("adapt", src),), r))
                teacher = src if previous else "adapt"
                out.append(
                    _round_step(
                        dk,
                        "distill",
                        (teacher, pk, "records_lm"),
                        f"05_distill_r{r}",
                        (("adapt", teacher), ("prune", pk)),
                        r,
                    )
                )
                src = dk
            out.append(_round_step("prune", "prune", (src, "records_lm"), s.out_name, (("adapt", src),), n))
        elif s.key == "distill":
            teacher = f"distill_r{n - 1}" if previous and n > 1 else "adapt"
            out.append(
                _round_step(
                    "distill", "distill", (teacher, "prune", "records_lm"), s.out_name, (("adapt", teacher),), n
                )
            )
        else:
            out.append(s)
    return tuple(out)


def _round_step(key: str, stage: str, needs: tuple[str, ...], out_name: str, rename, r: int) -> Step:
    needs = tuple(dict.fromkeys(needs))  # a round's teacher may also be the model it prunes
    return Step(key, stage, needs, out_name, rename=tuple((a, b) for a, b in rename if a != b), round=r)


def find_step(pipeline: PipelineConfig, key: str) -> Step:
    """The step ``key`` of this pipeline config (compression round steps included)."""
    for s in pipeline_steps(pipeline):
        if s.key == key:
            return s
    if key in STEP:
        return STEP[key]
    raise ConfigError(f"unknown step '{key}'", fix=f"choose from {', '.join(s.key for s in pipeline_steps(pipeline))}")


def tokens_to_steps(tokens: float, cfg, seq_len: int) -> int:
    """Optimizer steps that train on about ``tokens`` tokens at this config's global batch of ``seq_len`` rows."""
    launch = getattr(cfg, "launch", None)
    ranks = (launch.nproc_per_node * launch.nnodes) if launch is not None else 1
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * ranks * seq_len
    return max(1, math.ceil(tokens / per_step))


def round_config(pipeline: PipelineConfig, step: Step) -> StageConfig:
    """The step's own stage config: the pipeline's, with its compression round's settings over it."""
    base: StageConfig = getattr(pipeline, step.config_key) if step.key in STEP else getattr(pipeline, step.stage)
    if not step.round:
        return base
    i = step.round - 1
    rnd = pipeline.compress.rounds[i]
    data = base.model_dump()
    if step.key not in STEP:
        data["out_dir"] = None  # each round writes its own artifact
    if step.stage == "prune":
        data = deep_merge(data, rnd.prune)
        if rnd.target_params is not None:
            if "target_params" not in type(base).model_fields:
                raise ConfigError(
                    "this prune stage takes no target_params",
                    where=f"compress.rounds[{i}].target_params",
                    fix=f"give the round's shape: compress.rounds[{i}].prune={{num_layers: ..., hidden_size: ...}}",
                )
            data["target_params"] = rnd.target_params
    else:
        data = deep_merge(data, rnd.distill)
        if rnd.tokens is not None:
            data["max_steps"] = tokens_to_steps(
                rnd.tokens, type(base).model_validate(data), pipeline.records_lm.max_length
            )
    try:
        return type(base).model_validate(data)
    except Exception as e:
        raise ConfigError(
            f"the round gives {step.stage} an invalid config: {e}", where=f"compress.rounds[{i}]"
        ) from None


def downstream(step_key: str, steps: Sequence[Step] = STEPS) -> list[str]:
    """The step and everything that (transitively) depends on it among ``steps``, in DAG order."""
    keys = {s.key for s in steps}
    out = {step_key}
    for s in steps:
        if any(n in out for n in s.inputs(keys)):
            out.add(s.key)
    return [s.key for s in steps if s.key in out]


def select_steps(
    from_stage: Optional[str] = None, only_stage: Optional[str] = None, steps: Sequence[Step] = STEPS
) -> tuple[set[str], set[str]]:
    """Steps to run and steps to force, among ``steps``. ``from_stage`` forces it and all that
    follows; ``only_stage`` forces just that stage (its inputs must already exist)."""
    active = {s.key for s in steps}
    rounds = {s.key: s for s in steps if s.key not in STEP}  # compression round steps

    def keys(name: str) -> list[str]:
        if name in rounds:
            return [name]
        if name in STEP or name in STAGE_TO_STEPS:
            ks = [name] if name in STEP else [k for k in STAGE_TO_STEPS[name] if k in active or STEP[k].switch is None]
            if name in ("prune", "distill"):
                ks = [k for k, s in rounds.items() if s.stage == name] + ks  # every round of that stage
            off = [k for k in ks if k not in active]
            if off or not ks:
                switch = STEP[off[0] if off else STAGE_TO_STEPS[name][0]].switch
                raise ConfigError(
                    f"step {', '.join(off) or name} is switched off in this pipeline config",
                    fix=f"set {switch_name(switch)} to run it",
                )
            return ks
        import difflib

        close = difflib.get_close_matches(name, list(STEP) + list(STAGE_TO_STEPS), n=1)
        raise ConfigError(
            f"unknown stage '{name}'", fix=f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(STEP)}"
        )

    if from_stage and only_stage:
        raise ConfigError("--from-stage and --only-stage cannot be combined", fix="use one of them")
    if only_stage:
        ks = set(keys(only_stage))
        return ks, ks
    if from_stage:
        forced: set[str] = set()
        for k in keys(from_stage):
            forced |= set(downstream(k, steps))
        return active, forced
    return active, set()


# How a step's config gets its inputs from upstream artifact dirs.
Wiring = Callable[[StageConfig, dict[str, str]], dict]
WIRING: dict[str, Wiring] = {
    "vocab": lambda c, up: {},
    "records_lm": lambda c, up: {"tokenizer": up["vocab"]},
    "records_chat": lambda c, up: {"tokenizer": up["vocab"], "format": "chat"},
    "adapt": lambda c, up: {"model": up["vocab"], "records": up["records_lm"]},
    "prune": lambda c, up: {"teacher": up["adapt"], "records": up["records_lm"]},
    "prune_scratch": lambda c, up: {"teacher": up["adapt"], "records": None, "init": "random"},
    "distill": lambda c, up: {
        "teacher": up["adapt"],
        "student": up["prune"],
        "model": up["prune"],  # the same dir: a student set in the pipeline config must not disagree
        "records": up["records_lm"],
    },
    "distill_scratch": lambda c, up: {
        "teacher": up["adapt"],
        "student": up["prune_scratch"],
        "model": up["prune_scratch"],
        "records": up["records_lm"],
    },
    "sft": lambda c, up: {"model": up["distill"], "records": up["records_chat"]},
    "records_pref": lambda c, up: {"tokenizer": up["sft"], "format": "preference"},
    "dpo": lambda c, up: {"model": up["sft"], "records": up["records_pref"]},
    "evaluate": lambda c, up: {
        "models": {
            "teacher": up["adapt"],
            "pruned": up["prune"],
            "distilled": up["distill"],
            **({"scratch": up["distill_scratch"]} if "distill_scratch" in up else {}),
            "chat": up["sft"],
            **({"dpo": up["dpo"]} if "dpo" in up else {}),
        },
        # asked through their chat templates, the others as base models
        "chat_models": c.chat_models or ["chat", *(["dpo"] if "dpo" in up else [])],
    },
    "export": lambda c, up: {"model": up.get("dpo", up["sft"]), "evaluation": up["evaluate"]},
}
# What each evaluated model is, for reports.
MODEL_LABELS = {
    "teacher": "teacher",
    "pruned": "pruned",
    "distilled": "pruned+distilled",
    "scratch": "scratch+distilled",
    "chat": "chat",
    "dpo": "chat+dpo",
}


def step_config(pipeline: PipelineConfig, key: str, upstream: dict[str, str]) -> StageConfig:
    """The step's stage config with run_dir, out_dir and upstream inputs filled in (validated)."""
    step = find_step(pipeline, key)
    cfg: StageConfig = round_config(pipeline, step)
    active = {s.key for s in pipeline_steps(pipeline)}
    upstream = {k: v for k, v in upstream.items() if k in step.inputs(active)}  # a switched-off step is no input
    missing = [n for n in step.needs if n not in upstream]
    if missing:
        raise ConfigError(f"step {key} needs the artifacts of {', '.join(missing)}", fix="run the earlier stages first")
    wired = dict(upstream)
    for name, source in step.rename:  # a compression round reads its source model where the wiring reads adapt
        wired[name] = upstream[source]
    changes = dict((WIRING[key] if key in WIRING else WIRING[step.stage])(cfg, wired))
    changes["run_dir"] = pipeline.run_dir
    changes["out_dir"] = step_out_dir(pipeline, key)
    data = cfg.model_dump()
    data.update(changes)
    return type(cfg).model_validate(data)


def step_out_dir(pipeline: PipelineConfig, key: str) -> str:
    """The step's artifact dir: its config's out_dir, else <run_dir>/<out_name> (always for a shared config
    and for an earlier compression round)."""
    step = find_step(pipeline, key)
    own = None if (step.config or step.key not in STEP) else getattr(pipeline, key).out_dir
    return own or str(Path(pipeline.run_dir) / step.out_name)


def default_out_dirs(pipeline: PipelineConfig) -> dict[str, str]:
    out = {s.key: step_out_dir(pipeline, s.key) for s in ALL_STEPS}
    for s in pipeline_steps(pipeline):
        if s.key not in STEP:
            out[s.key] = str(Path(pipeline.run_dir) / s.out_name)
    return out


assert all(STAGE_NUMBER[s.stage] for s in ALL_STEPS)


# stage -> "module:function"; function(cfg, force=False) -> Artifact
STAGE_RUNNERS = {
    "vocab": "minima.stages.vocab:run",
    "records": "minima.stages.records:run",
    "adapt": "minima.stages.adapt:run",
    "prune": "minima.stages.prune:run",
    "distill": "minima.stages.distill:run",
    "sft": "minima.stages.sft:run",
    "dpo": "minima.stages.dpo:run",
    "evaluate": "minima.stages.evaluate:run",
    "export": "minima.stages.export:run",
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
    "analyze": ("minima.stages.analyze:main", "per-source token counts, length ratios and loss of a records build"),
}


def stage_config(stage: str, preset: Optional[str], file: Optional[str], overrides: list[str]):
    """Resolve a stage config: preset, then YAML file, then key=value overrides."""
    from minima.core.presets import get_preset, stage_part  # presets build on config; imported when used

    base = stage_part(get_preset(preset), stage).model_dump(mode="json") if preset else {}
    return build(STAGE_CONFIGS[stage], base=base, file=file, overrides=overrides)
