"""``minima plan STAGE [--preset P] [key=value ...]``: memory, compute and disk before any GPU time.

Models are built on the meta device from their config (a model dir's config.json, or the preset's
shapes), so planning a 7B costs nothing. Per GPU, for the resolved stage config:

- parameters, total and trainable (LoRA counted);
- model states under ZeRO 0/1/2/3 at the planned world size (weights, gradients, optimizer);
- activations for micro_batch x seq, with and without activation checkpointing;
- the teacher (distill, online) or the logit cache (cached); dpo's reference model (a frozen copy,
  or nothing with ``precompute_ref`` or LoRA) and its 2 x micro_batch rows per forward; the KV cache
  (evaluate);
- FLOPs per token (6N + 12 L d T, plus the teacher's forward for distill) and the time at an MFU;
- record-shard and checkpoint sizes.

Memory is what the engine allocates, term by term (see the memory section below): DeepSpeed's ZeRO
buffers (weights, fp32 master partition + Adam m, v, ZeRO-3's gradient partition, reduce buckets,
gathered ZeRO-3 parameters), the tensors autograd saves per Llama layer (checked byte for byte
against a real HF layer in tests), the loss's logit temporaries, the optimizer step's temporaries,
and the process runtime. The peak is the resident part plus the larger of the forward/backward and
optimizer-step phases; benchmarks/plan.py checks it against measured peaks of real CPU runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from minima.core.errors import ConfigError, PlanError
from minima.models.counts import count_params, flops_per_token, meta_model, non_embedding_params
from minima.train.recipe import LM_LOSS_CHUNK

GiB = 1024**3
# Dense bf16 peak TFLOP/s and memory (GiB) of known devices.
DEVICES = {
    "a100-40g": (312.0, 40),
    "a100": (312.0, 80),
    "a100-80g": (312.0, 80),
    "h100": (989.0, 80),
    "h100-80g": (989.0, 80),
    "h200": (989.0, 141),
    "a800": (312.0, 80),
    "h800": (989.0, 80),
    "l40s": (362.0, 48),
    "4090": (165.0, 24),
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
    seq: Optional[int] = None  # sequence length (default: the records' max_length, sft's max_length, else the model's)

    @classmethod
    def local(cls, cfg, per_node: Optional[int] = None, nnodes: Optional[int] = None) -> PlanOptions:
        """This machine as the launcher will use it: its GPU (or, on CPU, its RAM shared by the local ranks).

        ``per_node`` / ``nnodes`` default to ``launch.nproc_per_node`` / ``launch.nnodes`` (a Slurm
        allocation passes its own).
        """
        launch = getattr(cfg, "launch", None)
        per_node = per_node or (launch.nproc_per_node if launch else 1)
        world = per_node * (nnodes or (launch.nnodes if launch else 1))
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                name = props.name.lower()
                device = next(
                    (d for d in ("h200", "h100", "h800", "a800", "a100", "l40s", "4090") if d in name), "a100"
                )
                return cls(device=device, gpus=world, memory_gib=props.total_memory / GiB)
        except Exception:  # no usable CUDA: plan for the CPU
            pass
        import psutil

        return cls(device="cpu", gpus=world, memory_gib=psutil.virtual_memory().total / GiB / per_node)

    @classmethod
    def remote(cls, cfg) -> PlanOptions:
        """The nodes a slurm/ssh job runs on: ``launch.gpus_per_node`` x ``launch.nnodes`` GPUs of ``launch.gpu``."""
        launch = cfg.launch
        return cls(device=launch.gpu.lower(), gpus=launch.gpus_per_node * launch.nnodes)

    @classmethod
    def for_job(cls, cfg, launcher: Optional[str] = None, per_node: Optional[int] = None, nnodes: Optional[int] = None):
        """What the job will run on: the target GPUs when it goes to Slurm or ssh from here, else this machine.

        ``launcher`` is the resolved launch (``sbatch`` / ``deepspeed`` leave this machine); by default
        ``cfg.launch.launcher`` decides.
        """
        launch = getattr(cfg, "launch", None)
        remote = launcher in ("sbatch", "deepspeed") if launcher else bool(launch and launch.launcher != "local")
        return cls.remote(cfg) if remote else cls.local(cfg, per_node, nnodes)


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
# What the engine allocates, per rank, checked against measured peaks of tiny CPU runs of adapt,
# distill and sft (benchmarks/plan.py; ZeRO-2/3, checkpointing on/off, LoRA). Every term below says
# where it comes from. The peak of a training step is
#
#     resident (model states, frozen/teacher weights, runtime)
#       + max(forward/backward: activations + loss temporaries [+ ZeRO-3 gathered parameters],
#             optimizer step: gradient copies + Adam temporaries)
#
# because activations are freed by the end of the backward, before the optimizer step allocates.
MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's stage3_max_live_parameters / stage3_max_reuse_distance defaults
# Memory a training process holds besides tensors. CPU: library code pages first touched by training,
# DeepSpeed's shared-memory comm buffers, the heap of per-parameter bookkeeping; measured by
# benchmarks/plan.py as the peak of a tiny model's run (where every tensor term is < 1 MiB).
# GPU: the CUDA context with cuBLAS and NCCL workspaces, typically 0.5-1.5 GiB (not measured here).
RUNTIME_BYTES = {"cpu": 76 * 2**20, "gpu": 1.0 * GiB}


def compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_state_bytes(
    n_params: int, n_trainable: int, precision: str, zero: int, world: int, accumulation: int = 1
) -> dict[str, float]:
    """Resident per-rank bytes of DeepSpeed's model states under ZeRO stage ``zero``.

    - weights: the compute-dtype copy (e = 4 fp32, 2 bf16/fp16 bytes per parameter), partitioned
      (1/world) only by ZeRO-3. Under ZeRO-1/2 DeepSpeed moves the trainable weights into one flat
      buffer (the loaded tensors are freed, so there is one copy).
    - optimizer: 12 bytes per trainable parameter: the fp32 master partition (kept even in fp32
      training: ZeRO clones a flat fp32 partition of the weights) + Adam m + v, 1/world from ZeRO-1.
    - gradients: ZeRO-3 allocates a flat gradient partition (e per trainable / world) at start.
      ZeRO-0/1/2 gradients exist only from the backward to the optimizer step, so they count in the
      step phase (``step_transient_bytes``); with gradient accumulation they live across micro-batches
      and are resident (full under ZeRO-0/1, 1/world under ZeRO-2).
    """
    e = compute_bytes(precision)
    weights = n_params * e / (world if zero >= 3 else 1)
    # ZeRO-0 in fp32 steps torch's AdamW on the weights themselves: no master copy (not measured)
    optim = n_trainable * (8 if zero == 0 and e == 4 else 12) / (world if zero >= 1 else 1)
    if zero >= 3:
        grads = n_trainable * e / world
    elif accumulation > 1:
        grads = n_trainable * e / (world if zero == 2 else 1)
    else:
        grads = 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optim}


def step_transient_bytes(
    n_trainable: int, precision: str, zero: int, world: int, cpu: bool, accumulation: int = 1
) -> float:
    """Peak extra bytes of the optimizer step (activations are gone by then).

    DeepSpeed flattens the gradient partition into an fp32 copy for the optimizer (4 bytes), and
    torch's AdamW computes ``sqrt(v) / c`` into fp32 temporaries: two at once in its single-tensor CPU
    path, one in the foreach path used on GPUs (4 or 8 bytes). Under ZeRO-0/1/2 the gradient
    partition (e bytes) exists here too unless it is resident (accumulation > 1) and is freed once
    copied, before Adam runs: 4 + max(e, Adam). ZeRO-3's gradient buffer is resident: 4 + Adam.
    Measured on CPU in fp32: 12 bytes per trainable parameter per rank for both ZeRO-2 and ZeRO-3.
    """
    e = compute_bytes(precision)
    shard = world if zero >= 1 else 1
    fp32_copy, adam = n_trainable * 4 / shard, n_trainable * (8 if cpu else 4) / shard
    if zero >= 3 or accumulation > 1:
        return fp32_copy + adam
    return fp32_copy + max(n_trainable * e / (world if zero == 2 else 1), adam)


def attn_implementation(config) -> str:
    """The attention kernel the engine's model will use: the config's choice, else sdpa (HF's default)."""
    impl = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return impl if impl in ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention") else "sdpa"


LORA_INPUTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_activation_bytes(
    config, tokens: int, precision: str, *, attn: str = "sdpa", micro_batch: int = 1, lora=None, cpu: bool = False
) -> float:
    """Bytes one HF LlamaDecoderLayer saves for its backward (checked tensor by tensor in tests).

    Per token, e = compute bytes, h hidden, kv = KV heads x head dim, f ffn:
    - each RMSNorm (two per layer) saves its input upcast to fp32 (4h) and 1/rms (4); with trainable
      weights also the normalised x (e h, for the norm weight's gradient) and its output (e h, the
      Linear inputs);
    - sdpa/flash attention saves the rotated q, k and v and its output (e (2h + 2 kv)), whose
      transpose is already contiguous (the o_proj input shares it), plus a logsumexp per head and
      position; eager saves q and k, v repeated to all heads (3 e h), the fp32 softmax (4 b H s^2,
      and its compute-dtype copy below fp32) and the o_proj input (e h);
    - the MLP saves gate, up and act(gate) (3 e f) and act*up (e f, the down_proj input).

    LoRA (peft) leaves the base Linears frozen, so they save nothing for themselves: the norms keep
    only their fp32 input and 1/rms, and an input is kept only if a lora_A needs it. With dropout > 0
    each targeted Linear saves its dropout output and mask (e each on CPU, where dropout multiplies
    by an fp32 noise tensor; a 1-byte mask on GPU) instead; every adapter also saves its r-wide
    lora_A output.
    """
    e = compute_bytes(precision)
    h, f = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (h // heads)
    seq = tokens // max(micro_batch, 1)
    full = lora is None or not lora.enabled
    targets = set() if full else set(lora.target_modules) & set(LORA_INPUTS)
    drop = not full and lora.dropout > 0
    ins = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h, "down_proj": f}
    per = 2 * (4 * h + 4)
    if full:
        per += 2 * 2 * e * h
    elif not drop:  # lora_A reads the norm output itself
        per += e * h * (bool(targets & {"q_proj", "k_proj", "v_proj"}) + bool(targets & {"gate_proj", "up_proj"}))
    if attn == "eager":
        per += 3 * e * h + (e * h if full or (not drop and "o_proj" in targets) else 0)
        extra = micro_batch * heads * seq * seq * (4 + (e if e < 4 else 0))
    else:
        per += e * (2 * h + 2 * kv)
        extra = micro_batch * heads * seq * 4
    per += 3 * e * f + (e * f if full or (not drop and "down_proj" in targets) else 0)
    mask = e if cpu else 1
    for t in targets:
        per += e * lora.r + ((e + mask) * ins[t] if drop else 0)
    return tokens * per + extra


def loss_bytes(
    tokens: int,
    vocab: int,
    precision: str,
    loss: str = "ce",
    *,
    teacher_bytes: int = 4,
    chunk: int = 0,
    top_k: int = 64,
) -> float:
    """Peak bytes of the logits and the loss (forward and backward), b*s tokens over the vocab V.

    - ``ce`` (adapt, sft: ``causal_lm_loss_sum``, the same vocab-chunked Function with no teacher): the
      logits (e), their gradient (e) and about three fp32 [tokens, chunk] temporaries (chunk 8192).
    - ``kd`` (distill, online teacher, ``minima.train.objectives.kd.dense_loss``): student logits (e), teacher
      logits, the student's logit gradient (e) and about six fp32 [tokens, chunk] temporaries of the
      fused, vocab-chunked loss (exp, differences, products of one chunk).
    - ``kd_cached`` (distill from the logit cache): student logits and gradient, three fp32
      [tokens, chunk] temporaries for the log-sum-exp, and the [tokens, k] targets (ids, values,
      rest) with their fp32 gathers (not measured).
    """
    e = compute_bytes(precision)
    c = min(chunk, vocab) if chunk > 0 else vocab
    if loss == "kd":
        return tokens * (vocab * (2 * e + teacher_bytes) + 6 * c * 4)
    if loss == "kd_cached":
        return tokens * (vocab * 2 * e + 3 * c * 4 + top_k * (8 + 4 + 4) * 2)
    return tokens * (vocab * 2 * e + 3 * min(LM_LOSS_CHUNK, vocab) * 4)


def activation_bytes(
    config,
    micro_batch: int,
    seq: int,
    precision: str,
    checkpointing: bool,
    flash: bool = True,
    *,
    attn: Optional[str] = None,
    loss: str = "ce",
    lora=None,
    cpu: bool = False,
    teacher_bytes: int = 4,
    chunk: int = 0,
    top_k: int = 64,
) -> float:
    """Peak bytes of one micro-batch's forward and backward (activations and the loss).

    Without checkpointing every layer's saved tensors (``layer_activation_bytes``) are alive when the
    loss runs, with the model-level ones: the final norm's (as a layer's norm), the rotary cos/sin
    (2 e d per token), eager's causal mask (b s^2 e), and the loss's peak (``loss_bytes``). With
    activation checkpointing (HF, non-reentrant) each layer keeps only its input (e h); the peak is
    the larger of the loss phase and one layer recomputed in the backward with its gradients (2x).
    """
    e = compute_bytes(precision)
    attn = attn or ("sdpa" if flash else "eager")
    h, L = config.hidden_size, config.num_hidden_layers
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    tokens = micro_batch * seq
    full = lora is None or not lora.enabled
    layer = layer_activation_bytes(config, tokens, precision, attn=attn, micro_batch=micro_batch, lora=lora, cpu=cpu)
    head = tokens * (4 * h + 4 + (2 * e * h if full else 0) + 2 * e * d)
    head += micro_batch * seq * seq * e if attn == "eager" else 0
    head += loss_bytes(
        tokens, config.vocab_size, precision, loss, teacher_bytes=teacher_bytes, chunk=chunk, top_k=top_k
    )
    if checkpointing:
        return L * tokens * h * e + max(head, 2 * layer)
    return L * layer + head


def kv_cache_bytes(config, batch: int, seq: int, precision: str = "bf16") -> float:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * seq * batch * (4 if precision == "fp32" else 2)


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
    memory: dict[str, float] = field(default_factory=dict)  # resident per-GPU bytes by component
    # Alternative peaks that never overlap (forward/backward vs optimizer step): only the largest counts.
    phases: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # printed after a component's value
    device_bytes: float = 0.0
    params: int = 0
    trainable: int = 0
    disk_bytes: float = 0.0  # what the run writes: kept checkpoints with optimizer state, plus the export
    suggestions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values()) + max(self.phases.values(), default=0.0)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_bytes

    def verdict(self) -> str:
        spare = (self.device_bytes - self.total_bytes) / GiB
        if self.fits:
            return f"fits with {spare:.1f} GiB spare"
        return f"does NOT fit: needs {self.total_bytes / GiB:.1f} GiB of {self.device_bytes / GiB:.0f} GiB" + (
            f"; try {' or '.join(self.suggestions)}" if self.suggestions else ""
        )

    def table(self) -> str:
        lines = [f"minima plan: {self.stage}", ""]
        w = max(len(k) for k, _ in self.rows) if self.rows else 10
        lines += [f"  {k:<{w}}  {v}" for k, v in self.rows]
        if self.memory or self.phases:
            mw = max(len(k) for k in [*self.memory, *self.phases, "total"])
            lines += ["", "  memory per GPU:"]
            for k, v in self.memory.items():
                lines.append(f"    {k:<{mw}} {v / GiB:9.2f} GiB" + (f"  {self.notes[k]}" if k in self.notes else ""))
            top = max(self.phases.values(), default=0.0)
            for k, v in self.phases.items():
                tag = "<- peak phase" if v == top else "(never at the same time)"
                lines.append(
                    f"    {k:<{mw}} {v / GiB:9.2f} GiB  {tag}" + (f"; {self.notes[k]}" if k in self.notes else "")
                )
            total = f"{self.total_bytes / GiB:9.2f} GiB  of {self.device_bytes / GiB:.0f} GiB"
            lines.append(f"    {'total':<{mw}} {total} -> {self.verdict()}")
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
    from minima.core import presets

    t, s, v = PRESET_SHAPES.get(preset or "tiny", PRESET_SHAPES["tiny"])
    return llama_config(getattr(presets, t), v), llama_config(getattr(presets, s), v)


