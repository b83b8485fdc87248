"""Training metrics on rank 0: the step line, metrics.jsonl, TensorBoard, MFU and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from minima.core.logs import get_logger, step_line
from minima.models import counts

log = get_logger("minima.train")

# MFU of the step line: the one FLOP and parameter count (the loop imports them from here)
flops_per_token = counts.flops_per_token
non_embedding_params = counts.non_embedding_params

# Dense bf16 peak TFLOP/s per device (no sparsity), matched by substring of the CUDA device name.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_flops(name: Optional[str] = None) -> Optional[float]:
    """Peak bf16 FLOP/s of the current CUDA device (None on CPU or an unknown device)."""
    import torch

    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class MetricsLogger:
    """Writes metrics on rank 0 (a no-op elsewhere).

    Args:
        work_dir: run directory (metrics.jsonl, tensorboard/, loss_curve.png).
        enabled: rank 0.
        total_steps: for the step line and ETA.
        resume_step: the step training resumes after; later lines from an interrupted attempt are
            dropped so the curve has no repeated steps.
        flops_per_token: for MFU; peak_flops: per device (None: no MFU).
        world_size: devices sharing the tokens/s.
    """

    def __init__(
        self,
        work_dir: Path,
        enabled: bool,
        total_steps: int,
        resume_step: int = 0,
        flops_per_token: float = 0.0,
        peak_flops: Optional[float] = None,
        world_size: int = 1,
        log_steps: int = 1,
    ):
        self.enabled = enabled
        self.total = total_steps
        self.fpt = flops_per_token
        self.peak = peak_flops
        self.world = world_size
        self.log_steps = log_steps
        self.path = Path(work_dir) / "metrics.jsonl"
        self.png = Path(work_dir) / "loss_curve.png"
        self.t_start = time.time()
        self.start_step = resume_step
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past the checkpoint from an interrupted attempt.
            self.tb = SummaryWriter(
                str(Path(work_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
        except Exception as e:  # tensorboard is optional at runtime
            log.warning("TensorBoard disabled: %s", e)

    def _write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def train_step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: Optional[float],
        tokens: int,
        step_time: float,
        extra: dict | None = None,
        batch_hash: Optional[str] = None,
    ) -> dict:
        """Record one optimizer step; ``tokens`` = tokens processed by all ranks in the step."""
        tok_s = tokens / step_time if step_time > 0 else 0.0
        mfu = self.fpt * tok_s / (self.peak * self.world) if self.peak and self.fpt else None
        rec = {
            "split": "train",
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tok_s": round(tok_s, 2),
            "step_time": round(step_time, 4),
            "time": round(time.time(), 3),
        }
        if mfu is not None:
            rec["mfu"] = round(mfu, 4)
        if batch_hash is not None:
            rec["batch_hash"] = batch_hash
        rec.update(extra or {})
        if not self.enabled:
            return rec
        self._write(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time", "split", "batch_hash") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, step)
        if step % self.log_steps == 0 or step == self.total:
            done = step - self.start_step
            elapsed = time.time() - self.t_start
            eta = elapsed / done * (self.total - step) if done > 0 else None
            ex = {k: v for k, v in (extra or {}).items() if isinstance(v, float)}
            if grad_norm is not None:
                ex["gnorm"] = grad_norm
            log.info(step_line(step, self.total, loss, lr, tok_s, mfu, eta, **ex))
        return rec

    def eval_step(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        rec = {"split": "dev", "step": step, **metrics, "time": round(time.time(), 3)}
        self._write(rec)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"dev/{k}", v, step)
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        log.info(f"eval step {step}/{self.total} | {shown}")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# Train-record fields that are bookkeeping, not loss terms.
_NOT_TERMS = {"split", "step", "loss", "lr", "grad_norm", "tokens", "tok_s", "step_time", "time", "mfu", "batch_hash"}


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the first points average what they have)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_series(recs: list[dict]) -> dict:
    """The curves of a metrics.jsonl, like with like: ``train_ce`` and ``dev_ce`` as (step, value) lists,
    ``terms`` the other loss terms by name (e.g. ``kd``), ``objective`` the optimised loss when it is none of
    them, and ``tokens`` (step, tokens seen by the end of the step).

    Train CE is the record's ``ce`` when the objective logs it apart, else ``loss`` when the record has no
    other loss term (adapt, sft). Dev CE is ``dev_loss``. Preference runs (records with ``rewards/margins``)
    have no CE: ``train_ce``/``dev_ce`` then hold the preference loss, ``preference`` is true and ``margins``
    holds the reward margin per split. Names with a ``/`` (rewards/..., eval/...) are never loss terms.
    """
    train = [r for r in recs if r.get("split") == "train" and _finite(r.get("loss"))]
    dev = [(r["step"], r["dev_loss"]) for r in recs if r.get("split") == "dev" and _finite(r.get("dev_loss"))]
    names = sorted(
        {k for r in train for k, v in r.items() if k not in _NOT_TERMS and k != "ce" and "/" not in k and _finite(v)}
    )
    terms = {t: [(r["step"], r[t]) for r in train if _finite(r.get(t))] for t in names}
    if any("ce" in r for r in train):
        train_ce = [(r["step"], r["ce"]) for r in train if _finite(r.get("ce"))]
    else:
        train_ce = [] if terms else [(r["step"], r["loss"]) for r in train]
    same = [t for t in names if all(r["loss"] == r.get(t) for r in train)]
    objective = [] if (same or not terms) else [(r["step"], r["loss"]) for r in train]
    seen, tokens = 0.0, []
    for r in train:
        seen += float(r.get("tokens") or 0)
        tokens.append((r["step"], seen))
    margins = {
        split: [
            (r["step"], r["rewards/margins"])
            for r in recs
            if r.get("split") == split and _finite(r.get("rewards/margins"))
        ]
        for split in ("train", "dev")
    }
    return {
        "train_ce": train_ce,
        "dev_ce": dev,
        "terms": terms,
        "objective": objective,
        "tokens": tokens,
        "preference": bool(margins["train"] or margins["dev"]),
        "margins": margins,
    }


def plot_loss_curve(metrics_path: Path, png: Path) -> Optional[Path]:
    """Like beside like, as a PNG (see :func:`loss_series`): train CE with dev CE on one axis; any other loss
    term (e.g. the KD term of distillation, which is not a cross entropy) on its own panel; preference runs
    plot their loss (train and dev) beside the reward margin (train and dev). x: optimizer step, and training
    tokens on the top axis."""
    c = loss_series(read_metrics(metrics_path))
    train_ce, dev, terms, pref = c["train_ce"], c["dev_ce"], c["terms"], c["preference"]
    if not train_ce and not dev and not terms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import EngFormatter, MaxNLocator

    two = bool(terms) or pref
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(12 if two else 7, 4), dpi=100, squeeze=False)
    axes = list(axes[0])
    window = max(1, len(c["tokens"]) // 50)

    def curve(ax, pts, label, color):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=0.6, alpha=0.35, color=color)
        ax.plot(
            xs,
            _smooth(list(ys), window),
            lw=1.5,
            color=color,
            label=f"{label} ({window}-step mean)" if window > 1 else label,
        )

    ax = axes[0]
    what = "preference loss" if pref else "CE"
    if train_ce:
        curve(ax, train_ce, f"train {what}", "tab:blue")
    if dev:
        ax.plot(*zip(*dev), "o-", label=f"dev {what}", lw=1.5, color="tab:orange")
    ax.set_ylabel("preference loss" if pref else "next-token cross entropy (nats/token)")
    if pref:
        if c["margins"]["train"]:
            curve(axes[1], c["margins"]["train"], "train reward margin", "tab:green")
        if c["margins"]["dev"]:
            axes[1].plot(*zip(*c["margins"]["dev"]), "s--", color="tab:red", lw=1.5, label="dev reward margin")
        axes[1].set_ylabel("reward margin (chosen - rejected)")
    if terms:
        colors = iter(["tab:green", "tab:purple", "tab:red", "tab:brown", "tab:gray"])
        for t, pts in terms.items():
            curve(axes[1], pts, f"train {t}", next(colors, None))
        if c["objective"]:
            curve(axes[1], c["objective"], "train objective", "black")
        axes[1].set_ylabel("other loss terms (nats/token)")
    # tokens seen by the end of each step, from step 0 and extended linearly past the last one
    steps = np.array([0.0] + [s for s, _ in c["tokens"]], dtype=float)
    seen = np.array([0.0] + [t for _, t in c["tokens"]], dtype=float)
    if len(steps) > 1:
        steps, seen = np.append(steps, steps[-1] * 10), np.append(seen, seen[-1] * 10)
    for a in axes:
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
        a.legend()
        if len(steps) > 2 and seen[-1] > 0:
            top = a.secondary_xaxis(
                "top",
                functions=(lambda x: np.interp(x, steps, seen), lambda t: np.interp(t, seen, steps)),
            )
            top.set_xlabel("training tokens")
            top.xaxis.set_major_locator(MaxNLocator(6))
            top.xaxis.set_major_formatter(EngFormatter(sep=""))
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
