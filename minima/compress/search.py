"""Shape search under a parameter budget (Minitron): enumerate, score after pruning, retrain the best, pick.

``minima prune teacher=DIR records=DIR target_params=3.0e9 search.top_k=3 search.retrain_steps=20``:

1. **Enumerate** every shape within ``target_params * (1 +- tolerance)``: kept layers (chosen by block
   influence), KV groups (with their query heads), hidden size and FFN width, hidden and FFN at a
   multiple of ``search.multiple`` (halved until the teacher's size has at least 8 steps of it, so a
   tiny teacher searches at a finer grain). No dim goes below ``min_ratio`` of the teacher's. For each
   (layers, KV groups, hidden) the FFN width closest to the budget is taken, so the list is short.
2. **Score** each candidate by its calibration loss (next-token CE on held-out calibration sequences)
   right after pruning. Importance is computed once; each candidate is only a slice of the teacher.
3. **Retrain** the ``top_k`` best for ``retrain_steps`` short distillation steps (the distill
   objective: ``alpha * CE + (1 - alpha) * T^2 * KD`` against the teacher's logits), then score again
   and pick the best after retraining: right after pruning the ranking misleads (Minitron).

Parameter counts are exact (each listed candidate is counted on the meta device).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from minima.compress.importance import Importance, as_batch, calibrate
from minima.compress.prune import (
    PrunePlan,
    PruneReport,
    Shape,
    build_student,
    check_family,
    coupled_heads,
    format_params,
    head_dim,
    log,
    make_plan,
    student_config,
)
from minima.core.config import PruneSearchConfig
from minima.core.errors import ConfigError
from minima.models.counts import count_params

MIN_STEPS = 8  # a searched size has at least this many steps of the multiple below the teacher's


def adapt_multiple(size: int, multiple: int, min_steps: int = MIN_STEPS) -> int:
    """The largest of multiple, multiple/2, ... that divides ``size`` into at least ``min_steps`` steps."""
    m = max(1, multiple)
    while m > 1 and (size % m or size // m < min_steps):
        m //= 2
    return m


def approx_params(config, shape: Shape) -> int:
    """Parameter count of a student of ``shape`` (weights, q/k/v biases, norms; exact for the four families)."""
    V, D, N, L = config.vocab_size, shape.hidden_size, shape.intermediate_size, shape.num_layers
    H, K, hd = shape.num_heads, shape.num_key_value_heads, head_dim(config)
    mt = config.model_type
    attn_bias = mt == "qwen2" or bool(getattr(config, "attention_bias", False))
    per_layer = 2 * D * H * hd + 2 * D * K * hd + 3 * D * N + 2 * D
    if attn_bias:
        per_layer += H * hd + 2 * K * hd + (D if mt != "qwen2" else 0)
    if getattr(config, "mlp_bias", False):
        per_layer += 2 * N + D
    if mt == "qwen3":
        per_layer += 2 * hd
    emb = V * D * (1 if config.tie_word_embeddings else 2)
    return emb + D + L * per_layer


@dataclass
class Candidate:
    """One searched shape and its losses (None where not computed)."""

    shape: Shape
    params: int
    loss_pruned: Optional[float] = None
    loss_retrained: Optional[float] = None
    retrain_s: Optional[float] = None
    rank_pruned: Optional[int] = None
    chosen: bool = False

    def row(self) -> dict:
        return {
            **asdict(self.shape),
            "params": self.params,
            "loss_pruned": self.loss_pruned,
            "loss_retrained": self.loss_retrained,
            "retrain_s": self.retrain_s,
            "rank_pruned": self.rank_pruned,
            "chosen": self.chosen,
        }


def candidate_shapes(config, target_params: float, search: PruneSearchConfig) -> list[Candidate]:
    """Every shape within the budget's tolerance (at most ``max_candidates``, spread evenly), exact counts.

    Raises:
        ConfigError: no shape fits (the budget is above the teacher or below ``min_ratio`` of every dim).
    """
    check_family(config, where="PruneConfig.teacher")
    t = Shape.of(config)
    G = t.num_heads // t.num_key_value_heads
    lo, hi = target_params * (1 - search.tolerance), target_params * (1 + search.tolerance)
    m_d = adapt_multiple(t.hidden_size, search.multiple)
    m_n = adapt_multiple(t.intermediate_size, search.multiple)
    floor = lambda n: max(1, math.ceil(n * search.min_ratio))
    hiddens = [d for d in range(m_d, t.hidden_size + 1, m_d) if d >= floor(t.hidden_size)]
    ffns = [n for n in range(m_n, t.intermediate_size + 1, m_n) if n >= floor(t.intermediate_size)]
    found: list[tuple[int, Shape]] = []
    for layers in range(floor(t.num_layers), t.num_layers + 1):
        for kv in range(floor(t.num_key_value_heads), t.num_key_value_heads + 1):
            heads = kv * G
            for d in hiddens:
                if coupled_heads(config) and d % heads:
                    continue
                best = None
                for n in ffns:
                    s = Shape(layers, heads, kv, n, d)
                    p = approx_params(config, s)
                    if lo <= p <= hi and (best is None or abs(p - target_params) < abs(best[0] - target_params)):
                        best = (p, s)
                if best is not None:
                    found.append(best)
    if not found:
        teacher_n = approx_params(config, t)
        raise ConfigError(
            f"no shape within {search.tolerance:.1%} of target_params={target_params:.4g} "
            f"(teacher {format_params(teacher_n)}, hidden step {m_d}, FFN step {m_n}, "
            f"no dim below {search.min_ratio:.0%} of the teacher's)",
            where="PruneConfig.target_params",
            fix="raise search.tolerance, lower search.min_ratio or search.multiple, or pick a budget "
            f"between {search.min_ratio**2:.0%} and 100% of the teacher",
        )
    found.sort(key=lambda ps: (ps[1].num_layers, ps[1].num_key_value_heads, ps[1].hidden_size))
    if len(found) > search.max_candidates:
        step = (len(found) - 1) / max(1, search.max_candidates - 1)
        found = [found[round(i * step)] for i in range(search.max_candidates)]
    return [Candidate(s, count_params(student_config(config, s))) for _, s in found]


# ------------------------------------------------------------------------------------------ losses
def _labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)


@torch.no_grad()
def calibration_loss(model, batches: Sequence[Any]) -> float:
    """Token-weighted next-token cross entropy over ``batches`` (fp32 math)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in batches:
        ids, mask = as_batch(b, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        labels = _labels(ids, mask)
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total += float(ce)
        count += int((labels != -100).sum())
    return total / max(count, 1)


def _cached_targets(batch: dict, n: int, device) -> Any:
    from minima.train.objectives.kd import SparseTargets

    get = lambda k: batch[k].reshape(n, -1).to(device) if k in batch else None
    rest = batch["kd_rest"].reshape(-1).to(device) if "kd_rest" in batch else torch.zeros(n, device=device)
    return SparseTargets(
        batch["kd_mode"], get("kd_ids"), get("kd_values"), rest, get("kd_weights"), float(batch["kd_temperature"])
    )


def retrain(student, teacher, batches: Sequence[Any], search: PruneSearchConfig, seed: int = 0):
    """``retrain_steps`` AdamW steps of the distill objective (fp32 master copy), cycling over ``batches``.

    A batch holding cached teacher targets (``kd_ids``, ``kd_values``, ... as the logit cache's reader
    gives them, plus ``kd_mode`` and ``kd_temperature``) is trained against them, as distill does with
    ``cache_logits=true``; any other batch runs the teacher.
    """
    from minima.train.objectives.kd import dense_loss, sparse_loss

    if search.retrain_steps == 0 or not batches:
        return student
    dtype = next(student.parameters()).dtype
    student = student.float().train()
    device = next(student.parameters()).device
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=search.lr, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(search.retrain_steps):
        batch = batches[step % len(batches)]
        ids, mask = as_batch(batch, device)
        logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        labels = _labels(ids, mask).flatten()
        flat = logits.reshape(-1, logits.shape[-1])
        if isinstance(batch, dict) and "kd_ids" in batch and search.alpha < 1.0:
            # the cache's row t is the teacher's distribution after position t: drop the last position
            cut = {k: v[:, :-1] for k, v in batch.items() if k in ("kd_ids", "kd_values", "kd_rest", "kd_weights")}
            targets = _cached_targets({**batch, **cut}, flat.shape[0], device)
            ce, kd = sparse_loss(flat, labels, targets, search.kd, search.temperature)
        else:
            t_logits = None
            if search.alpha < 1.0:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                t_logits = t_logits.reshape(-1, t_logits.shape[-1]).to(logits.dtype)
            ce, kd = dense_loss(flat, labels, t_logits, search.kd, search.temperature)
        n = (labels != -100).sum().clamp_min(1)
        loss = (search.alpha * ce.sum() + (1.0 - search.alpha) * kd.sum()) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return student.to(dtype).eval()


# ------------------------------------------------------------------------------------------ search
@dataclass
class SearchResult:
    """The candidates (scored), the winner's model and its prune report."""

    candidates: list[Candidate]
    student: Any
    report: PruneReport
    target_params: float
    keep: str
    seconds: dict = field(default_factory=dict)

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)

    def to_json(self) -> dict:
        return {
            "target_params": self.target_params,
            "chosen": {**asdict(self.chosen.shape), "params": self.chosen.params},
            "saved_weights": self.keep,
            "kept_layers": self.report.plan.layers,
            "seconds": self.seconds,
            "candidates": [c.row() for c in self.candidates],
        }

    def table(self) -> str:
        return format_table(self.candidates)


