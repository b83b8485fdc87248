"""``launch.launcher=slurm``: render an sbatch script, submit it, poll sacct, stream the log.

The rendered script (kept as ``scripts/slurm/<stage>.sbatch`` in the run's work dir) starts one
torchrun per node with ``srun``; each node's rank is ``$SLURM_PROCID`` and the master is the first
host of ``scontrol show hostnames $SLURM_JOB_NODELIST``. On failure the error names the job step
and node that failed (from ``sacct``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from minima.core.config import LaunchConfig
from minima.core.errors import TrainingError

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nnodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
{extra}#SBATCH --output={log}
#SBATCH --open-mode=append
# Rendered by minima ({stage}). One torchrun per node; ranks and master come from Slurm.
set -euo pipefail
cd {cwd}
# The submitting host's accelerator choice is not the nodes': each rank picks its own.
unset {node_decides}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={port}
{env}
srun --kill-on-bad-exit=1 bash -c '{python} -m torch.distributed.run --nnodes {nnodes} --nproc_per_node {gpus} \\
  --node_rank "$SLURM_PROCID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" {worker}'
"""

#: Variables the submitting host may have set for itself that must not reach the nodes.
NODE_DECIDES = ("DS_ACCELERATOR",)
#: A port derived from the job id: concurrent jobs sharing a node do not collide, and every node agrees.
DERIVED_PORT = "$(( 20000 + SLURM_JOB_ID % 20000 ))"
DEFAULT_CPUS_PER_GPU = 8


def slurm_port(launch: LaunchConfig, job_id: Optional[str] = None) -> int:
    """The rendezvous port of a Slurm job: ``launch.master_port`` if set, else derived from the job id."""
    if launch.master_port is not None:
        return int(launch.master_port)
    return 20000 + int(job_id or 0) % 20000


def render_sbatch(
    stage: str, worker_args: list[str], launch: LaunchConfig, work_dir: Path, env: Optional[dict] = None
) -> Path:
    """Write the sbatch script for ``python -m torch.distributed.run ... <worker_args>``; returns its path."""
    out = Path(work_dir) / "scripts" / "slurm" / f"{stage}.sbatch"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in (env or {}).items() if k not in NODE_DECIDES}
    exports = "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in sorted(env.items()))
    extra = "".join(
        f"#SBATCH --{flag}={value}\n"
        for flag, value in (
            ("partition", launch.partition),
            ("account", launch.account),
            ("time", launch.time),
            ("mem", launch.mem),
        )
        if value not in (None, "")
    )
    text = TEMPLATE.format(
        job_name=f"minima-{stage}",
        nnodes=launch.nnodes,
        gpus=launch.gpus_per_node,
        cpus=launch.cpus_per_task or DEFAULT_CPUS_PER_GPU * launch.gpus_per_node,
        extra=extra,
        log=Path(work_dir) / f"slurm-{stage}.log",
        stage=stage,
        cwd=shlex.quote(os.getcwd()),
        node_decides=" ".join(NODE_DECIDES),
        port=DERIVED_PORT if launch.master_port is None else int(launch.master_port),
        env=exports,
        python=shlex.quote(sys.executable),
        worker=" ".join(shlex.quote(a) for a in worker_args).replace("'", "'\\''"),
    )
    out.write_text(text)
    out.chmod(0o755)
    return out


def _sacct(job_id: str) -> list[tuple[str, str, str, str]]:
    r = subprocess.run(
        ["sacct", "-j", job_id, "--parsable2", "--noheader", "--format=JobID,State,ExitCode,NodeList"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = []
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            rows.append((parts[0], parts[1].split()[0] if parts[1] else "", parts[2], parts[3]))
    return rows


def submit_and_wait(
    script: Path,
    log: Path,
    poll_s: float = 10.0,
    timeout_s: Optional[float] = None,
    echo: Callable[[str], None] = lambda s: print(s, end="", flush=True),
) -> str:
    """Submit with sbatch, poll sacct until the job ends, stream the log; return the job id.

    Raises:
        TrainingError: the job did not complete, naming the failing step and node.
    """
    # --open-mode=append keeps earlier attempts' output in the log: stream only what this job adds.
    pos = log.stat().st_size if log.is_file() else 0
    r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise TrainingError(
            f"sbatch failed: {r.stderr.strip() or r.stdout.strip()}",
            where=str(script),
            fix="check the partition/account settings of the cluster",
        )
    job_id = r.stdout.strip().split(";")[0].split()[-1]
    print(f"minima: submitted Slurm job {job_id} ({script})", flush=True)
    t0 = time.time()
    while True:
        if log.is_file():
            with open(log, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                echo(chunk)
        rows = _sacct(job_id)
        main = next((row for row in rows if row[0] == job_id), None)
        if main and main[1] in TERMINAL:
            if log.is_file():  # the tail written after the last poll
                with open(log, errors="replace") as f:
                    f.seek(pos)
                    echo(f.read())
            if main[1] != "COMPLETED":
                bad = [row for row in rows if row[1] not in ("COMPLETED", "")] or [main]
                step = bad[-1]
                raise TrainingError(
                    f"Slurm job {job_id} ended {main[1]} (exit {main[2]}); "
                    f"failing step {step[0]} on node(s) {step[3]} ({step[1]}, exit {step[2]})",
                    where=str(log),
                    fix="read the log above for that node's traceback; "
                    "rerun the stage to resume from the last checkpoint",
                )
            return job_id
        if timeout_s is not None and time.time() - t0 > timeout_s:
            subprocess.run(["scancel", job_id], capture_output=True)
            raise TrainingError(
                f"Slurm job {job_id} did not finish in {timeout_s:.0f}s; cancelled",
                fix="raise the timeout or check the queue",
            )
        time.sleep(poll_s)


def run_slurm(
    stage: str,
    worker_args: list[str],
    launch: LaunchConfig,
    work_dir: Path,
    env: Optional[dict] = None,
    poll_s: Optional[float] = None,
) -> str:
    """Render, submit and wait for the job; ``poll_s`` defaults to ``$MINIMA_SLURM_POLL_S`` or 10 s."""
    poll_s = float(os.environ.get("MINIMA_SLURM_POLL_S") or 10.0) if poll_s is None else poll_s
    script = render_sbatch(stage, worker_args, launch, work_dir, env)
    return submit_and_wait(script, Path(work_dir) / f"slurm-{stage}.log", poll_s=poll_s)
