"""Structured pruning of a decoder-only teacher to a smaller uniform shape (e.g. 7B -> MiniMA-3B).

Families: LLaMA (2 and 3, rope scaling kept), Mistral, Qwen2/Qwen2.5 (q/k/v biases sliced with their
rows) and Qwen3 (per-head q/k RMSNorms copied unchanged, head_dim independent of hidden/heads). The
pruned model is the teacher family's plain ``*ForCausalLM``: whole layers, whole KV groups (with their query
heads), MLP neurons and hidden channels are removed by slicing the teacher's weights; head_dim is
kept, and tied embeddings stay tied. Which units survive is decided by an importance score
(``minima.compress.importance``) computed in one streaming pass over calibration records.

What is exact (tests/test_prune.py checks each):

- Layers, heads and neurons: the student's logits equal the teacher's with the same layers skipped
  (identity) and the same heads / neurons zeroed by hooks, up to float summation order.
- Hidden channels: compare with the *masked teacher*, whose residual stream is zeroed on the
  pruned channels (embedding, ``o_proj`` and ``down_proj`` outputs). Every linear map then matches
  exactly; only RMSNorm differs: the teacher divides by sqrt(sum_kept(x^2)/D + eps), the student by
  sqrt(sum_kept(x^2)/D' + eps). So the student equals a masked teacher whose RMSNorms average over the
  kept channels. With ``rescale_norms=True`` the student's norm weights are multiplied by
  sqrt(D/D') and ``rms_norm_eps`` by D/D', which makes it equal to the plain masked teacher.
  Neither equals the unmasked teacher: the pruned channels' contributions are gone.

Usage: ``minima prune --preset tiny teacher=DIR records=DIR`` or, in-process,
``prune_model(teacher, batches, {"hidden_size": 96, ...})``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from minima.compress.importance import Importance, calibrate
from minima.core.config import PruneConfig
from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger
from minima.models.counts import count_params

log = get_logger("prune")
DIMS = ("num_layers", "num_heads", "num_key_value_heads", "intermediate_size", "hidden_size")
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# model_type -> the family's plain causal-LM class; every one has the LLaMA module layout
# (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, two RMSNorms per layer, model.norm)
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def check_family(config, where: str = "teacher") -> str:
    """The teacher's model_type, when prune supports it.

    Raises:
        InputError: any other family, with the list of supported ones.
    """
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise InputError(
            f"the teacher is a {mt!r} model; prune handles {', '.join(sorted(FAMILIES))}",
            where=where,
            fix=f"use a teacher of one of these families ({', '.join(FAMILIES[k] for k in sorted(FAMILIES))})",
        )
    return mt


def coupled_heads(config) -> bool:
    """True when the teacher's head_dim is hidden_size / num_heads (so the student keeps that rule)."""
    return head_dim(config) * config.num_attention_heads == config.hidden_size


