"""launcher=slurm against fake sbatch/sacct/scontrol/srun on PATH that run the job locally
(no Slurm cluster exists here). The rendered script is the real one; torchrun really runs."""

import socket

import _loopback as fake
import pytest

from minima.core.config import LaunchConfig
from minima.core.errors import TrainingError
from minima.train.slurm import render_sbatch, run_slurm


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    for k, v in fake.install(tmp_path).items():
        monkeypatch.setenv(k, v)
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


def test_sbatch_fields_and_derived_port(tmp_path):
    launch = LaunchConfig(
        launcher="slurm", nnodes=2, gpus_per_node=4, partition="gpu", account="proj", time="1-00:00:00", mem="0"
    )
    text = render_sbatch("adapt", ["-m", "minima.train.worker", "s.json"], launch, tmp_path).read_text()
    for line in ("--cpus-per-task=32", "--partition=gpu", "--account=proj", "--time=1-00:00:00", "--mem=0"):
        assert f"#SBATCH {line}\n" in text
    # no fixed port: two jobs on one node must not collide, and every node of a job agrees on it
    assert "export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in text
    bare = render_sbatch("sft", ["x"], LaunchConfig(launcher="slurm", master_port=1234, cpus_per_task=6), tmp_path)
    text = bare.read_text()
    assert "MASTER_PORT=1234" in text and "--cpus-per-task=6" in text and "--partition" not in text


def test_login_node_accelerator_does_not_reach_the_script(fake_slurm, tmp_path, monkeypatch):
    """On a CPU login node the launcher picks DS_ACCELERATOR=cpu for itself; the sbatch script must
    neither export it nor pass on the inherited value (sbatch copies the submitting environment)."""
    from minima.train.launch import run_node
    from minima.train.synthetic import SyntheticConfig

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    (fake_slurm / "bin" / "sbatch").write_text("#!/bin/bash\necho 'no queue' >&2\nexit 1\n")
    cfg = SyntheticConfig(model="m", launch={"launcher": "slurm", "nnodes": 4, "gpus_per_node": 8})
    with pytest.raises(TrainingError, match="sbatch failed"):
        run_node(cfg, "minima.train.synthetic:SyntheticRecipe", tmp_path / "w", tmp_path / "o", [])
    text = (tmp_path / "w" / "scripts" / "slurm" / "adapt.sbatch").read_text()
    assert "DS_ACCELERATOR=" not in text and "unset DS_ACCELERATOR" in text
    assert "export PYTHONPATH=" in text  # the source checkout still reaches the nodes


def test_log_poller_skips_earlier_attempts(fake_slurm, capsys):
    worker = fake_slurm / "worker.py"
    worker.write_text(WORKER)
    work = fake_slurm / "work"
    work.mkdir()
    (work / "slurm-adapt.log").write_text("attempt 1 output\n")  # --open-mode=append keeps it
    launch = LaunchConfig(launcher="slurm", nnodes=1, gpus_per_node=1, master_port=_port())
    run_slurm("adapt", [str(worker), str(fake_slurm / "o.txt"), "0"], launch, work, poll_s=0.5)
    out = capsys.readouterr().out
    assert "worker says hello" in out and "attempt 1 output" not in out


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
