"""Checkpoints: the strategy's model/optimizer/scheduler state + per-rank RNG/data state + a marker.

Layout: ``<work_dir>/checkpoints/step_00000120/`` holds what the strategy writes (DeepSpeed's
model/optimizer files, or FSDP's ``dcp/`` directory and ``scheduler.pt``), one
``minima_rank00000.pt`` per rank (RNG states, reader state_dict, loop counters), and ``COMPLETE``
(JSON: step, world size, strategy, and every file's size and checksum), written by rank 0 after every
rank has finished writing. A directory without the marker is an interrupted save and is ignored.
Resume takes the newest checkpoint whose files still match their marker; a damaged one is renamed
``step_NNNNNNNN.corrupt`` with a warning and the previous one is tried. Both strategies share this
file: only ``strategy.save`` / ``strategy.load`` differ.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from minima.core.artifacts import file_table, verify_files
from minima.core.errors import TrainingError
from minima.core.logs import get_logger

log = get_logger("minima.train")
MARKER = "COMPLETE"
PREFIX = "step_"
_NAME = re.compile(r"step_\d+")


def tag_of(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / MARKER).is_file()]
    return sorted(dirs, key=step_of)


def latest_complete(root: Path) -> Optional[Path]:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_marker(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MARKER).read_text())


def rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores checkpoints under ``root`` for one rank.

    Args:
        root: ``<work_dir>/checkpoints``.
        rank, world_size: this process.
        keep_last: complete checkpoints kept (the best one, when set, is kept in addition).
        barrier: a callable that synchronises all ranks.
    """

    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int, barrier):
        self.root = Path(root)
        self.rank, self.world = rank, world_size
        self.keep_last = keep_last
        self.barrier = barrier
        self.protected: set[int] = set()  # steps never pruned (the best checkpoint)

    def rank_file(self, ckpt: Path, rank: Optional[int] = None) -> Path:
        return Path(ckpt) / f"minima_rank{self.rank if rank is None else rank:05d}.pt"

    def save(self, strategy, step: int, rank_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint dir."""
        path = self.root / tag_of(step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # an interrupted save of the same step, or an older attempt's
                shutil.rmtree(path)
        self.barrier()
        path.mkdir(parents=True, exist_ok=True)
        strategy.save(path)
        torch.save(rank_state, self.rank_file(path))
        self.barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            marker = {"step": step, "world_size": self.world, "strategy": strategy.name, **meta}
            marker["files"] = file_table(path)  # resume checks sizes and checksums against it
            _fsync_write(path / MARKER, json.dumps(marker, default=str))
            self.prune()
        self.barrier()
        return path

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints (plus protected ones); drop partial older dirs."""
        done = complete_checkpoints(self.root)
        keep = {step_of(p) for p in done[-self.keep_last :]} | self.protected
        newest = step_of(done[-1]) if done else -1
        for p in self.root.iterdir():
            if not (p.is_dir() and _NAME.fullmatch(p.name)):
                continue
            s = step_of(p)
            complete = (p / MARKER).is_file()
            if (complete and s not in keep) or (not complete and s < newest):
                # Remove the marker first so a crash mid-delete never leaves a "complete" half.
                (p / MARKER).unlink(missing_ok=True)
                shutil.rmtree(p, ignore_errors=True)

    def resume_point(self) -> Optional[Path]:
        """Collective: the newest intact checkpoint (None: start from step 0), the same on every rank.

        Rank 0 checks each complete checkpoint, newest first, against the sizes and checksums in its
        marker; a damaged one is renamed ``<name>.corrupt`` (kept for inspection) with a warning
        naming the file, and the one before it is tried.
        """
        step = -1
        if self.rank == 0:
            done = complete_checkpoints(self.root)
            for ckpt in reversed(done):
                problem = _damage(ckpt)
                if problem is None:
                    step = step_of(ckpt)
                    break
                dest = ckpt.with_name(ckpt.name + ".corrupt")
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(ckpt, dest)
                log.warning(f"checkpoint {ckpt.name} is damaged ({problem}); moved to {dest.name}, trying an older one")
            if done and step < 0:
                log.warning(f"no intact checkpoint left in {self.root}: training starts over from step 0")
        step = _broadcast_int(step)
        return self.root / tag_of(step) if step >= 0 else None

    def load(self, strategy, ckpt: Path) -> dict:
        """Restore the strategy's state from ``ckpt``; returns this rank's saved state (RNG, data, counters)."""
        marker = read_marker(ckpt)
        if marker.get("world_size") != self.world:
            raise TrainingError(
                f"checkpoint {ckpt} was written by {marker.get('world_size')} ranks, this run has {self.world}",
                fix="resume with the same nproc_per_node x nnodes, or pass --force to start over",
            )
        wrote = marker.get("strategy", "deepspeed")
        if wrote != strategy.name:
            raise TrainingError(
                f"checkpoint {ckpt} was written by strategy={wrote}, this run uses strategy={strategy.name}",
                fix=f"resume with strategy={wrote}, or pass --force to start over",
            )
        strategy.load(Path(ckpt))
        return torch.load(self.rank_file(ckpt), map_location="cpu", weights_only=True)


def _damage(ckpt: Path) -> Optional[str]:
    """What is wrong with a complete checkpoint's files (None: they match the marker)."""
    try:
        marker = read_marker(ckpt)
    except (OSError, ValueError) as e:
        return f"{MARKER}: unreadable ({e})"
    return verify_files(ckpt, marker, "full")


def _broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (unchanged without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def rank_state(step: int, data_state: Any, counters: dict) -> dict:
    return {"step": step, "data": data_state, "rng": rng_state(), "counters": counters}