# ------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """The dimensions pruning changes (vocab and head_dim never change)."""

    num_layers: int
    num_heads: int
    num_key_value_heads: int
    intermediate_size: int
    hidden_size: int

    @classmethod
    def of(cls, config) -> Shape:
        return cls(
            config.num_hidden_layers,
            config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            config.intermediate_size,
            config.hidden_size,
        )

    def describe(self) -> str:
        return (
            f"layers {self.num_layers}, heads {self.num_heads} (kv {self.num_key_value_heads}), "
            f"hidden {self.hidden_size}, ffn {self.intermediate_size}"
        )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def resolve_target(
    teacher_config,
    target: Union[Shape, Mapping[str, Any], PruneConfig, None] = None,
    keep_layers: Optional[list[int]] = None,
    where: str = "PruneConfig",
) -> Shape:
    """The target shape, with unset dims taken from the teacher; every rule checked, with arithmetic.

    Raises:
        ConfigError: a dim larger than the teacher's, hidden_size not divisible by num_heads, heads that
            would split a teacher's KV group, or a bad ``keep_layers``.
    """
    t = Shape.of(teacher_config)
    if isinstance(target, PruneConfig):
        keep_layers = target.keep_layers if keep_layers is None else keep_layers
        want = {k: getattr(target, k) for k in DIMS}
    elif isinstance(target, Shape):
        want = asdict(target)
    else:
        want = dict(target or {})
        unknown = set(want) - set(DIMS)
        if unknown:
            raise ConfigError(f"unknown target dims {sorted(unknown)}", where=where, fix=f"use {', '.join(DIMS)}")
    if want.get("num_layers") is None and keep_layers is not None:
        want["num_layers"] = len(keep_layers)
    G = t.num_heads // t.num_key_value_heads
    heads = want.get("num_heads") or t.num_heads
    if want.get("num_key_value_heads") is None:
        if heads % G:
            raise ConfigError(
                f"num_heads={heads} would split a KV group: the teacher's {t.num_heads} query heads share "
                f"{t.num_key_value_heads} KV heads in groups of {G}, and whole groups are kept "
                f"({heads} = {heads // G} x {G} + {heads % G})",
                where=f"{where}.num_heads",
                fix=f"use a multiple of {G}, e.g. {max(G, heads - heads % G)}",
            )
        want["num_key_value_heads"] = heads // G
    out = Shape(**{k: want.get(k) or getattr(t, k) for k in DIMS})
    for k in DIMS:
        if getattr(out, k) > getattr(t, k):
            raise ConfigError(
                f"{k}={getattr(out, k)} is larger than the teacher's {getattr(t, k)}: pruning only shrinks",
                where=f"{where}.{k}",
                fix=f"set {k} <= {getattr(t, k)}",
            )
    if out.num_heads != out.num_key_value_heads * G:
        raise ConfigError(
            f"num_heads={out.num_heads} != num_key_value_heads={out.num_key_value_heads} x the teacher's group size "
            f"{G} ({t.num_heads} heads / {t.num_key_value_heads} KV heads) = {out.num_key_value_heads * G}; "
            "whole KV groups are kept",
            where=f"{where}.num_heads",
            fix=f"set num_heads={out.num_key_value_heads * G} or num_key_value_heads={max(1, out.num_heads // G)}",
        )
    if coupled_heads(teacher_config) and out.hidden_size % out.num_heads:
        raise ConfigError(
            f"hidden_size={out.hidden_size} is not divisible by num_heads={out.num_heads} "
            f"({out.hidden_size} / {out.num_heads} = {out.hidden_size / out.num_heads:.2f})",
            where=f"{where}.hidden_size",
            fix=f"e.g. hidden_size={out.num_heads * head_dim(teacher_config)} (num_heads x head_dim)",
        )
    if keep_layers is not None:
        kl = list(keep_layers)
        bad = [i for i in kl if not 0 <= i < t.num_layers]
        if bad:
            raise ConfigError(
                f"keep_layers has indices {bad} outside the teacher's layers 0..{t.num_layers - 1}",
                where=f"{where}.keep_layers",
                fix="use 0-based layer indices of the teacher",
            )
        if kl != sorted(set(kl)):
            raise ConfigError(
                f"keep_layers={kl} must be strictly increasing (no repeats, no reordering)",
                where=f"{where}.keep_layers",
                fix=f"use {sorted(set(kl))}",
            )
        if len(kl) != out.num_layers:
            raise ConfigError(
                f"keep_layers has {len(kl)} entries but num_layers={out.num_layers}",
                where=f"{where}.keep_layers",
                fix="make them agree (or leave num_layers unset)",
            )
    return out


