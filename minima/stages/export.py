"""Stage export: a model dir as a GGUF file or a safetensors release dir, with a model card and lineage.

``minima export model=DIR format=gguf|safetensors [dtype=f16|bf16|q8_0] out_dir=...``

The artifact holds the model file(s), ``README.md`` (a Hugging Face model card with the lineage
and the evaluation table) and ``lineage.json``. The writers live in :mod:`minima.models.gguf` and
:mod:`minima.models.release`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from minima.core.artifacts import MANIFEST, Artifact, StageRun, read_manifest, run_stage
from minima.core.config import ExportConfig
from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger
from minima.models.release import (
    base_model_name,
    check_release_inputs,
    find_evaluation,
    lineage,
    model_card,
    write_safetensors_release,
)

log = get_logger("minima.stages.export")


def _evaluation(cfg: ExportConfig) -> Optional[str]:
    if cfg.evaluation:
        return cfg.evaluation
    found = find_evaluation(cfg.model)
    return str(found) if found else None


def validate_inputs(cfg: ExportConfig) -> Optional[str]:
    """Check the model dir (and for GGUF its family, rope and tokenizer) and the evaluate artifact.

    Returns the evaluate artifact the card's scores come from (None when there is none).
    """
    if not cfg.model:
        raise ConfigError("no model to export", where="ExportConfig.model", fix="set model=<a stage's model dir>")
    if cfg.format == "gguf":
        from minima.models.gguf import model_spec

        model_spec(cfg.model)  # family, rope and tokenizer first: the error names what is supported
    check_release_inputs(cfg.model)
    evaluation = _evaluation(cfg)
    if evaluation is not None:
        p = Path(evaluation)
        if not (p / MANIFEST).is_file() or read_manifest(p).get("stage") != "evaluate":
            raise InputError(
                f"{p} is not an evaluate artifact",
                where="ExportConfig.evaluation",
                fix="point evaluation= at an evaluate stage's output (or leave it unset)",
            )
        if not (p / "results.json").is_file():
            raise InputError(f"{p} has no results.json", where="ExportConfig.evaluation")
    return evaluation


def model_name(cfg: ExportConfig) -> str:
    """The name given, else <run dir name>-<stage> for a stage artifact, else the dir's name."""
    if cfg.name:
        return cfg.name
    p = Path(cfg.model).resolve()
    if (p / MANIFEST).is_file():
        stage = read_manifest(p).get("stage")
        if stage:
            return f"{p.parent.name}-{stage}"
    return p.name


def score_table(evaluation: Optional[str]) -> Optional[tuple[list[str], list[list[Any]]]]:
    """(headers, rows) of the evaluate artifact's scores, formatted (percentages for accuracies)."""
    if not evaluation:
        return None
    from minima.evaluate.report import fmt
    from minima.stages.report import eval_rows

    headers, rows = eval_rows(Path(evaluation))
    return headers, [[t, m, *[fmt(m, v) if isinstance(v, (int, float)) else "–" for v in vals]] for t, m, *vals in rows]


def _body(cfg: ExportConfig, run: StageRun, evaluation: Optional[str]) -> dict:
    t0 = time.time()
    out = run.work_dir
    name = model_name(cfg)
    dtype = cfg.resolved_dtype()
    lin = lineage(cfg.model)
    base = cfg.base_model or base_model_name(lin)
    metrics: dict[str, Any] = {"format": cfg.format, "dtype": dtype, "name": name}
    family = json.loads((Path(cfg.model) / "config.json").read_text()).get("model_type")
    if cfg.format == "gguf":
        from minima.models.gguf import FILE_LABEL, write_gguf

        gguf_file = f"{name}-{FILE_LABEL[dtype]}.gguf"
        card = {"license": cfg.license, "languages": cfg.language, "tags": ["minima", *cfg.tags], "base_model": base}
        info = write_gguf(cfg.model, out / gguf_file, dtype=dtype, name=name, card=card)
        files = [(gguf_file, info["bytes"])]
        metrics.update(
            file=gguf_file,
            bytes=info["bytes"],
            tensors=info["tensors"],
            params=info["params"],
            by_type=info["by_type"],
            vocab_tokens=info["vocab_tokens"],
            added_tokens=info["added_tokens"],
            write_s=info["seconds"],
        )
    else:
        info = write_safetensors_release(cfg.model, out, dtype=dtype, max_shard_size=cfg.max_shard_size)
        files = [(s, (out / s).stat().st_size) for s in info["shards"]]
        metrics.update(shards=info["shards"], bytes=info["weights_bytes"], tensors=info["tensors"])
    lin["evaluation"] = str(Path(evaluation).resolve()) if evaluation else None
    (out / "lineage.json").write_text(json.dumps(lin, indent=2, ensure_ascii=False, default=str) + "\n")
    card_md = model_card(
        name=name,
        fmt=cfg.format,
        dtype=dtype,
        files=files,
        lin=lin,
        license=cfg.license,
        language=cfg.language,
        base_model=base,
        tags=cfg.tags,
        scores=score_table(evaluation),
        evaluation=evaluation,
        family=family,
    )
    (out / "README.md").write_text(card_md, encoding="utf-8")
    metrics.update(
        lineage_artifacts=len(lin["artifacts"]),
        raw_inputs=len(lin["raw_data"]),
        evaluation=lin["evaluation"],
        seconds=round(time.time() - t0, 3),
    )
    log.info(f"export: {cfg.format} {dtype} -> {run.out_dir} ({metrics['bytes'] / 2**20:.1f} MiB)")
    return metrics


def run(cfg: ExportConfig, force: bool = False) -> Artifact:
    """Stage entry point: validate, then write the export artifact (cached on model + evaluation + config)."""
    evaluation = validate_inputs(cfg)
    inputs = {"model": cfg.model, "evaluation": evaluation}
    return run_stage(cfg, inputs, lambda r: _body(cfg, r, evaluation), force=force)