def format_table(candidates: Sequence[Candidate]) -> str:
    """A plain-text table of the candidates (``*`` marks the chosen one)."""
    f = lambda x: "-" if x is None else f"{x:.4f}"
    lines = [
        f"{'':1} {'layers':>6} {'heads':>5} {'kv':>3} {'hidden':>6} {'ffn':>6} {'params':>9} "
        f"{'pruned':>8} {'retrained':>9}"
    ]
    for c in candidates:
        s = c.shape
        lines.append(
            f"{'*' if c.chosen else ' ':1} {s.num_layers:>6} {s.num_heads:>5} {s.num_key_value_heads:>3} "
            f"{s.hidden_size:>6} {s.intermediate_size:>6} {format_params(c.params):>9} {f(c.loss_pruned):>8} "
            f"{f(c.loss_retrained):>9}"
        )
    return "\n".join(lines)


def search_shape(
    teacher,
    calib_batches: Sequence[Any],
    target_params: float,
    search: Optional[PruneSearchConfig] = None,
    importance: str = "activation",
    rescale_norms: bool = False,
    seed: int = 0,
    retrain_batches: Optional[Sequence[Any]] = None,
) -> SearchResult:
    """Search the best shape within the budget; the teacher is left unchanged.

    Args:
        teacher: a loaded causal LM of a supported family.
        calib_batches: calibration batches (a list); the first ``search.score_samples`` sequences score
            candidates, the rest give importance and the retraining steps (all of them when too few).
        target_params: the budget.
        search: search options (defaults when None).
        importance: width importance (activation | gradient | magnitude | random).
        rescale_norms: as in ``prune_model``.
        seed: seed of the random importance and of the retraining.
        retrain_batches: batches for the retraining steps instead of the calibration ones, e.g. with
            cached teacher targets (see :func:`retrain`).

    Returns:
        SearchResult with every candidate's losses, the winner (retrained or freshly pruned, per
        ``search.keep``) and its PruneReport.
    """
    search = search or PruneSearchConfig()
    check_family(teacher.config)
    cands = candidate_shapes(teacher.config, target_params, search)
    batches = list(calib_batches)
    score, rest = _split(batches, search.score_samples)
    t0 = time.time()
    imp: Importance = calibrate(teacher, rest, importance, block_influence=True, seed=seed)
    calib_s = time.time() - t0
    log.info(
        "shape search: %d candidates within %.1f%% of %s",
        len(cands),
        100 * search.tolerance,
        format_params(int(target_params)),
    )

    def prune(c: Candidate) -> tuple[Any, PrunePlan]:
        plan = make_plan(imp, teacher.config, c.shape)
        return build_student(teacher, plan, c.shape, rescale_norms), plan

    t0 = time.time()
    for c in cands:
        student, _ = prune(c)
        c.loss_pruned = calibration_loss(student, score)
        del student
    score_s = time.time() - t0
    order = sorted(range(len(cands)), key=lambda i: cands[i].loss_pruned)
    for r, i in enumerate(order):
        cands[i].rank_pruned = r
    top = order[: search.top_k]
    kept: dict[int, Any] = {}
    t0 = time.time()
    if search.retrain_steps > 0:
        for i in top:
            t1 = time.time()
            student, _ = prune(cands[i])
            student = retrain(student, teacher, retrain_batches or rest, search, seed)
            cands[i].loss_retrained = calibration_loss(student, score)
            cands[i].retrain_s = round(time.time() - t1, 3)
            kept[i] = student
            # only the best retrained model so far stays in memory
            best = min(kept, key=lambda j: cands[j].loss_retrained)
            for j in [j for j in kept if j != best]:
                del kept[j]
        win = min(top, key=lambda i: cands[i].loss_retrained)
    else:
        win = top[0]
    retrain_s = time.time() - t0
    cands[win].chosen = True
    if search.keep == "retrained" and win in kept:
        student, plan = kept[win], make_plan(imp, teacher.config, cands[win].shape)
    else:
        student, plan = prune(cands[win])
    report = PruneReport(
        imp,
        plan,
        Shape.of(teacher.config),
        cands[win].shape,
        count_params(teacher.config),
        cands[win].params,
        rescale_norms,
    )
    report.extra.update(
        search_candidates=len(cands),
        search_chosen_loss_pruned=cands[win].loss_pruned,
        search_chosen_loss_retrained=cands[win].loss_retrained,
    )
    seconds = {"calibration": round(calib_s, 3), "score": round(score_s, 3), "retrain": round(retrain_s, 3)}
    cached = bool(retrain_batches) and isinstance(retrain_batches[0], dict) and "kd_ids" in retrain_batches[0]
    report.extra["search_retrain_targets"] = "logit_cache" if cached else "teacher"
    result = SearchResult(cands, student, report, target_params, search.keep, seconds)
    log.info("shape search:\n%s", result.table())
    return result