def student_config(teacher_config, shape: Shape, rescale_norms: bool = False, layers: Optional[list[int]] = None):
    """The teacher's config with the target dims (head_dim written explicitly, since it is kept).

    ``layers`` (the kept teacher layers) picks the per-layer attention types (sliding vs full) of
    those layers; without it the first ``num_layers`` entries are kept.
    """
    cfg = copy.deepcopy(teacher_config)
    hd = head_dim(teacher_config)
    cfg.num_hidden_layers = shape.num_layers
    cfg.num_attention_heads = shape.num_heads
    cfg.num_key_value_heads = shape.num_key_value_heads
    cfg.intermediate_size = shape.intermediate_size
    cfg.hidden_size = shape.hidden_size
    cfg.head_dim = hd
    if rescale_norms:
        cfg.rms_norm_eps = teacher_config.rms_norm_eps * teacher_config.hidden_size / shape.hidden_size
    if getattr(cfg, "layer_types", None) is not None:
        kept = list(layers) if layers is not None else list(range(shape.num_layers))
        cfg.layer_types = [teacher_config.layer_types[i] for i in kept]
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = min(cfg.max_window_layers, shape.num_layers)
    return cfg


def format_params(n: int) -> str:
    """3020442624 -> '3.02B', 733312 -> '733.3K'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------- plan
@dataclass
class PrunePlan:
    """Teacher indices of everything kept, ascending (per kept layer for heads and neurons)."""

    layers: list[int]
    kv_groups: list[list[int]]
    heads: list[list[int]]
    neurons: list[list[int]]
    hidden: list[int]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    if k >= scores.numel():
        return list(range(scores.numel()))
    # stable ordering on ties, so equal scores keep the lower index
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def choose_layers(
    imp: Importance,
    num_layers: int,
    teacher_layers: int,
    keep_layers: Optional[list[int]] = None,
    layer_importance: str = "block-influence",
) -> list[int]:
    """Kept teacher layers: explicit, else the highest block influence, else the first ``num_layers``."""
    if keep_layers is not None:
        return list(keep_layers)
    if num_layers >= teacher_layers:
        return list(range(teacher_layers))
    if layer_importance == "drop_last":
        return list(range(num_layers))
    if imp.block_influence is None:
        raise ValueError("block-influence layer selection needs calibration data")
    return _top(imp.block_influence, num_layers)


def make_plan(
    imp: Importance,
    teacher_config,
    shape: Shape,
    keep_layers: Optional[list[int]] = None,
    layer_importance: str = "block-influence",
) -> PrunePlan:
    """Pick what survives: top-k KV groups and neurons per kept layer, top-k hidden channels overall."""
    t = Shape.of(teacher_config)
    G = t.num_heads // t.num_key_value_heads
    layers = choose_layers(imp, shape.num_layers, t.num_layers, keep_layers, layer_importance)
    groups = imp.kv_groups(t.num_key_value_heads)
    kv = [_top(groups[i], shape.num_key_value_heads) for i in layers]
    heads = [[g * G + j for g in gs for j in range(G)] for gs in kv]
    neurons = [_top(imp.neurons[i], shape.intermediate_size) for i in layers]
    hidden = _top(imp.hidden(layers), shape.hidden_size)
    return PrunePlan(layers, kv, heads, neurons, hidden)


# ------------------------------------------------------------------------------------------ surgery
def _idx(ix: list[int], device) -> torch.Tensor:
    return torch.tensor(ix, dtype=torch.long, device=device)


def _rows(ix: list[int], width: int) -> list[int]:
    """Row indices of whole units (heads of ``width`` rows each)."""
    return [u * width + r for u in ix for r in range(width)]


@torch.no_grad()
def slice_state_dict(teacher, plan: PrunePlan, rescale_norms: bool = False) -> dict[str, torch.Tensor]:
    """The student's weights, sliced out of the teacher's (new tensors on the teacher's device)."""
    c = teacher.config
    hd = head_dim(c)
    dev = teacher.model.embed_tokens.weight.device
    hid = _idx(plan.hidden, dev)
    norm_scale = math.sqrt(c.hidden_size / len(plan.hidden)) if rescale_norms else 1.0

    def take(w: Optional[torch.Tensor], rows=None, cols=None) -> Optional[torch.Tensor]:
        if w is None:
            return None
        if rows is not None:
            w = w.index_select(0, rows)
        if cols is not None:
            w = w.index_select(1, cols)
        return w.contiguous() if rows is not None or cols is not None else w.clone()

    def norm(w: torch.Tensor) -> torch.Tensor:
        w = w.index_select(0, hid)
        return (w.float() * norm_scale).to(w.dtype) if rescale_norms else w.contiguous()

    sd: dict[str, torch.Tensor] = {}

    def put(name: str, lin: torch.nn.Linear, rows=None, cols=None):
        sd[f"{name}.weight"] = take(lin.weight, rows, cols)
        if lin.bias is not None:
            sd[f"{name}.bias"] = take(lin.bias, rows)

    sd["model.embed_tokens.weight"] = take(teacher.model.embed_tokens.weight, cols=hid)
    for j, i in enumerate(plan.layers):
        layer = teacher.model.layers[i]
        a, m, p = layer.self_attn, layer.mlp, f"model.layers.{j}"
        q_rows, kv_rows = _idx(_rows(plan.heads[j], hd), dev), _idx(_rows(plan.kv_groups[j], hd), dev)
        neu = _idx(plan.neurons[j], dev)
        sd[f"{p}.input_layernorm.weight"] = norm(layer.input_layernorm.weight)
        sd[f"{p}.post_attention_layernorm.weight"] = norm(layer.post_attention_layernorm.weight)
        put(f"{p}.self_attn.q_proj", a.q_proj, q_rows, hid)
        put(f"{p}.self_attn.k_proj", a.k_proj, kv_rows, hid)
        put(f"{p}.self_attn.v_proj", a.v_proj, kv_rows, hid)
        put(f"{p}.self_attn.o_proj", a.o_proj, hid, q_rows)
        for qk in ("q_norm", "k_norm"):  # Qwen3: RMSNorm over head_dim, shared by every head
            if getattr(a, qk, None) is not None:
                sd[f"{p}.self_attn.{qk}.weight"] = getattr(a, qk).weight.clone()
        put(f"{p}.mlp.gate_proj", m.gate_proj, neu, hid)
        put(f"{p}.mlp.up_proj", m.up_proj, neu, hid)
        put(f"{p}.mlp.down_proj", m.down_proj, hid, neu)
    sd["model.norm.weight"] = norm(teacher.model.norm.weight)
    if not c.tie_word_embeddings:
        put("lm_head", teacher.lm_head, cols=hid)
    return sd


def build_student(teacher, plan: PrunePlan, shape: Shape, rescale_norms: bool = False):
    """The teacher family's plain causal LM of ``shape`` holding the kept teacher weights (no random init)."""
    import transformers

    cls = getattr(transformers, FAMILIES[check_family(teacher.config)])
    cfg = student_config(teacher.config, shape, rescale_norms, plan.layers)
    sd = slice_state_dict(teacher, plan, rescale_norms)
    with torch.device("meta"):
        student = cls(cfg)
    missing, unexpected = student.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        student.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"student state dict mismatch: missing {missing}, unexpected {unexpected}")
    # non-persistent buffers (RoPE inv_freq) were created on meta: rebuild them where the weights are
    device = sd["model.embed_tokens.weight"].device
    rotary = type(student.model.rotary_emb)(config=cfg).to(device)
    student.model.rotary_emb = rotary
    left = [n for n, t in list(student.named_parameters()) + list(student.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


# ------------------------------------------------------------------------------------- in-process API
@dataclass
class PruneReport:
    """What ``prune_model`` did: scores, the plan, shapes and parameter counts."""

    importance: Importance
    plan: PrunePlan
    teacher_shape: Shape
    target_shape: Shape
    params_before: int
    params_after: int
    rescale_norms: bool = False
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        imp = self.importance
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": round(self.params_after / self.params_before, 4),
            "teacher_shape": asdict(self.teacher_shape),
            "target_shape": asdict(self.target_shape),
            "importance": imp.method,
            "kept_layers": self.plan.layers,
            "calibration_tokens": imp.tokens,
            "calibration_batches": imp.extra.get("batches", 0),
            "calibration_s": round(imp.seconds, 3),
            "calibration_tokens_per_s": round(imp.tokens / imp.seconds, 1) if imp.seconds > 0 else None,
            **self.extra,
        }

    def to_json(self) -> dict:
        """All scores and every kept index (importance.json)."""
        imp, plan = self.importance, self.plan
        r = lambda t: None if t is None else [float(f"{x:.6g}") for x in t.tolist()]
        rr = lambda t: None if t is None else [r(row) for row in t]
        return {
            "method": imp.method,
            "calibration_tokens": imp.tokens,
            "teacher_shape": asdict(self.teacher_shape),
            "target_shape": asdict(self.target_shape),
            "rescale_norms": self.rescale_norms,
            "layers": {"block_influence": r(imp.block_influence), "kept": plan.layers},
            "heads": {"scores": rr(imp.heads), "kv_groups_kept": plan.kv_groups, "kept": plan.heads},
            "neurons": {"scores": rr(imp.neurons), "kept": plan.neurons},
            "hidden": {
                "scores": r(imp.hidden(plan.layers)),
                "global": r(imp.hidden_global),
                "per_layer": rr(imp.hidden_layers),
                "kept": plan.hidden,
            },
        }


def prune_model(
    teacher_model,
    calib_batches: Optional[Iterable[Any]],
    target: Union[Shape, Mapping[str, Any], PruneConfig, None],
    importance: str = "activation",
    keep_layers: Optional[list[int]] = None,
    layer_importance: str = "block-influence",
    rescale_norms: bool = False,
    seed: int = 0,
    num_batches: Optional[int] = None,
):
    """Prune a loaded causal LM (llama, mistral, qwen2, qwen3) to ``target``; the teacher is left unchanged.

    Args:
        teacher_model: a ``LlamaForCausalLM`` (or Mistral/Qwen2/Qwen3) on any device/dtype.
        calib_batches: iterable of dicts with ``input_ids`` [B, T] (and ``attention_mask``), or id tensors;
            may be None when nothing needs data (magnitude/random importance and no block influence).
        target: dims to prune to (``num_layers``, ``num_heads``, ``num_key_value_heads``,
            ``intermediate_size``, ``hidden_size``); unset dims keep the teacher's.
        importance: activation | gradient | magnitude | random.
        keep_layers: explicit teacher layers to keep; else ``layer_importance`` decides.
        layer_importance: block-influence | drop_last.
        rescale_norms: make hidden-channel pruning equal to the masked teacher (see the module docstring).
        seed: seed of the random baseline.
        num_batches: number of calibration batches, for the progress bar's ETA.

    Returns:
        (student, PruneReport): the student on the teacher's device and dtype, in eval mode.
    """
    check_family(teacher_model.config)
    t = Shape.of(teacher_model.config)
    if isinstance(target, PruneConfig):
        keep_layers = target.keep_layers if keep_layers is None else keep_layers
    shape = resolve_target(teacher_model.config, target, keep_layers)
    if coupled_heads(teacher_model.config) and shape.hidden_size // shape.num_heads != head_dim(teacher_model.config):
        log.warning(
            "hidden_size/num_heads = %d/%d != head_dim %d: config.json sets head_dim explicitly "
            "(HF Llama honours it; some third-party converters assume hidden/heads)",
            shape.hidden_size,
            shape.num_heads,
            head_dim(teacher_model.config),
        )
    drops_layers = keep_layers is None and shape.num_layers < t.num_layers and layer_importance == "block-influence"
    needs_data = importance in ("activation", "gradient") or drops_layers
    if needs_data and calib_batches is None:
        raise ConfigError(
            f"importance={importance} / layer_importance={layer_importance} needs calibration data",
            where="PruneConfig.records",
            fix="pass calibration records, or use magnitude/random with keep_layers or drop_last",
        )
    imp = calibrate(
        teacher_model,
        calib_batches if needs_data else None,
        importance,
        block_influence=needs_data,
        total=num_batches,
        seed=seed,
    )
    plan = make_plan(imp, teacher_model.config, shape, keep_layers, layer_importance)
    student = build_student(teacher_model, plan, shape, rescale_norms)
    report = PruneReport(
        imp, plan, t, shape, count_params(teacher_model.config), count_params(student.config), rescale_norms
    )
    log.info(
        "pruned %s -> %s: %s -> %s params",
        t.describe(),
        shape.describe(),
        format_params(report.params_before),
        format_params(report.params_after),
    )
    return student, report


# -------------------------------------------------------------------------------------------- plot
def plot_importance(report: PruneReport, path: str | Path) -> Path:
    """One PNG: per teacher layer, kept vs pruned scores of layers, heads, neurons and hidden channels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    imp, plan = report.importance, report.plan
    L = imp.heads.shape[0]
    kept_layer = {i: j for j, i in enumerate(plan.layers)}
    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    kept_c, pruned_c = "tab:blue", "tab:red"

    ax = axes[0][0]
    vals = imp.block_influence if imp.block_influence is not None else torch.ones(L)
    ax.bar(range(L), vals.tolist(), color=[kept_c if i in kept_layer else pruned_c for i in range(L)])
    ax.set_title(
        "layers: block influence (blue kept, red dropped)" if imp.block_influence is not None else "layers kept (blue)"
    )
    ax.set_xlabel("teacher layer")

    ax = axes[0][1]
    for i in range(L):
        kept = set(plan.heads[kept_layer[i]]) if i in kept_layer else set()
        s = imp.heads[i].tolist()
        ax.scatter([i] * len(s), s, s=8, c=[kept_c if h in kept else pruned_c for h in range(len(s))])
    ax.set_title(f"heads ({imp.method})")
    ax.set_xlabel("teacher layer")

    ax = axes[1][0]
    stats = {"kept": ([], [], [], []), "pruned": ([], [], [], [])}
    for i in range(L):
        keep = torch.zeros(imp.neurons.shape[1], dtype=torch.bool)
        if i in kept_layer:
            keep[plan.neurons[kept_layer[i]]] = True
        for name, sel in (("kept", keep), ("pruned", ~keep)):
            if sel.any():
                v = imp.neurons[i][sel]
                xs, mean, lo, hi = stats[name]
                xs.append(i), mean.append(v.mean().item()), lo.append(v.min().item()), hi.append(v.max().item())
    for name, color in (("kept", kept_c), ("pruned", pruned_c)):
        xs, mean, lo, hi = stats[name]
        if xs:
            ax.plot(xs, mean, "o-", color=color, label=f"{name} mean")
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label=f"{name} min-max")
    ax.legend(fontsize=7)
    ax.set_title("MLP neurons")
    ax.set_xlabel("teacher layer")

    ax = axes[1][1]
    h = imp.hidden(plan.layers)
    order = torch.argsort(h, descending=True)
    keep = torch.zeros_like(h, dtype=torch.bool)
    keep[plan.hidden] = True
    ax.scatter(range(len(h)), h[order].tolist(), s=2, c=[kept_c if k else pruned_c for k in keep[order].tolist()])
    ax.set_title(f"hidden channels, sorted ({len(plan.hidden)}/{len(h)} kept)")
    ax.set_xlabel("rank")
    if L <= 40:
        for ax in (axes[0][0], axes[0][1], axes[1][0]):
            ax.set_xticks(range(L))
    fig.suptitle(f"prune: {report.teacher_shape.describe()} -> {report.target_shape.describe()}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------ calibration data


# ------------------------------------------------------------------------------------------- stage
