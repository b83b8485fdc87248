"""Clusters on loopback for tests: free port pairs, and fake Slurm commands that run a job on this machine.

``sbatch``, ``srun``, ``sacct``, ``scontrol`` and ``scancel`` (:func:`install`):

``sbatch`` runs the script in the background with the job's ``SLURM_*`` variables (as many nodes as
``#SBATCH --nodes`` asks, all on loopback) and appends to its ``--output`` log; ``srun`` starts its
command once per node with that node's ``SLURM_PROCID``/``SLURM_NODEID`` and records, per node, the
``DS_ACCELERATOR`` the node's environment had before anything of minima ran (``accel.<job>.<node>``);
``sacct`` reports the state. Real sbatch copies the submitting environment into the job, and so do these.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path


def free_port_pair() -> int:
    """A port P with P and P + 1 free (P: rendezvous, P + 1: the hang-guard store)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


FAKES = {
    "sbatch": r"""#!/bin/bash
script="${@: -1}"
id=$(( (RANDOM % 90000) + 10000 )); st="$FAKE_SLURM_DIR/$id"
log=$(sed -n 's/^#SBATCH --output=//p' "$script")
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script"); nodes=${nodes:-1}
echo RUNNING > "$st.state"
( export SLURM_JOB_ID=$id SLURM_NNODES=$nodes SLURM_JOB_NUM_NODES=$nodes SLURM_JOB_NODELIST="fakenode[1-$nodes]"
  bash "$script" >> "$log" 2>&1; rc=$?
  echo $rc > "$st.rc"
  if [ $rc = 0 ]; then echo COMPLETED > "$st.state"; else echo FAILED > "$st.state"; fi ) >/dev/null 2>&1 &
echo "$id"
""",
    "srun": r"""#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do
  echo "${DS_ACCELERATOR-unset}" > "$FAKE_SLURM_DIR/accel.$SLURM_JOB_ID.$i"
  SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
""",
    "sacct": r"""#!/bin/bash
while [ $# -gt 0 ]; do case $1 in -j) id=$2; shift;; esac; shift; done
st="$FAKE_SLURM_DIR/$id"; s=$(cat "$st.state"); rc=$(cat "$st.rc" 2>/dev/null || echo 0)
echo "$id|$s|$rc:0|fakenode1"
echo "$id.0|$s|$rc:0|fakenode1"
""",
    "scontrol": "#!/bin/bash\necho 127.0.0.1\necho 127.0.0.1\n",
    "scancel": "#!/bin/bash\nexit 0\n",
}


def install(root: Path) -> dict[str, str]:
    """Write the fakes under ``root/bin``; returns the environment variables that put them in use."""
    bindir = root / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, text in FAKES.items():
        p = bindir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    state = root / "slurm_state"
    state.mkdir(exist_ok=True)
    return {
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(state),
        "MINIMA_SLURM_POLL_S": "0.5",
    }


def node_accelerators(root: Path) -> dict[str, str]:
    """``accel.<job>.<node>`` -> the DS_ACCELERATOR each node started with ("unset" when it had none)."""
    return {p.name: p.read_text().strip() for p in sorted((root / "slurm_state").glob("accel.*"))}
