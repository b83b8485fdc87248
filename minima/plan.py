"""``minima plan STAGE [--preset P] [key=value ...]``: memory, compute and disk before any GPU time.

Models are built on the meta device from their config (a model dir's config.json, or the preset's
shapes), so planning a 7B costs nothing. Per GPU, for the resolved stage config:

- parameters, total and trainable (LoRA counted);
- model states under ZeRO 0/1/2/3 at the planned world size (weights, gradients, optimizer);
- activations for micro_batch x seq, with and without activation checkpointing;
- the teacher (distill, online) or the logit cache (cached); the KV cache (evaluate);
- FLOPs per token (6N + 12 L d T, plus the teacher's forward for distill) and the time at an MFU;
- record-shard and checkpoint sizes.

Byte counts (per parameter) follow DeepSpeed's mixed-precision ZeRO: bf16/fp16 training keeps 2-byte
weights and gradients plus a 12-byte fp32 master + Adam m + v; fp32 training keeps 4 + 4 + 8, and
DeepSpeed's ZeRO optimizer also keeps a flat fp32 partition of the weights (+4).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError, PlanError

GiB = 1024**3
# Dense bf16 peak TFLOP/s and memory (GiB) of known devices.
DEVICES = {
    "a100-40g": (312.0, 40), "a100": (312.0, 80), "a100-80g": (312.0, 80), "h100": (989.0, 80), "h100-80g": (989.0, 80),
    "h200": (989.0, 141), "a800": (312.0, 80), "h800": (989.0, 80), "l40s": (362.0, 48), "4090": (165.0, 24),
    "cpu": (1.0, 24),
}
DEFAULT_MFU = 0.40


@dataclass
class PlanOptions:
    """What the plan assumes about the job (``plan.<field>=...`` on the command line)."""

    device: str = "a100"
    gpus: int = 8  # world size
    mfu: Optional[float] = None  # default: measured in benchmarks/RESULTS.md, else 40%
    tokens: Optional[float] = None  # token budget of the stage (default from the config's steps)
    corpus_tokens: Optional[float] = None  # records: tokens on disk
    bytes_per_token: float = 2.6  # records: measured on LLaMA ids (varint int64 in tf.Example)
    memory_gib: Optional[float] = None  # override the device's memory


# ------------------------------------------------------------------------------------ shapes
PRESET_SHAPES = {  # preset -> (teacher/base shape, student shape); vocab sizes after the vocab stage
    "tiny": ("TINY_TEACHER", "TINY_STUDENT", 1024),
    "micro": ("TINY_TEACHER", "TINY_STUDENT", 1024),
    "minima-3b": ("LLAMA2_7B", "MINIMA_3B", 49216),
    "minichat-3b": ("MINIMA_3B", "MINIMA_3B", 49216),
}


def llama_config(shape: dict, vocab_size: Optional[int] = None):
    from transformers import LlamaConfig

    kw = dict(shape)
    if vocab_size:
        kw["vocab_size"] = vocab_size
    kw.setdefault("vocab_size", 32000)
    return LlamaConfig(**kw)


def load_config(model_dir: Optional[str], fallback):
    """A model dir's config (no weights read), else the fallback config."""
    if model_dir and (Path(model_dir) / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir)
    return fallback


