"""launcher=slurm against fake sbatch/sacct/scontrol/srun on PATH that run the job locally
(no Slurm cluster exists here). The rendered script is the real one; torchrun really runs."""

import os
import socket
import stat

import pytest

from minima.core.config import LaunchConfig
from minima.core.errors import TrainingError
from minima.train.slurm import render_sbatch, run_slurm

FAKES = {
    "sbatch": r"""#!/bin/bash
script="${@: -1}"
id=$(( (RANDOM % 90000) + 10000 )); st="$FAKE_SLURM_DIR/$id"
log=$(sed -n 's/^#SBATCH --output=//p' "$script")
echo RUNNING > "$st.state"
( export SLURM_JOB_ID=$id SLURM_JOB_NODELIST=fakenode[1] SLURM_PROCID=0 SLURM_NNODES=1
  bash "$script" >> "$log" 2>&1; rc=$?
  echo $rc > "$st.rc"
  if [ $rc = 0 ]; then echo COMPLETED > "$st.state"; else echo FAILED > "$st.state"; fi ) >/dev/null 2>&1 &
echo "$id"
""",
    "sacct": r"""#!/bin/bash
while [ $# -gt 0 ]; do case $1 in -j) id=$2; shift;; esac; shift; done
st="$FAKE_SLURM_DIR/$id"; s=$(cat "$st.state"); rc=$(cat "$st.rc" 2>/dev/null || echo 0)
echo "$id|$s|$rc:0|fakenode1"
echo "$id.0|$s|$rc:0|fakenode1"
""",
    "scontrol": "#!/bin/bash\necho 127.0.0.1\n",
    "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
    "scancel": "#!/bin/bash\nexit 0\n",
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in FAKES.items():
        p = bindir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "slurm_state"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    return tmp_path


def _port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


WORKER = """import os, sys
from pathlib import Path
Path(sys.argv[1]).write_text(
    f"rank={os.environ['RANK']} world={os.environ['WORLD_SIZE']} master={os.environ['MASTER_ADDR']} "
    f"node={os.environ['GROUP_RANK']}"
)
print("worker says hello", flush=True)
sys.exit(int(sys.argv[2]))
"""


def test_render_uses_slurm_rank_and_master(tmp_path):
    script = render_sbatch(
        "adapt",
        ["-m", "minima.train.worker", "cfg.json"],
        LaunchConfig(launcher="slurm", nnodes=4, gpus_per_node=8),
        tmp_path,
    )
    text = script.read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text
    assert '--node_rank "$SLURM_PROCID"' in text and "scontrol show hostnames" in text
    assert "--nnodes 4 --nproc_per_node 8" in text and "minima.train.worker cfg.json" in text


def test_fake_slurm_job_runs_and_streams_log(fake_slurm, capsys):
    worker = fake_slurm / "worker.py"
    worker.write_text(WORKER)
    out = fake_slurm / "out.txt"
    launch = LaunchConfig(launcher="slurm", nnodes=1, gpus_per_node=1, master_port=_port())
    job = run_slurm("adapt", [str(worker), str(out), "0"], launch, fake_slurm / "work", poll_s=0.5)
    assert job.isdigit()
    assert out.read_text() == "rank=0 world=1 master=127.0.0.1 node=0"
    assert "worker says hello" in capsys.readouterr().out


def test_fake_slurm_failure_names_the_node(fake_slurm):
    worker = fake_slurm / "worker.py"
    worker.write_text(WORKER)
    launch = LaunchConfig(launcher="slurm", nnodes=1, gpus_per_node=1, master_port=_port())
    with pytest.raises(TrainingError) as e:
        run_slurm("distill", [str(worker), str(fake_slurm / "o.txt"), "3"], launch, fake_slurm / "work", poll_s=0.5)
    assert "FAILED" in str(e.value) and "fakenode1" in str(e.value)
