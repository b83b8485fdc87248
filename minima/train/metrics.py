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


def plot_loss_curve(metrics_path: Path, png: Path) -> Optional[Path]:
    """Train loss (and dev loss when present) against the step, as a PNG; preference runs add the reward
    margin (``rewards/margins``, train and dev) on a second axis."""
    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if r.get("split") == "train" and _finite(r.get("loss"))]
    dev = [(r["step"], r["dev_loss"]) for r in recs if r.get("split") == "dev" and _finite(r.get("dev_loss"))]
    margins = {
        split: [
            (r["step"], r["rewards/margins"])
            for r in recs
            if r.get("split") == split and _finite(r.get("rewards/margins"))
        ]
        for split in ("train", "dev")
    }
    if not train and not dev:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if margins["train"] or margins["dev"]:
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        for split, style in (("train", "-"), ("dev", "s--")):
            if margins[split]:
                ax2.plot(*zip(*margins[split]), style, color="tab:green", lw=1, label=f"{split} reward margin")
        ax2.set_ylabel("reward margin (chosen - rejected)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right" if len(handles) > 2 else "best")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