def meta_model(config):
    """Instantiate on the meta device: exact parameter shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_params(config) -> int:
    return sum(p.numel() for p in meta_model(config).parameters())


def lora_trainable(config, lora) -> int:
    """Parameters of LoRA adapters (r x (in + out) per targeted Linear) plus modules_to_save."""
    import torch

    model = meta_model(config)
    n = 0
    for name, mod in model.named_modules():
        leaf = name.split(".")[-1]
        if isinstance(mod, torch.nn.Linear) and leaf in lora.target_modules:
            n += lora.r * (mod.in_features + mod.out_features)
        if leaf in lora.modules_to_save:
            n += sum(p.numel() for p in mod.parameters())
    return n


# ------------------------------------------------------------------------------------ memory
def model_state_bytes(n_params: int, n_trainable: int, precision: str, zero: int, world: int) -> dict[str, float]:
    """Per-GPU weights / gradients / optimizer bytes under ZeRO stage ``zero``."""
    w_b = 4 if precision == "fp32" else 2
    g_b = w_b
    o_b = 12  # fp32 master (or, in fp32, ZeRO's flat fp32 partition) + Adam m + v
    weights = n_params * w_b
    grads = n_trainable * g_b
    optim = n_trainable * o_b
    if zero >= 1:
        optim /= world
    if zero >= 2:
        grads /= world
    if zero >= 3:
        weights /= world
    return {"weights": weights, "gradients": grads, "optimizer": optim}


def activation_bytes(config, micro_batch: int, seq: int, precision: str, checkpointing: bool, flash: bool = True) -> float:
    """Activations kept for backward in one micro-batch of a Llama-style decoder.

    Per layer (b x s tokens, hidden h, ffn f, q/kv widths): norm in/out (2h), q, k, v (h + 2kv),
    rotated q, k (h + kv), attention output (h), o_proj in (h), post-norm in/out (2h), gate, up,
    act(gate), act*up (4f) in the compute dtype, plus the attention matrix (heads x s x s, x2 for the
    softmax and its input) with eager attention. With checkpointing only each layer's input is kept,
    plus one layer recomputed at a time. The logits (b x s x V) are counted in fp32 twice (the upcast
    for the loss and its gradient).
    """
    b_ = 4 if precision == "fp32" else 2
    h = config.hidden_size
    f = config.intermediate_size
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (h // heads)
    L = config.num_hidden_layers
    tokens = micro_batch * seq
    per_layer = tokens * (2 * h + (h + 2 * kv) + (h + kv) + h + h + 2 * h + 4 * f) * b_
    if not flash:
        per_layer += micro_batch * heads * seq * seq * b_ * 2
    else:
        per_layer += micro_batch * heads * seq * 4  # logsumexp
    logits = tokens * config.vocab_size * (b_ + 4 + 4)
    embed = tokens * h * b_
    if checkpointing:
        return L * tokens * h * b_ + per_layer + logits + embed
    return L * per_layer + logits + embed


def kv_cache_bytes(config, batch: int, seq: int, precision: str = "bf16") -> float:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * seq * batch * (4 if precision == "fp32" else 2)


def flops_per_token(config, seq: int, n_params: int) -> float:
    """Training FLOPs per token: 6N + 12 L d T (attention scores and values, forward + backward)."""
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq


def measured_mfu(device: str) -> Optional[float]:
    """MFU recorded in benchmarks/RESULTS.md for this device (a line like `mfu_<device>: 0.41`)."""
    p = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"
    if not p.is_file():
        return None
    import re

    m = re.search(rf"mfu_{re.escape(device)}:\s*([0-9.]+)", p.read_text())
    return float(m.group(1)) if m else None


# ------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    stage: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)  # per-GPU bytes by component
    device_bytes: float = 0.0
    params: int = 0
    trainable: int = 0
    suggestions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_bytes

    def verdict(self) -> str:
        spare = (self.device_bytes - self.total_bytes) / GiB
        if self.fits:
            return f"fits with {spare:.1f} GiB spare"
        return f"does NOT fit: needs {self.total_bytes / GiB:.1f} GiB of {self.device_bytes / GiB:.0f} GiB" + (
            f"; try {' or '.join(self.suggestions)}" if self.suggestions else "")

    def table(self) -> str:
        lines = [f"minima plan: {self.stage}", ""]
        w = max(len(k) for k, _ in self.rows) if self.rows else 10
        lines += [f"  {k:<{w}}  {v}" for k, v in self.rows]
        if self.memory:
            mw = max(len(k) for k in self.memory)
            lines += ["", "  memory per GPU:"]
            for k, v in self.memory.items():
                lines.append(f"    {k:<{mw}} {v / GiB:9.2f} GiB")
            lines.append(f"    {'total':<{mw}} {self.total_bytes / GiB:9.2f} GiB  of {self.device_bytes / GiB:.0f} GiB -> {self.verdict()}")
        return "\n".join(lines)


def _fmt_n(n: float) -> str:
    for unit, d in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= d:
            return f"{n / d:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_time(seconds: float) -> str:
    if seconds > 86400 * 2:
        return f"{seconds / 86400:.1f} days"
    if seconds > 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


def _shapes(preset: Optional[str]):
    from . import presets

    t, s, v = PRESET_SHAPES.get(preset or "tiny", PRESET_SHAPES["tiny"])
    return llama_config(getattr(presets, t), v), llama_config(getattr(presets, s), v)


def plan_stage(cfg, opts: PlanOptions, preset: Optional[str] = None) -> Plan:
    """Build the plan for a resolved stage config."""
    teacher_fallback, student_fallback = _shapes(preset)
    dev_tflops, dev_gib = DEVICES.get(opts.device, (None, None)) if opts.device in DEVICES else (None, None)
    if dev_tflops is None:
        raise ConfigError(f"unknown device '{opts.device}'", fix=f"plan.device= one of {', '.join(DEVICES)}")
    plan = Plan(stage=cfg.stage, device_bytes=(opts.memory_gib or dev_gib) * GiB)
    world = opts.gpus
    stage = cfg.stage
    if stage in ("adapt", "distill", "sft"):
        if stage == "adapt":  # the big model, continued-pretrained
            config = load_config(cfg.model, teacher_fallback)
        elif stage == "distill":
            config = load_config(cfg.student, student_fallback)
        else:
            config = load_config(cfg.model, student_fallback)
        n = count_params(config)
        trainable = n
        if stage == "sft" and cfg.lora.enabled:
            trainable = lora_trainable(config, cfg.lora)
        seq = getattr(cfg, "max_length", None) or getattr(config, "max_position_embeddings", 2048)
        if stage != "sft":
            seq = _records_max_length(cfg.records) or config.max_position_embeddings
        zero = cfg.zero_stage if cfg.zero_stage is not None else 3
        states = model_state_bytes(n, trainable, cfg.precision, zero, world)
        if stage == "sft" and cfg.lora.enabled:  # frozen base weights are not partitioned by ZeRO-2
            states["weights"] = n * (4 if cfg.precision == "fp32" else 2) / (world if zero >= 3 else 1)
        plan.memory.update({f"{k} (ZeRO-{zero}, {world} GPUs)": v for k, v in states.items()})
        act = activation_bytes(config, cfg.micro_batch_size, seq, cfg.precision, cfg.activation_checkpointing)
        plan.memory[f"activations (mb {cfg.micro_batch_size} x {seq}{', ckpt' if cfg.activation_checkpointing else ''})"] = act
        fpt = flops_per_token(config, seq, n)
        if stage == "distill":
            tconf = load_config(cfg.teacher, teacher_fallback)
            nt = count_params(tconf)
            fpt += 2 * nt + 4 * tconf.num_hidden_layers * tconf.hidden_size * seq
            if cfg.cache_logits:
                cache = cfg.micro_batch_size * seq * cfg.cache_top_k * 6
                plan.memory["logit cache batch"] = cache
            else:
                plan.memory["teacher weights (bf16" + (", ZeRO-3)" if cfg.teacher_zero3 else ", replicated)")] = nt * 2 / (world if cfg.teacher_zero3 else 1)
                plan.memory["teacher logits"] = cfg.micro_batch_size * seq * tconf.vocab_size * 4
            plan.rows.append(("teacher params", _fmt_n(nt)))
        plan.params, plan.trainable = n, trainable
        plan.rows += [("params", f"{_fmt_n(n)} ({n:,})"), ("trainable", f"{_fmt_n(trainable)} ({trainable:,})"),
                      ("layers / hidden / heads / ffn", f"{config.num_hidden_layers} / {config.hidden_size} / {config.num_attention_heads} / {config.intermediate_size}"),
                      ("precision, ZeRO, world", f"{cfg.precision}, ZeRO-{zero}, {world} x {opts.device}")]
        gbs = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world
        tokens = opts.tokens or (cfg.max_steps * gbs * seq if cfg.max_steps > 0 else None)
        mfu = opts.mfu or measured_mfu(opts.device) or DEFAULT_MFU
        plan.rows.append(("FLOPs per token", f"{fpt:.3e}"))
        if tokens:
            seconds = tokens * fpt / (dev_tflops * 1e12 * mfu * world)
            plan.rows.append((f"time for {_fmt_n(tokens)} tokens", f"{_fmt_time(seconds)} at {mfu:.0%} MFU on {world} x {opts.device}"))
        ck = n * (4 if cfg.precision == "fp32" else 2)
        plan.rows.append(("checkpoint (weights / +optimizer)", f"{ck / GiB:.2f} GiB / {(ck + trainable * 12) / GiB:.2f} GiB"))
        # alternatives for the verdict
        if zero < 3 and world > 1:  # partitioning the remaining model states always helps
            plan.suggestions.append("zero_stage=3")
        if not cfg.activation_checkpointing:
            plan.suggestions.append("activation_checkpointing=true")
        for mb in (cfg.micro_batch_size // 2, cfg.micro_batch_size // 4, 1):
            if mb >= 1 and mb < cfg.micro_batch_size:
                a2 = activation_bytes(config, mb, seq, cfg.precision, cfg.activation_checkpointing)
                if plan.total_bytes - act + a2 <= plan.device_bytes:
                    plan.suggestions.append(f"micro_batch_size<={mb}")
                    break
    elif stage == "prune":
        config = load_config(cfg.teacher, teacher_fallback)
        n = count_params(config)
        plan.params = plan.trainable = n
        plan.memory["teacher weights"] = n * (4 if cfg.dtype == "fp32" else 2)
        act = activation_bytes(config, cfg.batch_size, cfg.max_length, cfg.dtype, checkpointing=False)
        plan.memory["calibration activations" + (" (gradient importance)" if cfg.importance == "gradient" else " (one layer at a time)")] = (
            act if cfg.importance == "gradient" else act / config.num_hidden_layers + cfg.batch_size * cfg.max_length * config.vocab_size * 4)
        if cfg.importance == "gradient":
            plan.memory["gradients"] = n * (4 if cfg.dtype == "fp32" else 2)
        plan.rows += [("teacher params", _fmt_n(n)), ("calibration tokens", _fmt_n(cfg.num_samples * cfg.max_length))]
        world = 1
    elif stage == "evaluate":
        config = load_config(cfg.model, student_fallback)
        n = count_params(config)
        plan.params = n
        seq = config.max_position_embeddings
        plan.memory["weights (bf16)"] = n * 2
        plan.memory[f"KV cache (batch {cfg.batch_size} x {seq})"] = kv_cache_bytes(config, cfg.batch_size, seq)
        plan.memory["logits"] = cfg.batch_size * seq * config.vocab_size * 4
        plan.rows += [("params", _fmt_n(n))]
    elif stage == "records":
        tokens = opts.corpus_tokens or 0
        plan.rows += [("corpus tokens", _fmt_n(tokens)), ("bytes per token", f"{opts.bytes_per_token:.2f}"),
                      ("shard size on disk", f"{tokens * opts.bytes_per_token / GiB:.2f} GiB")]
        plan.device_bytes = float("inf")
    elif stage == "vocab":
        plan.rows += [("work", "SentencePiece merge + embedding resize; CPU only")]
        plan.device_bytes = float("inf")
    return plan


def _records_max_length(records: Optional[str]) -> Optional[int]:
    if records and (Path(records) / "manifest.json").is_file():
        m = json.loads((Path(records) / "manifest.json").read_text())
        return (m.get("metrics") or {}).get("max_length") or (m.get("config") or {}).get("max_length")
    return None


def check_fits(cfg, opts: Optional[PlanOptions] = None, force: bool = False) -> Plan:
    """The engine's pre-launch check: raise PlanError with the table unless it fits (or force)."""
    plan = plan_stage(cfg, opts or PlanOptions())
    if not plan.fits and not force:
        raise PlanError(f"the plan says {cfg.stage} will not fit:\n{plan.table()}", fix="follow the suggestions, or pass --force")
    return plan