def plan_stage(cfg, opts: PlanOptions, preset: Optional[str] = None, shapes: Optional[tuple] = None) -> Plan:
    """Build the plan for a resolved stage config (``shapes``: (teacher, student) model configs used where the
    config names no model dir, instead of the preset's)."""
    teacher_fallback, student_fallback = shapes or _shapes(preset)
    dev_tflops, dev_gib = DEVICES.get(opts.device, (None, None)) if opts.device in DEVICES else (None, None)
    if dev_tflops is None:
        raise ConfigError(f"unknown device '{opts.device}'", fix=f"plan.device= one of {', '.join(DEVICES)}")
    plan = Plan(stage=cfg.stage, device_bytes=(opts.memory_gib or dev_gib) * GiB)
    stage = cfg.stage
    if stage in ("adapt", "distill", "sft", "dpo"):
        if stage == "adapt":  # the big model, continued-pretrained
            config = load_config(cfg.model, teacher_fallback)
        elif stage == "distill":
            config = load_config(cfg.student or cfg.model, student_fallback)
        else:
            config = load_config(cfg.model, student_fallback)
        _train_memory(plan, cfg, config, opts, teacher_fallback)
    elif stage == "prune":
        config = load_config(cfg.teacher, teacher_fallback)
        n = count_params(config)
        plan.params = plan.trainable = n
        plan.memory["teacher weights"] = n * (4 if cfg.dtype == "fp32" else 2)
        act = activation_bytes(config, cfg.batch_size, cfg.max_length, cfg.dtype, checkpointing=False)
        plan.memory[
            "calibration activations"
            + (" (gradient importance)" if cfg.importance == "gradient" else " (one layer at a time)")
        ] = (
            act
            if cfg.importance == "gradient"
            else act / config.num_hidden_layers + cfg.batch_size * cfg.max_length * config.vocab_size * 4
        )
        if cfg.importance == "gradient":
            plan.memory["gradients"] = n * (4 if cfg.dtype == "fp32" else 2)
        plan.rows += [("teacher params", _fmt_n(n)), ("calibration tokens", _fmt_n(cfg.num_samples * cfg.max_length))]
        if getattr(cfg, "target_params", None):  # shape search: one candidate retrained at a time (fp32 + AdamW)
            biggest = cfg.target_params * (1 + cfg.search.tolerance)
            if cfg.search.retrain_steps:
                plan.memory["search: retrained candidate (fp32 weights, grads, AdamW)"] = biggest * 16
            plan.rows += [
                ("search budget", f"{_fmt_n(cfg.target_params)} +- {cfg.search.tolerance:.0%}"),
                ("search retraining", f"top {cfg.search.top_k} x {cfg.search.retrain_steps} steps"),
            ]
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
        plan.rows += [
            ("corpus tokens", _fmt_n(tokens)),
            ("bytes per token", f"{opts.bytes_per_token:.2f}"),
            ("shard size on disk", f"{tokens * opts.bytes_per_token / GiB:.2f} GiB"),
        ]
        plan.device_bytes = float("inf")
    elif stage == "vocab":
        plan.rows += [("work", "SentencePiece merge + embedding resize; CPU only")]
        plan.device_bytes = float("inf")
    return plan


