"""Resolve a DeepSpeed config: read the user's file, fill its ``"auto"`` fields from the stage config.

Only fields whose value is the string ``"auto"`` are filled, so a user's explicit value always wins.
The resolved dict is saved next to the outputs. A ``WarmupCosineLR`` scheduler block is run by
minima's own schedule (:mod:`minima.train.schedule`, the same numbers, shared with FSDP); any other
scheduler type is left to DeepSpeed. Used by ``strategy=deepspeed`` only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from minima.core.errors import ConfigError, InputError
from minima.train.schedule import WarmupCosine

# The built-in default, identical to the repo's ds_config.json (a test checks), used when the
# default name "ds_config.json" is not found in the working directory (e.g. an installed package).
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": 1e-8, "weight_decay": "auto", "torch_adam": "auto"},
    },
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": "auto",
            "warmup_num_steps": "auto",
            "warmup_min_ratio": "auto",
            "cos_min_ratio": "auto",
            "warmup_type": "linear",
        },
    },
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "activation_checkpointing": {"partition_activations": False, "contiguous_memory_optimization": False},
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}


def load_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON config, with a clear error naming file:line when it is unreadable."""
    p = Path(path)
    if not p.is_file():
        if str(path) == "ds_config.json":
            return copy.deepcopy(DEFAULT_DS_CONFIG)
        raise InputError(
            f"DeepSpeed config not found: {path}",
            where="ds_config",
            fix="point ds_config= at a JSON file, or leave the default",
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config is not valid JSON: {e.msg}", where=f"{p}:{e.lineno}:{e.colno}", fix="fix the JSON syntax"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"cannot read DeepSpeed config: {e}", where=str(p), fix="check the file's permissions and encoding"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError("DeepSpeed config must be a JSON object", where=str(p), fix="wrap the settings in {...}")
    return data


def _fill(d: dict, key: str, value: Any) -> None:
    if d.get(key) == "auto":
        d[key] = value


def resolve_ds_config(
    cfg,
    *,
    world_size: int,
    total_steps: int,
    on_gpu: bool,
    hidden_size: Optional[int] = None,
) -> dict:
    """The DeepSpeed config for this run, every "auto" filled from the TrainConfig ``cfg``.

    Args:
        cfg: a TrainConfig (micro batch, accumulation, lr, betas, weight decay, clip, precision, zero_stage).
        world_size: data-parallel ranks (train_batch_size = micro * accumulation * world_size).
        total_steps: optimizer steps of the whole run (scheduler length).
        on_gpu: False on CPU: bf16 only when asked for explicitly, fp16 refused, torch Adam.
        hidden_size: model width, used for the ZeRO bucket sizes (as HF Trainer does).
    """
    ds = load_ds_config(cfg.ds_config)
    ds = copy.deepcopy(ds)
    where = str(cfg.ds_config)

    precision = cfg.precision
    if not on_gpu:
        if precision == "fp16":
            raise ConfigError("fp16 training needs a GPU", where="precision", fix="use precision=fp32 (or bf16) on CPU")
        # bf16 is the default for GPUs; a CPU run uses fp32 unless bf16 was asked for explicitly.
        if precision == "bf16" and "precision" not in cfg.model_fields_set:
            precision = "fp32"

    mbs, gas = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", mbs)
    _fill(ds, "gradient_accumulation_steps", gas)
    _fill(ds, "train_batch_size", mbs * gas * world_size)
    _fill(ds, "gradient_clipping", cfg.grad_clip)
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if isinstance(ds.get(key), dict):
            _fill(ds[key], "enabled", on)
    if (
        ds.get("train_batch_size")
        != ds.get("train_micro_batch_size_per_gpu", 0) * ds.get("gradient_accumulation_steps", 0) * world_size
    ):
        raise ConfigError(
            f"train_batch_size {ds.get('train_batch_size')} != micro {ds.get('train_micro_batch_size_per_gpu')} x "
            f"accumulation {ds.get('gradient_accumulation_steps')} x world {world_size}",
            where=where,
            fix='set these three fields to "auto" so they follow the stage config',
        )

    opt = ds.get("optimizer", {}).get("params", {})
    _fill(opt, "lr", cfg.lr)
    _fill(opt, "betas", list(cfg.betas))
    _fill(opt, "weight_decay", cfg.weight_decay)
    # torch's AdamW avoids DeepSpeed's JIT-compiled op (minutes of compiling on first use).
    _fill(opt, "torch_adam", True)

    sch = ds.get("scheduler", {}).get("params", {})
    for key, value in WarmupCosine.from_config(cfg, total_steps).ds_params().items():
        _fill(sch, key, value)
    for k in ("warmup_max_lr", "warmup_min_lr"):  # WarmupLR / WarmupDecayLR spellings
        _fill(sch, k, cfg.lr if k == "warmup_max_lr" else 0.0)

    zero = ds.setdefault("zero_optimization", {})
    if cfg.zero_stage is not None:
        zero["stage"] = cfg.zero_stage
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size if hidden_size else int(5e8)),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size) if hidden_size else int(5e7)),
        ("stage3_param_persistence_threshold", 10 * hidden_size if hidden_size else int(1e5)),
    ):
        _fill(zero, key, value)

    left = list(_auto_paths(ds))
    if left:
        raise ConfigError(
            f"DeepSpeed config has 'auto' fields minima does not fill: {', '.join(left)}",
            where=where,
            fix="give them explicit values",
        )
    return ds


def _auto_paths(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _auto_paths(v, f"{prefix}{k}.")
    elif d == "auto":
        yield prefix.rstrip(".")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision_of(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def save_resolved(ds: dict, path: Path) -> None:
    path.write_text(json.dumps(ds, indent=2) + "\n")
