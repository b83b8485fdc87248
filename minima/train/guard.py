"""Hang guard: name the node or rank that did not show up instead of waiting forever.

Two places can hang in a multi-process job:

- Start-up: torchrun's rendezvous waits for every node. Before starting torchrun, each node's
  launcher checks in on a small TCP store hosted by node 0's launcher on ``master_port + 1``; node 0
  waits at most ``launch.join_timeout_s`` and then names the node ranks that never checked in.
- Training: process-group collectives time out after ``launch.collective_timeout_s``. Every rank writes its step
  to the process group's store after each step, so the timeout error names the ranks that fell behind.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Optional

from minima.core.errors import TrainingError

GUARD_PORT_OFFSET = 1


def _store(host: str, port: int, is_master: bool, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=is_master, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))


def node_join(
    master_addr: str,
    master_port: int,
    nnodes: int,
    node_rank: int,
    nproc_per_node: int,
    timeout_s: float,
    job: str = "",
):
    """Check in this node and wait until all ``nnodes`` have; raise naming the missing ones.

    ``job`` names the launch (stage and what it runs): two launches on one port back to back (a cache job,
    then training) never take each other's check-ins.

    Returns the store (node 0 must keep it alive while the others read from it).
    """
    port = master_port + GUARD_PORT_OFFSET
    deadline = time.time() + timeout_s
    store = None
    while store is None:
        try:
            store = _store(master_addr, port, node_rank == 0, max(1.0, deadline - time.time()))
        except (RuntimeError, OSError) as e:
            if node_rank == 0 or time.time() > deadline:
                where = f"{master_addr}:{port}"
                raise TrainingError(
                    f"node_rank {node_rank} could not {'listen on' if node_rank == 0 else 'reach'} "
                    f"the hang-guard store: {e}",
                    where=where,
                    fix="check master_addr/master_port (the guard uses master_port + 1), firewalls, "
                    "and that node_rank 0 is running",
                ) from None
            time.sleep(0.5)
    key = f"{job}/node/" if job else "node/"
    store.set(f"{key}{node_rank}", socket.gethostname())
    while True:
        have = [r for r in range(nnodes) if store.check([f"{key}{r}"])]
        if len(have) == nnodes:
            break
        if time.time() > deadline:
            missing = sorted(set(range(nnodes)) - set(have))
            ranks = [
                f"{r * nproc_per_node}-{(r + 1) * nproc_per_node - 1}"
                if nproc_per_node > 1
                else str(r * nproc_per_node)
                for r in missing
            ]
            raise TrainingError(
                f"node_rank {', '.join(map(str, missing))} (global rank {', '.join(ranks)}) "
                f"did not join within {timeout_s:g}s "
                f"({len(have)}/{nnodes} nodes checked in)",
                where=f"rendezvous {master_addr}:{master_port}",
                fix=f"start the same command with launch.node_rank={missing[0]} on that node, "
                f"and check it can reach {master_addr}",
            )
        time.sleep(0.2)
    return store


class Heartbeat:
    """Each rank records its last finished step in the process group's store."""

    def __init__(self, rank: int, world_size: int):
        import torch.distributed as dist

        self.rank, self.world = rank, world_size
        self.store = None
        if world_size > 1 and dist.is_initialized():
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception:  # private API; the guard degrades to the plain timeout error
                self.store = None
        self.beat(0)

    def beat(self, step: int) -> None:
        if self.store is not None:
            self.store.set(f"minima/beat/{self.rank}", str(step))

    def laggards(self) -> Optional[str]:
        """A sentence naming the ranks behind the others, or None when unknown."""
        if self.store is None:
            return None
        steps = {}
        for r in range(self.world):
            try:
                if self.store.check([f"minima/beat/{r}"]):
                    steps[r] = int(self.store.get(f"minima/beat/{r}"))
            except Exception:
                pass
        missing = [r for r in range(self.world) if r not in steps]
        if missing:
            return f"rank {', '.join(map(str, missing))} never reported a step"
        top = max(steps.values())
        behind = {r: s for r, s in steps.items() if s < top}
        if not behind:
            return None
        return "; ".join(f"rank {r} is at step {s} (others at {top})" for r, s in sorted(behind.items()))


def is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return any(k in text for k in ("timed out", "timeout", "connection closed by peer", "connection reset"))