def _split(batches: list, score_samples: int) -> tuple[list, list]:
    """The first batches holding ``score_samples`` sequences score; the rest calibrate and retrain."""
    score, n = [], 0
    for b in batches:
        if n >= score_samples:
            break
        score.append(b)
        n += int(as_batch(b, torch.device("cpu"))[0].shape[0])
    rest = batches[len(score) :]
    if not rest:  # too little data to hold out: everything does both
        rest = batches
    return score, rest


# -------------------------------------------------------------------------------------------- plot
def plot_search(candidates: Sequence[Candidate], path: str | Path, target_params: Optional[float] = None) -> Path:
    """One PNG: calibration loss of each candidate against its params, before and after retraining."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    xs = [c.params for c in candidates]
    ax.scatter(xs, [c.loss_pruned for c in candidates], s=14, c="tab:red", label="after pruning")
    re = [c for c in candidates if c.loss_retrained is not None]
    ax.scatter([c.params for c in re], [c.loss_retrained for c in re], s=20, c="tab:blue", label="after retraining")
    for c in re:
        ax.plot([c.params, c.params], [c.loss_pruned, c.loss_retrained], color="grey", lw=0.6)
    ch = [c for c in candidates if c.chosen]
    if ch:
        c = ch[0]
        y = c.loss_retrained if c.loss_retrained is not None else c.loss_pruned
        ax.scatter([c.params], [y], s=120, facecolors="none", edgecolors="black", label="chosen")
    if target_params:
        ax.axvline(target_params, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("params")
    ax.set_ylabel("calibration loss (nats/token)")
    ax.legend(fontsize=8)
    ax.set_title("candidates")
    labels = [
        f"L{c.shape.num_layers} H{c.shape.num_heads} D{c.shape.hidden_size} F{c.shape.intermediate_size}"
        for c in candidates
    ]
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].loss_pruned)
    bx.barh(range(len(order)), [candidates[i].loss_pruned for i in order], color="tab:red", alpha=0.5, label="pruned")
    bx.barh(
        range(len(order)),
        [candidates[i].loss_retrained or 0 for i in order],
        color="tab:blue",
        alpha=0.7,
        label="retrained",
    )
    bx.set_yticks(range(len(order)))
    bx.set_yticklabels([labels[i] for i in order], fontsize=6)
    bx.invert_yaxis()
    bx.legend(fontsize=8)
    bx.set_title("ranked by loss after pruning")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
