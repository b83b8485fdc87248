"""Launching: topology detection, the printed command, the hang guard, and real multi-process runs
(2 processes on one node, and 2 "nodes" on loopback) matching a single process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import pytest
import torch
from _loopback import free_port_pair

from minima.core.errors import ConfigError, TrainingError
from minima.train.launch import build_command, plan_launch
from minima.train.metrics import read_metrics
from minima.train.synthetic import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
DRIVER = """import json, sys
from minima.train import train_stage
from minima.train.synthetic import SyntheticConfig
cfg = SyntheticConfig.model_validate(json.loads(open(sys.argv[1]).read()))
art = train_stage(cfg, {}, "minima.train.synthetic:SyntheticRecipe")
print("ARTIFACT", art.path, art.skipped, flush=True)
"""


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------------ cheap unit tests
def test_plan_from_config_prints_standalone_torchrun(tmp_path):
    cfg = SyntheticConfig(model="m", out_dir=str(tmp_path / "o"), launch={"nproc_per_node": 2})
    plan = plan_launch(cfg, env={})
    assert (plan.launcher, plan.nproc_per_node, plan.nnodes, plan.source) == ("torchrun", 2, 1, "config")
    cmd = build_command(plan, Path("spec.json"))
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "minima.train.worker",
        "spec.json",
    ]
    multi = SyntheticConfig(
        model="m", launch={"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 1234}
    )
    cmd = build_command(plan_launch(multi, env={}), Path("s.json"))
    assert " ".join(cmd).endswith(
        "--nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 1234 -m minima.train.worker s.json"
    )


def test_plan_detects_slurm_and_torchrun_env():
    cfg = SyntheticConfig(model="m", launch={"nproc_per_node": 4})
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[07-09]",
        "SLURM_GPUS_ON_NODE": "8",
        "PATH": "/nonexistent",
    }
    p = plan_launch(cfg, env=slurm)
    assert (p.launcher, p.nnodes, p.node_rank, p.nproc_per_node, p.master_addr, p.source) == (
        "torchrun",
        3,
        2,
        8,
        "gpu07",
        "slurm",
    )
    assert not p.is_leader
    tr = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "555",
        "TORCHELASTIC_RUN_ID": "x",
    }
    p = plan_launch(cfg, env=tr)
    assert (p.launcher, p.nnodes, p.node_rank, p.source) == ("external", 2, 1, "torchrun")


def test_plan_ssh_needs_hostfile_and_uses_deepspeed_launcher(tmp_path):
    with pytest.raises(ConfigError, match="hostfile"):
        plan_launch(SyntheticConfig(model="m", launch={"launcher": "ssh"}), env={})
    hf = tmp_path / "hostfile"
    hf.write_text("node1 slots=8\nnode2 slots=8\n")
    cfg = SyntheticConfig(model="m", launch={"launcher": "ssh", "hostfile": str(hf), "nnodes": 2, "gpus_per_node": 8})
    cmd = build_command(plan_launch(cfg, env={}), Path("s.json"), str(hf))
    assert cmd[1:6] == ["-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hf)]  # remote hosts: ssh checked
    assert cmd[-3:] == ["--module", "minima.train.worker", "s.json"] and cmd[cmd.index("--num_gpus") + 1] == "8"


def test_hang_guard_names_the_node_that_did_not_join():
    from minima.train.guard import node_join

    port = free_port_pair()
    t0 = time.time()
    with pytest.raises(TrainingError) as e:
        node_join("127.0.0.1", port, nnodes=3, node_rank=0, nproc_per_node=2, timeout_s=1.5)
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert "node_rank 1, 2" in msg and "global rank 2-3, 4-5" in msg and "launch.node_rank=1" in msg


def test_heartbeat_names_the_rank_behind():
    import torch.distributed as dist

    from minima.train.guard import Heartbeat

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    beats = []
    for r in range(3):
        hb = Heartbeat.__new__(Heartbeat)
        hb.rank, hb.world, hb.store = r, 3, store
        beats.append(hb)
    for hb, step in zip(beats, (7, 6, 7)):
        hb.beat(step)
    assert beats[0].laggards() == "rank 1 is at step 6 (others at 7)"


# ------------------------------------------------------------------------------ real processes
def _cfg(model_dir: Path, out: Path, **kw) -> SyntheticConfig:
    args = dict(
        model=str(model_dir),
        out_dir=str(out),
        precision="fp32",
        zero_stage=2,
        micro_batch_size=8,
        max_steps=6,
        lr=3e-3,
        warmup_proportion=0.0,
        seq_len=32,
        num_examples=256,
    )
    args.update(kw)
    return SyntheticConfig(**args)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MINIMA_INPROCESS", None)
    return env


def _start(tmp: Path, cfg: SyntheticConfig, name: str, env: Optional[dict] = None) -> subprocess.Popen:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(cfg.model_dump(mode="json")))
    return subprocess.Popen(
        [sys.executable, str(driver), str(spec)],
        env={**_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from minima.testing import tiny_llama

    d = tmp_path_factory.mktemp("launch")
    tiny_llama(128, seed=0, **SHAPE).save_pretrained(str(d / "model"))
    # One process, micro-batch 8 (in-process: no subprocess start-up cost).
    from minima.train import train_stage

    cfg = _cfg(d / "model", d / "one")
    env = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        art = train_stage(cfg, {}, "minima.train.synthetic:SyntheticRecipe")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return d, art.path


@pytest.fixture(scope="module")
def two_procs(setup):
    """nproc_per_node=2 (gloo), micro-batch 4 each: the same global batch of 8."""
    d, _ = setup
    out = d / "two"
    log = _wait(_start(d, _cfg(d / "model", out, micro_batch_size=4, launch={"nproc_per_node": 2}), "two"))
    assert "launch: " in log and "--nproc_per_node 2" in log
    return out


def test_two_processes_match_one(setup, two_procs):
    d, one = setup
    a, b = weights(one), weights(two_procs)
    # The same token-weighted gradient, summed in a different order across ranks (fp32): close, not bitwise.
    assert max_diff(a, b) < 1e-4
    m1 = [r for r in read_metrics(one / "metrics.jsonl") if r["split"] == "train"]
    m2 = [r for r in read_metrics(two_procs / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in m2] == list(range(1, 7))
    for x, y in zip(m1, m2):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    manifest = json.loads((two_procs / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["global_batch"] == 8


def test_two_nodes_on_loopback_match_two_processes(setup, two_procs):
    """Two launcher invocations (nnodes=2, node_rank 0/1, one master) finish and equal the 2-process run."""
    d, _ = setup
    port = free_port_pair()
    out = d / "nodes"
    procs = [
        _start(
            d,
            _cfg(
                d / "model",
                out,
                micro_batch_size=4,
                launch={"nnodes": 2, "node_rank": r, "master_addr": "127.0.0.1", "master_port": port},
            ),
            f"node{r}",
        )
        for r in (1, 0)
    ]  # the follower first: the hang guard makes it wait for node 0
    logs = [_wait(p) for p in procs]
    assert f"--nnodes 2 --node_rank 1 --master_addr 127.0.0.1 --master_port {port}" in logs[0]
    assert (out / "manifest.json").is_file() and not out.with_name("nodes.partial").exists()
    a, b = weights(two_procs), weights(out)
    assert max_diff(a, b) <= 1e-6


def test_worker_accepts_the_deepspeed_launchers_local_rank(tmp_path):
    from minima.train.worker import main, parse_args

    a = parse_args(["--local_rank=3", "spec.json"])
    assert (a.spec, a.local_rank) == ("spec.json", 3)
    assert parse_args(["spec.json", "--local-rank", "1"]).local_rank == 1
    assert main(["a.json", "b.json"]) == 2  # still one spec


def test_ssh_launcher_runs_for_real_on_localhost(setup):
    """launcher=ssh with the hostfile ``localhost slots=1``: the real deepspeed runner and launcher start the
    worker (appending --local_rank=0) and the run equals the one-process run."""
    d, one = setup
    hostfile = d / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    out = d / "ssh"
    launch = {"launcher": "ssh", "hostfile": str(hostfile), "gpus_per_node": 1, "master_port": free_port_pair()}
    log = _wait(_start(d, _cfg(d / "model", out, launch=launch), "ssh"))
    assert "deepspeed.launcher.runner --no_ssh_check --hostfile" in log and "--local_rank=0" in log
    assert max_diff(weights(one), weights(out)) <= 1e-6


def test_node_join_and_collective_timeouts_are_separate_fields(tmp_path):
    """Node 0 waits launch.join_timeout_s for the other nodes and names the missing one; collectives get
    launch.collective_timeout_s (30 min by default, not the join timeout)."""
    from minima.core.config import LaunchConfig
    from minima.train.launch import run_node

    assert LaunchConfig().collective_timeout_s == 1800
    port = free_port_pair()
    launch = {"nnodes": 2, "master_port": port, "join_timeout_s": 2, "collective_timeout_s": 999}
    cfg = SyntheticConfig(model="m", launch=launch)
    t0 = time.time()
    with pytest.raises(TrainingError, match=r"node_rank 1 \(global rank 1\) did not join within 2s"):
        run_node(cfg, "minima.train.synthetic:SyntheticRecipe", tmp_path / "w", tmp_path / "o", [])
    assert time.time() - t0 < 15


def test_simulated_slurm_two_nodes_match_torchrun(setup, two_procs, tmp_path):
    """launcher=slurm from a "login node" with DS_ACCELERATOR=cpu set: the rendered sbatch script runs as
    2 nodes (fake sbatch/srun/sacct/scontrol, loopback). The job finishes with the losses and weights of
    a local 2-process torchrun, and no node starts with the launcher's accelerator choice."""
    import _loopback as fake

    d, _ = setup
    env = fake.install(tmp_path)
    out = d / "slurm"
    launch = {"launcher": "slurm", "nnodes": 2, "gpus_per_node": 1, "master_port": free_port_pair()}
    # the driver runs with the fakes on PATH and the login node's own DS_ACCELERATOR=cpu
    env["DS_ACCELERATOR"] = "cpu"
    log = _wait(_start(d, _cfg(d / "model", out, micro_batch_size=4, launch=launch), "slurm", env))
    assert "submitted Slurm job" in log and (out / "manifest.json").is_file()
    accel = fake.node_accelerators(tmp_path)
    assert len(accel) == 2 and set(accel.values()) == {"unset"}, accel
    rows = lambda p: [r for r in read_metrics(p / "metrics.jsonl") if r["split"] == "train"]
    losses = [r["loss"] for r in rows(out)]
    assert losses == pytest.approx([r["loss"] for r in rows(two_procs)], rel=1e-6)
    assert max_diff(weights(two_procs), weights(out)) <= 1e-6
    print(
        f"simulated Slurm (2 nodes) final loss {losses[-1]:.6f} vs torchrun 2 procs {rows(two_procs)[-1]['loss']:.6f}"
    )