def main(argv: list[str]) -> int:
    from .cli import stage_config
    from .config import STAGES

    p = argparse.ArgumentParser(prog="minima plan", description="Memory/time sizing of a stage (or the pipeline) without loading weights.")
    p.add_argument("stage", help=f"one of {', '.join(STAGES)} or 'pipeline'")
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="stage overrides, plus plan.device=h100 plan.gpus=16 plan.tokens=126e9 plan.mfu=0.4")
    a = p.parse_intermixed_args(argv)
    opts = PlanOptions()
    stage_over = []
    for o in a.overrides:
        if o.startswith("plan."):
            k, v = o[5:].split("=", 1)
            if k not in PlanOptions.__dataclass_fields__:
                raise ConfigError(f"unknown plan option '{k}'", fix=f"one of {', '.join(PlanOptions.__dataclass_fields__)}")
            typ = type(getattr(PlanOptions(), k)) if getattr(PlanOptions(), k) is not None else float
            setattr(opts, k, v if typ is str else typ(float(v)) if typ is int else float(v))
        else:
            stage_over.append(o)
    stages = ["adapt", "prune", "distill", "sft", "evaluate"] if a.stage == "pipeline" else [a.stage]
    for s in stages:
        cfg = stage_config(s, a.preset, a.config, stage_over if a.stage != "pipeline" else [])
        print(plan_stage(cfg, opts, a.preset).table())
        print()
    return 0