def _ds_zero_options(cfg) -> dict:
    """The ``zero_optimization`` block of the stage's DeepSpeed config (defaults when unreadable)."""
    try:
        from minima.train.ds_config import load_ds_config

        return dict(load_ds_config(cfg.ds_config).get("zero_optimization", {}))
    except Exception:
        return {}


def zero3_gathered_bytes(
    config, n_params: int, e: int, world: int, zopt: dict, lora=None, checkpointing: bool = False
) -> float:
    """Full (gathered) parameter copies ZeRO-3 holds during the forward and backward.

    With ``stage3_max_reuse_distance`` at its default (1e9), a parameter used again within that many
    elements stays gathered from its forward to its backward, so up to ``stage3_max_live_parameters``
    (1e9) elements are gathered at once (measured on 2 CPU ranks: the whole model). On one rank the
    gather of trainable weights costs nothing, but the frozen base weights of LoRA that autograd saves
    for the backward are copies: one decoder layer's Linear weights per layer whose activations are alive.
    """
    if world > 1:
        return e * min(n_params, float(zopt.get("stage3_max_live_parameters", MAX_LIVE_PARAMETERS)))
    if lora is None or not lora.enabled:
        return 0.0
    h, f = config.hidden_size, config.intermediate_size
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * (
        h // config.num_attention_heads
    )
    layer = h * (2 * h + 2 * kv) + 3 * h * f
    return e * layer * (1 if checkpointing else config.num_hidden_layers)


def _train_memory(plan: Plan, cfg, config, opts: PlanOptions, teacher_fallback) -> None:
    """Rows, per-rank memory (resident + peak phases) and suggestions of a training stage."""
    stage, world = cfg.stage, opts.gpus
    cpu = opts.device == "cpu"
    dev_tflops = DEVICES[opts.device][0]
    n = count_params(config)
    lora = cfg.lora if stage in ("sft", "dpo") and cfg.lora.enabled else None
    trainable = lora_trainable(config, lora) if lora else n
    if stage == "dpo":  # chosen and rejected rows of a pair go through one forward
        seq = _records_max_length(cfg.records) or cfg.max_length
        cfg = cfg.model_copy(update={"micro_batch_size": 2 * cfg.micro_batch_size})
    elif stage == "sft":
        seq = cfg.max_length
    else:
        seq = _records_max_length(cfg.records) or config.max_position_embeddings
    seq = opts.seq or seq
    zero = cfg.zero_stage if cfg.zero_stage is not None else int(_ds_zero_options(cfg).get("stage", 3))
    e = compute_bytes(cfg.precision)
    gas = cfg.gradient_accumulation_steps
    where = f"ZeRO-{zero}, {world} rank{'s' if world > 1 else ''}"

    # resident: model states (frozen LoRA base weights are not in ZeRO-1/2's flat buffers: replicated)
    states = model_state_bytes(trainable, trainable, cfg.precision, zero, world, gas)
    frozen = n - trainable
    plan.memory[f"weights ({where})"] = states["weights"] + frozen * e / (world if zero >= 3 else 1)
    if states["gradients"]:
        plan.memory[f"gradients ({where})"] = states["gradients"]
    plan.memory[f"fp32 master + Adam m, v ({where})"] = states["optimizer"]
    zopt = _ds_zero_options(cfg)
    bucket = zopt.get("reduce_bucket_size", "auto")
    bucket = config.hidden_size**2 if bucket == "auto" else float(bucket)
    if zero >= 2:  # contiguous_gradients staging; double-buffered with overlap_comm under ZeRO-2
        plan.memory["gradient buckets (reduce_bucket_size)"] = (
            bucket * e * (2 if zero == 2 and zopt.get("overlap_comm", True) else 1)
        )

    # distill: the teacher, or nothing resident when training from the logit cache
    loss, teacher_b = "ce", 4
    if stage == "distill":
        tconf = load_config(cfg.teacher, teacher_fallback)
        nt = count_params(tconf)
        plan.rows.append(("teacher params", _fmt_n(nt)))
        online = cfg.loss.alpha < 1.0 and not cfg.cache_logits
        cached = cfg.loss.alpha < 1.0 and cfg.cache_logits
        teacher_b = 4 if cpu else 2  # load_teacher: bf16 on GPU, fp32 on CPU (whatever the precision)
        if online:
            label = (
                "teacher weights ("
                + ("fp32" if cpu else "bf16")
                + (", ZeRO-3)" if cfg.teacher_zero3 else ", replicated)")
            )
            plan.memory[label] = nt * teacher_b / (world if cfg.teacher_zero3 else 1)
            if cfg.teacher_zero3 and world > 1:  # ZeRO-3 inference keeps gathered layers up to max_live
                plan.memory["teacher gathered parameters"] = teacher_b * min(
                    nt, float(zopt.get("stage3_max_live_parameters", MAX_LIVE_PARAMETERS))
                )
            loss = "kd"
        elif cached:
            loss = "kd_cached"
        fpt_teacher = flops_per_token(tconf, non_embedding_params(tconf), seq, backward=False)
    ref_logits = _dpo_reference(plan, cfg, config, n, world, cpu, seq, zopt) if stage == "dpo" else 0.0
    plan.memory[
        "runtime (" + ("process heap, code, comm buffers; measured)" if cpu else "CUDA context, cuBLAS/NCCL; typical)")
    ] = RUNTIME_BYTES["cpu" if cpu else "gpu"]

    # the two phases that never overlap
    attn = attn_implementation(config)
    # distill's KD/CE chunk: the config's vocab_chunk, else DistillRecipe.vocab_chunk's default
    chunk = getattr(cfg, "vocab_chunk", 0) or (1024 if cpu else 8192)
    act_kw = dict(
        attn=attn,
        loss=loss,
        lora=lora,
        cpu=cpu,
        teacher_bytes=teacher_b,
        chunk=chunk,
        top_k=getattr(cfg, "cache_top_k", 64),
    )
    act = activation_bytes(config, cfg.micro_batch_size, seq, cfg.precision, cfg.activation_checkpointing, **act_kw)
    gathered = zero3_gathered_bytes(config, n, e, world, zopt, lora, cfg.activation_checkpointing) if zero >= 3 else 0.0
    ckpt_tag = ", ckpt" if cfg.activation_checkpointing else ""
    fb_label = f"fwd/bwd: activations + loss (mb {cfg.micro_batch_size} x {seq}{ckpt_tag})"
    if gathered:
        fb_label = fb_label.replace("loss", "loss + gathered params")
        plan.notes[fb_label] = f"incl. {gathered / GiB:.2f} GiB gathered ZeRO-3 params"
    plan.phases[fb_label] = act + gathered + ref_logits
    if ref_logits:
        note = f"{ref_logits / GiB:.2f} GiB reference logits"
        plan.notes[fb_label] = f"{plan.notes[fb_label]} and {note}" if fb_label in plan.notes else f"incl. {note}"
    plan.phases[f"optimizer step temporaries ({where})"] = step_transient_bytes(
        trainable, cfg.precision, zero, world, cpu, gas
    )

    fpt = flops_per_token(config, non_embedding_params(config), seq) + (fpt_teacher if stage == "distill" else 0)
    if stage == "dpo" and not (cfg.reference_free() or cfg.precompute_ref):  # the reference's forward
        fpt += flops_per_token(config, non_embedding_params(config), seq, backward=False)
    plan.params, plan.trainable = n, trainable
    plan.rows += [
        ("params", f"{_fmt_n(n)} ({n:,})"),
        ("trainable", f"{_fmt_n(trainable)} ({trainable:,})"),
        (
            "layers / hidden / heads / ffn",
            f"{config.num_hidden_layers} / {config.hidden_size} / "
            f"{config.num_attention_heads} / {config.intermediate_size}",
        ),
        ("precision, ZeRO, world", f"{cfg.precision}, ZeRO-{zero}, {world} x {opts.device}"),
        ("attention kernel", attn),
    ]
    gbs = cfg.micro_batch_size * gas * world
    tokens = opts.tokens or (cfg.max_steps * gbs * seq if cfg.max_steps > 0 else None)
    mfu = opts.mfu or measured_mfu(opts.device) or DEFAULT_MFU
    plan.rows.append(("FLOPs per token", f"{fpt:.3e}"))
    if tokens:
        seconds = tokens * fpt / (dev_tflops * 1e12 * mfu * world)
        plan.rows.append(
            (f"time for {_fmt_n(tokens)} tokens", f"{_fmt_time(seconds)} at {mfu:.0%} MFU on {world} x {opts.device}")
        )
    if (
        loss == "kd_cached"
    ):  # minima.stages.distill's cache: int32 ids + fp16/fp32 values (+ rest or weights) per position
        vb = 2 if cfg.cache_dtype == "fp16" else 4
        per_pos = cfg.cache_top_k * (4 + vb) + (4 if cfg.cache_mode == "top_k" else cfg.cache_top_k * vb)
        plan.rows.append(
            (
                "logit cache on disk",
                f"{per_pos} B per token"
                + (f", {tokens * per_pos / GiB:.0f} GiB for {_fmt_n(tokens)} tokens" if tokens else ""),
            )
        )
    ck = n * e
    plan.rows.append(
        ("checkpoint (weights / +optimizer)", f"{ck / GiB:.2f} GiB / {(ck + trainable * 12) / GiB:.2f} GiB")
    )
    plan.disk_bytes = (ck + trainable * 12) * (getattr(cfg, "keep_last", 1) + 1) + ck
    plan.rows.append(("disk for the run", f"{plan.disk_bytes / GiB:.2f} GiB (keep_last + 1 checkpoints, the export)"))

    # alternatives for the verdict
    if zero < 3 and world > 1:  # partitioning the remaining model states always helps
        plan.suggestions.append("zero_stage=3")
    if not cfg.activation_checkpointing:
        plan.suggestions.append("activation_checkpointing=true")
    for mb in (cfg.micro_batch_size // 2, cfg.micro_batch_size // 4, 1):
        if 1 <= mb < cfg.micro_batch_size:
            a2 = activation_bytes(config, mb, seq, cfg.precision, cfg.activation_checkpointing, **act_kw) + gathered
            others = [v for k, v in plan.phases.items() if k != fb_label]
            if sum(plan.memory.values()) + max([a2, *others]) <= plan.device_bytes:
                plan.suggestions.append(f"micro_batch_size<={mb}")
                break


def _dpo_reference(plan: Plan, cfg, config, n: int, world: int, cpu: bool, seq: int, zopt: dict) -> float:
    """dpo's reference model: its weights (a frozen copy), or nothing; returns its logits' bytes in the forward.

    The frozen copy is loaded like distill's teacher (bf16 on GPU, fp32 on CPU), replicated or ZeRO-3
    sharded (``ref_zero3``). With ``precompute_ref`` (or LoRA, whose reference is the base with the
    adapters off) training holds no second model; the table shows both so the choice is visible.
    """
    ref_b = 4 if cpu else 2
    copy = n * ref_b / (world if cfg.ref_zero3 else 1)
    if cfg.ref_zero3 and world > 1:
        copy += ref_b * min(n, float(zopt.get("stage3_max_live_parameters", MAX_LIVE_PARAMETERS)))
    rows = cfg.micro_batch_size * seq  # cfg here already counts both rows of each pair
    logits = rows * config.vocab_size * ref_b
    if cfg.reference_free():
        plan.rows.append(("reference model", f"none ({cfg.loss.type} is reference-free)"))
        return 0.0
    plan.rows.append(
        (
            "reference model",
            f"frozen copy {copy / GiB:.2f} GiB per GPU (+{logits / GiB:.2f} GiB logits in the forward); "
            f"precompute_ref=true: 0 GiB (one pass over the records first); LoRA: 0 GiB (adapters disabled)",
        )
    )
    if cfg.precompute_ref:
        return 0.0
    if cfg.lora.enabled:  # the policy's own forward with adapters off: its logits, no weights
        return logits
    label = "reference weights (" + ("fp32" if cpu else "bf16") + (", ZeRO-3)" if cfg.ref_zero3 else ", replicated)")
    plan.memory[label] = copy
    plan.notes[label] = "(0 with precompute_ref=true)"
    return logits


def _records_max_length(records: Optional[str]) -> Optional[int]:
    if records and (Path(records) / "manifest.json").is_file():
        m = json.loads((Path(records) / "manifest.json").read_text())
        return (m.get("metrics") or {}).get("max_length") or (m.get("config") or {}).get("max_length")
    return None


def check_fits(cfg, opts: Optional[PlanOptions] = None, force: bool = False) -> Plan:
    """The engine's pre-launch check: raise PlanError with the table unless it fits (or force).

    ``opts`` defaults to the hardware the job runs on (:meth:`PlanOptions.for_job`)."""
    plan = plan_stage(cfg, opts or PlanOptions.for_job(cfg))
    if not plan.fits and not force:
        raise PlanError(
            f"the plan says {cfg.stage} will not fit:\n{plan.table()}", fix="follow the suggestions, or pass --force"
        )
    return plan


def pruned_config(config, prune_cfg):
    """The model config ``prune_cfg``'s explicit shape makes of ``config`` (unchanged where it names none)."""
    import copy

    out = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = len(prune_cfg.keep_layers) if prune_cfg.keep_layers else prune_cfg.num_layers
    for attr, value in (
        ("num_hidden_layers", layers),
        ("num_attention_heads", prune_cfg.num_heads),
        ("num_key_value_heads", prune_cfg.num_key_value_heads),
        ("intermediate_size", prune_cfg.intermediate_size),
        ("hidden_size", prune_cfg.hidden_size),
    ):
        if value:
            setattr(out, attr, value)
    out.head_dim = head_dim
    return out


def plan_schedule(pipeline, opts: PlanOptions, preset: Optional[str] = None) -> list[tuple[str, Plan]]:
    """One plan per prune and distill step of the pipeline's compression rounds, in order.

    Each round prunes the previous round's student, whose shape is the round's explicit prune shape applied
    to the model it prunes (a round given only ``target_params`` keeps that model's shape here: the search
    picks the shape at run time). A round's distill is sized for its ``tokens``.
    """
    from minima.core.registry import pipeline_steps, round_config

    teacher, _ = _shapes(preset)
    original = source = teacher
    student = teacher
    previous = pipeline.compress.teacher == "previous"
    out = []
    for step in pipeline_steps(pipeline):
        if step.stage not in ("prune", "distill"):
            continue
        cfg = round_config(pipeline, step)
        title = f"round {step.round or 1}/{max(len(pipeline.compress.rounds), 1)}: {step.key}"
        if step.stage == "prune":
            student = pruned_config(source, cfg)
            plan = plan_stage(cfg, opts, preset, shapes=(source, student))
            plan.rows.insert(0, ("pruned params", _fmt_n(count_params(student))))
        else:
            rnd = pipeline.compress.rounds[step.round - 1] if step.round else None
            o = dataclasses.replace(opts, tokens=rnd.tokens if rnd and rnd.tokens else opts.tokens)
            plan = plan_stage(cfg, o, preset, shapes=(source if previous else original, student))
            source = student
        plan.stage = title
        out.append((step.key, plan))
    return out


def main(argv: list[str]) -> int:
    from minima.core.config import STAGES, key_values
    from minima.core.registry import stage_config

    p = argparse.ArgumentParser(
        prog="minima plan", description="Memory/time sizing of a stage (or the pipeline) without loading weights."
    )
    p.add_argument("stage", help=f"one of {', '.join(STAGES)} or 'pipeline'")
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="stage overrides, plus plan.device=h100 plan.gpus=16 plan.tokens=126e9 plan.mfu=0.4",
    )
    a = p.parse_intermixed_args(argv)
    given: dict = {}
    stage_over = [o for o in a.overrides if not o.startswith("plan.")]
    plan_args = key_values(
        [o for o in a.overrides if o.startswith("plan.")], [f"plan.{k}" for k in PlanOptions.__dataclass_fields__]
    )
    for key, v in plan_args.items():
        k = key.removeprefix("plan.")
        typ = type(getattr(PlanOptions(), k)) if getattr(PlanOptions(), k) is not None else float
        given[k] = v if typ is str else typ(float(v)) if typ is int else float(v)
    stages = ["adapt", "prune", "distill", "sft", "evaluate"] if a.stage == "pipeline" else [a.stage]
    if a.stage == "pipeline":
        from minima.core.config import PipelineConfig, build
        from minima.core.presets import get_preset

        base = get_preset(a.preset).model_dump(mode="json") if a.preset else None
        try:
            pipe = build(PipelineConfig, base=base, file=a.config, overrides=stage_over)
        except ConfigError:  # not a pipeline config (e.g. one stage's file): plan the stages as before
            pipe = None
        if pipe is not None and pipe.compress.rounds:  # the whole compression schedule, round by round
            opts = PlanOptions()
            for k, v in given.items():
                setattr(opts, k, v)
            for _, plan in plan_schedule(pipe, opts, a.preset):
                print(plan.table())
                print()
            return 0
    for s in stages:
        cfg = stage_config(s, a.preset, a.config, stage_over if a.stage != "pipeline" else [])
        launch = getattr(cfg, "launch", None)
        # A job for Slurm or ssh is planned for its nodes (launch.gpu x gpus_per_node x nnodes); plan.* wins.
        opts = PlanOptions.remote(cfg) if launch is not None and launch.launcher != "local" else PlanOptions()
        for k, v in given.items():
            setattr(opts, k, v)
        print(plan_stage(cfg, opts, a.preset).table())
        print()
    return 0
