"""Start training: torchrun (or the deepspeed launcher) as a subprocess, or in-process for tests.

Where the topology comes from, first match wins:

1. torchrun env (``TORCHELASTIC_RUN_ID`` or RANK/WORLD_SIZE/LOCAL_RANK set): the user already
   launched one process per rank (``torchrun -m minima.cli adapt ...``); each runs its rank here.
2. Slurm env (``SLURM_JOB_ID`` + ``SLURM_NNODES``): nnodes, node_rank and master_addr come from the
   allocation; run one ``minima <stage>`` per node (``srun --ntasks-per-node=1``).
3. The stage config's ``launch`` block (``launcher=slurm`` outside an allocation renders and submits an
   sbatch script through :mod:`minima.train.slurm`; ``ssh`` uses the deepspeed launcher and a hostfile).

Node 0 owns the artifact (``run_stage``); other nodes only run their ranks into the same directory
(a shared file system, as the checkpoints of either strategy need anyway).

Stages that are not trained (prune, evaluate, the logit cache) go through :func:`stage_job`: the same
launchers start ``python -m minima.train.worker`` with a spec that names the stage's ``entry``, and the
job itself publishes the artifact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minima.core.errors import ConfigError, MinimaError, TrainingError
from minima.core.logs import get_logger
from minima.train.slurm import slurm_port

log = get_logger("minima.train")


@dataclass
class Topology:
    """Resolved topology of this invocation."""

    launcher: str  # torchrun | deepspeed | sbatch | inprocess | external
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # config | slurm | torchrun

    @property
    def is_leader(self) -> bool:
        if self.launcher == "external":
            return int(os.environ.get("RANK", "0")) == 0
        return self.node_rank == 0


def _slurm_master(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if shutil.which("scontrol") and nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    # "node[03-05,07]" -> "node03"; "a,b" -> "a"
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first or "127.0.0.1"


DEFAULT_PORT = 29500


def in_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def plan_launch(cfg, env: Mapping[str, str] = os.environ) -> Topology:
    """Where this invocation's ranks come from (see the module docstring)."""
    lc = cfg.launch
    if in_torchrun(env):
        world = int(env.get("WORLD_SIZE", "1"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return Topology(
            "external",
            local_world,
            max(1, world // max(local_world, 1)),
            int(env.get("GROUP_RANK", "0")),
            env.get("MASTER_ADDR", lc.master_addr),
            int(env.get("MASTER_PORT") or lc.master_port or DEFAULT_PORT),
            "torchrun",
        )
    if lc.launcher in ("local", "slurm") and "SLURM_JOB_ID" in env and "SLURM_NNODES" in env:
        nproc = int(
            env.get("SLURM_GPUS_ON_NODE") or (lc.gpus_per_node if lc.launcher == "slurm" else lc.nproc_per_node)
        )
        return Topology(
            "torchrun",
            nproc,
            int(env["SLURM_NNODES"]),
            int(env.get("SLURM_NODEID", "0")),
            _slurm_master(env),
            slurm_port(lc, env["SLURM_JOB_ID"]),
            "slurm",
        )
    if lc.launcher == "slurm":
        # Outside an allocation: render an sbatch script and submit it (minima.train.slurm).
        return Topology("sbatch", lc.gpus_per_node, lc.nnodes, 0, lc.master_addr, lc.master_port or 0, "config")
    if lc.launcher == "ssh":
        if not lc.hostfile or not Path(lc.hostfile).is_file():
            raise ConfigError(
                f"launch.launcher=ssh needs a DeepSpeed hostfile (got {lc.hostfile!r})",
                where="launch.hostfile",
                fix="write 'host slots=N' lines to a file and set launch.hostfile",
            )
        port = lc.master_port or DEFAULT_PORT
        return Topology("deepspeed", lc.gpus_per_node, lc.nnodes, 0, lc.master_addr, port, "config")
    inproc = os.environ.get("MINIMA_INPROCESS") == "1" and lc.nproc_per_node == 1 and lc.nnodes == 1
    return Topology(
        "inprocess" if inproc else "torchrun",
        lc.nproc_per_node,
        lc.nnodes,
        lc.node_rank,
        lc.master_addr,
        lc.master_port or DEFAULT_PORT,
        "config",
    )


def _hostfile_is_local(hostfile: str) -> bool:
    """True when every host of a DeepSpeed hostfile is this machine (the launcher then starts ranks without ssh)."""
    me = {"localhost", "127.0.0.1", socket.gethostname()}
    try:
        lines = Path(hostfile).read_text().splitlines()
    except OSError:
        return False
    hosts = [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return bool(hosts) and all(h in me for h in hosts)


def build_command(plan: Topology, spec_path: Path, hostfile: Optional[str] = None) -> list[str]:
    """The exact command that starts this node's ranks."""
    if plan.launcher == "deepspeed":
        # The runner's ssh reachability check needs sshd even when the hostfile names only this machine.
        local_only = ["--no_ssh_check"] if hostfile and _hostfile_is_local(hostfile) else []
        return [
            sys.executable,
            "-u",
            "-m",
            "deepspeed.launcher.runner",
            *local_only,
            "--hostfile",
            str(hostfile),
            "--num_nodes",
            str(plan.nnodes),
            "--num_gpus",
            str(plan.nproc_per_node),
            "--master_addr",
            plan.master_addr,
            "--master_port",
            str(plan.master_port),
            "--module",
            "minima.train.worker",
            str(spec_path),
        ]
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(plan.nproc_per_node)]
    if plan.nnodes == 1 and plan.source == "config":
        # One node: --standalone picks a free local port, so concurrent jobs on a machine never clash.
        return head + ["--standalone", "-m", "minima.train.worker", str(spec_path)]
    return head + [
        "--nnodes",
        str(plan.nnodes),
        "--node_rank",
        str(plan.node_rank),
        "--master_addr",
        plan.master_addr,
        "--master_port",
        str(plan.master_port),
        "-m",
        "minima.train.worker",
        str(spec_path),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_spec(
    cfg, recipe: Optional[str], work_dir: Path, out_dir: Path, callbacks: list[str], extra: Optional[dict] = None
) -> dict:
    """What every rank's worker runs: the config, and the recipe to train (or ``extra``'s stage ``entry``)."""
    cls = type(cfg)
    return {
        "config_class": f"{cls.__module__}:{cls.__qualname__}",
        "config": cfg.model_dump(mode="json"),
        "recipe": recipe,
        "work_dir": str(work_dir),
        "out_dir": str(out_dir),
        "callbacks": list(callbacks),
        **(extra or {}),
    }


#: Launchers whose ranks run on other machines (Slurm's nodes, the hostfile's hosts).
REMOTE_LAUNCHERS = ("sbatch", "deepspeed")
#: Accelerator choices this machine made for itself; a rank picks its own on its node (worker.run_spec).
LAUNCHER_ONLY_ENV = ("DS_ACCELERATOR",)


def _child_env(plan: Optional[Topology] = None) -> dict:
    """The environment of the launcher subprocess.

    Local ranks on a machine without CUDA get ``DS_ACCELERATOR=cpu``. Ranks on other machines (Slurm,
    ssh) must not inherit what this machine (often a login node without a GPU) chose, so it is dropped.
    """
    import torch

    env = dict(os.environ)
    if plan is not None and plan.launcher in REMOTE_LAUNCHERS:
        for k in LAUNCHER_ONLY_ENV:
            env.pop(k, None)
    elif not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    # The package may be run from a source checkout that is not installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _raise_rank_error(work_dir: Path, rc: int, missing_ok: bool = False, what: str = "training") -> None:
    from minima.core import errors as E
    from minima.train.worker import ERRORS

    files = sorted((work_dir / ERRORS).glob("rank*.json")) if (work_dir / ERRORS).is_dir() else []
    if files:
        info = json.loads(files[0].read_text())
        cls = getattr(E, info.get("class", ""), None)
        cls = cls if isinstance(cls, type) and issubclass(cls, MinimaError) else TrainingError
        where = info.get("where")
        raise cls(info["what"], where=f"rank {info['rank']}" + (f", {where}" if where else ""), fix=info.get("fix"))
    if missing_ok:
        return
    raise TrainingError(
        f"{what} exited with code {rc}",
        fix="read the traceback above; a rerun resumes from the last complete checkpoint"
        if what == "training"
        else "read the traceback above, then rerun the stage",
    )


def _run_inprocess(spec: dict) -> dict:
    """One rank in this process (tests): a world of one, the process group kept for later runs."""
    import torch.distributed as dist

    from minima.train.worker import run_spec

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import torch

    threads = torch.get_num_threads()  # the worker may change it (MINIMA_NUM_THREADS)
    # ZeRO-3 swaps torch.nn.functional.linear for its own autograd function and never swaps it back;
    # a real job is its own process, but in-process the patch would leak into whatever runs next.
    linear = torch.nn.functional.linear
    try:
        return run_spec(spec)
    finally:
        torch.nn.functional.linear = linear
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_node(
    cfg,
    recipe: Optional[str],
    work_dir: Path,
    out_dir: Path,
    callbacks: list[str],
    plan: Optional[Topology] = None,
    spec_path: Optional[Path] = None,
    extra: Optional[dict] = None,
) -> Optional[dict]:
    """Start this node's ranks and wait. Returns the metrics on the node hosting rank 0, else None.

    ``extra`` goes into the spec: a stage job's ``entry`` (see :func:`stage_job`) instead of a recipe.
    """
    from minima.train.worker import ERRORS, RESULT, run_spec

    plan = plan or plan_launch(cfg)
    spec = make_spec(cfg, recipe, work_dir, out_dir, callbacks, extra)
    what = f"the {cfg.stage} job" if recipe is None else "training"
    if plan.is_leader:  # leftovers of a failed attempt must not be mistaken for this one's
        shutil.rmtree(work_dir / ERRORS, ignore_errors=True)
        (work_dir / RESULT).unlink(missing_ok=True)
    if plan.launcher == "inprocess":
        return _run_inprocess(spec)
    if plan.launcher == "external":
        return run_spec(spec) if plan.is_leader else (run_spec(spec) and None)
    if spec_path is None:
        # Other nodes keep their spec outside the work dir, which node 0 may still be resetting.
        spec_path = (
            work_dir / "launch_spec.json"
            if plan.is_leader
            else Path(tempfile.mkdtemp(prefix="minima-spec-")) / "spec.json"
        )
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    cmd = build_command(plan, spec_path, cfg.launch.hostfile)
    env = _child_env(plan)
    prefix = "DS_ACCELERATOR=cpu " if env.get("DS_ACCELERATOR") == "cpu" else ""
    log.info(f"launch ({plan.source}, node {plan.node_rank}/{plan.nnodes}): {prefix}{shlex.join(cmd)}")
    print(f"launch: {prefix}{shlex.join(cmd)}", flush=True)
    store = None
    if plan.nnodes > 1 and plan.launcher == "torchrun":
        from minima.train.guard import node_join

        store = node_join(
            plan.master_addr,
            plan.master_port,
            plan.nnodes,
            plan.node_rank,
            plan.nproc_per_node,
            cfg.launch.join_timeout_s,
            job=f"{cfg.stage}:{recipe or (extra or {}).get('entry', '')}",
        )
    try:
        if plan.launcher == "sbatch":
            from minima.train.slurm import run_slurm

            try:
                run_slurm(
                    cfg.stage,
                    ["-m", "minima.train.worker", str(spec_path)],
                    cfg.launch,
                    work_dir,
                    env={k: env[k] for k in ("PYTHONPATH",) if k in env},
                )
                rc = 0
            except TrainingError:
                _raise_rank_error(work_dir, 1, missing_ok=True, what=what)
                raise
        else:
            from minima.train.worker import die_with_parent

            rc = subprocess.call(cmd, env=env, preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
    finally:
        del store
    if rc != 0:
        _raise_rank_error(work_dir, rc, what=what)
    if plan.is_leader:
        res = work_dir / RESULT
        if not res.is_file():
            raise TrainingError(f"{what} finished without writing its result", where=str(res), fix="read the log above")
        return json.loads(res.read_text())
    return None


def launch_training(cfg, recipe: str, run, callbacks: list[str] = ()) -> dict:
    """The body of a training stage on node 0: run every rank, return the metrics for the manifest."""
    result = run_node(cfg, recipe, Path(run.work_dir), Path(run.out_dir), list(callbacks))
    return result or {}


def _check_plan(cfg, force: bool, launch_plan: Optional[Topology] = None) -> None:
    """Stop before launch when `minima plan` says the job will not fit (``--force`` overrides).

    A job sent to Slurm or ssh is planned for its nodes (``launch.gpu`` x ``gpus_per_node`` x
    ``nnodes``); only a local run is checked against this machine.
    """
    from minima.core.errors import PlanError
    from minima.train.plan import PlanOptions, check_fits

    lp = launch_plan or plan_launch(cfg)
    opts = PlanOptions.for_job(cfg, lp.launcher, lp.nproc_per_node, lp.nnodes)
    try:
        plan = check_fits(cfg, opts, force=force)
    except PlanError:
        raise
    except Exception as e:  # a model family the planner does not model (e.g. seq2seq): launch anyway
        log.warning("memory plan skipped: %s", str(e).splitlines()[0][:200])
        return
    log.info(
        "memory plan: %.2f GiB per device of %.0f GiB (%s)",
        plan.total_bytes / 2**30,
        plan.device_bytes / 2**30,
        plan.verdict(),
    )
    if not force and lp.launcher in ("inprocess", "torchrun", "external"):  # a cluster job writes to its own storage
        from minima.core.artifacts import check_free_space

        out = cfg.resolved_out_dir()
        check_free_space(out.parent if out.parent.exists() else Path("."), plan.disk_bytes, cfg.stage)


def train_stage(
    cfg,
    inputs: Mapping[str, Optional[str]],
    recipe: str,
    *,
    force: bool = False,
    callbacks: list[str] = (),
    validate=None,
):
    """A training stage's ``run``: node 0 publishes the artifact; other nodes/ranks only train.

    Args:
        cfg: the stage config. inputs: name -> path (cache key). recipe: ``"module:Class"``.
        force: rebuild even if a matching artifact exists.
        callbacks: ``"module:factory"`` strings; ``factory(cfg)`` returns an ``on_eval`` object.
        validate: optional no-argument callable run on node 0 before anything is created or launched.
    """
    from minima.core.artifacts import (
        Artifact,
        cache_key,
        hash_input,
        is_complete,
        read_manifest,
        run_stage,
    )

    plan = plan_launch(cfg)
    out_dir = cfg.resolved_out_dir()
    key = cache_key(cfg, {k: hash_input(v) for k, v in inputs.items()})
    cached = is_complete(out_dir) and read_manifest(out_dir).get("cache_key") == key and not force
    if plan.is_leader:
        # Validate before run_stage creates anything, so bad input leaves no directory behind.
        if validate is not None and not cached:
            validate()
        if not cached:
            _check_plan(cfg, force, plan)
        return run_stage(
            cfg, inputs, lambda run: launch_training(cfg, recipe, run, callbacks), force=force, resumable=True
        )
    if cached:
        return Artifact(out_dir, read_manifest(out_dir), skipped=True)
    work = out_dir.with_name(out_dir.name + ".partial")
    run_node(cfg, recipe, work, out_dir, list(callbacks), plan=plan)
    manifest = read_manifest(out_dir) if is_complete(out_dir) else {"stage": cfg.stage, "cache_key": key, "metrics": {}}
    return Artifact(out_dir, manifest)


# ------------------------------------------------------------------------------ stages that are not trained
#: Suffix of the directory beside a stage's out_dir that holds its job's spec, rank errors and Slurm log.
JOB_SUFFIX = ".job"


def _job_config(cfg, ranks: Optional[int]):
    """``cfg`` with its launch block cut to ``ranks`` processes on one node (a stage of fixed size)."""
    if ranks is None:
        return cfg
    lc = cfg.launch.model_copy(update={"nnodes": 1, "node_rank": 0, "nproc_per_node": ranks, "gpus_per_node": ranks})
    return cfg.model_copy(update={"launch": lc})


def runs_here(cfg, ranks: Optional[int] = None, env: Mapping[str, str] = os.environ) -> bool:
    """True when the stage's ranks run on this machine (checks of this machine's devices apply), False when
    ``launch.launcher`` sends them to Slurm's nodes or the hostfile's hosts."""
    if in_torchrun(env):
        return True
    return plan_launch(_job_config(cfg, ranks), env).launcher not in REMOTE_LAUNCHERS


def _cached_artifact(cfg, out_dir: Path, inputs: Mapping[str, Optional[str]]):
    """The complete, intact artifact with this config's cache key at ``out_dir``, else None (the job decides)."""
    from minima.core.artifacts import Artifact, cache_key, hash_input, is_complete, read_manifest, verify_files

    if not is_complete(out_dir):
        return None
    manifest = read_manifest(out_dir)
    key = cache_key(cfg, {k: hash_input(v) for k, v in inputs.items()})
    if manifest.get("cache_key") != key or verify_files(out_dir, manifest, getattr(cfg, "verify", "auto")):
        return None
    return Artifact(out_dir, manifest, skipped=True)


def stage_job(
    cfg,
    entry: str,
    force: bool = False,
    ranks: Optional[int] = None,
    inputs: Optional[Mapping[str, Optional[str]]] = None,
):
    """Run a stage that is not trained (prune, evaluate, the logit cache) as a job, like training runs.

    Returns None when this process should run the stage itself: it is already one rank of the job
    (torchrun's environment, which a Slurm job's torchrun sets too), the job is one process here
    (``launcher=local`` with one rank on one node), or a one-process stage (``ranks``) is called on the
    first task of a Slurm allocation or on rank 0 of a torchrun world; the other tasks and ranks wait for
    that artifact and return it. Otherwise starts ``entry(cfg, force=force)`` on every rank with
    training's machinery (torchrun here, an sbatch job, or the deepspeed launcher over ssh), waits,
    re-raises a rank's MinimaError with its message and fix, and returns the artifact the job published.
    The job's spec, rank errors and Slurm script and log live in ``<out_dir>.job/<host>-<pid>`` (removed
    on success).

    Args:
        cfg: the stage config; its ``launch`` block says where the ranks run.
        entry: ``"module:function"`` of the stage's run; inside the job it calls this again and gets None.
        force: passed on to ``entry``.
        ranks: a stage of fixed size (prune: 1) runs that many ranks on one node, whatever ``nnodes`` and
            ``gpus_per_node`` say for training; None: every rank of the launch block.
        inputs: name -> path as the stage hashes them: a matching complete artifact is reused without a job.
    """
    from minima.core.artifacts import _REPLACE_STALE, Artifact, read_manifest

    env = os.environ
    if in_torchrun(env):
        # A stage of fixed size started under a larger torchrun world runs on rank 0; the rest wait for it.
        if ranks is not None and int(env.get("WORLD_SIZE", "1")) > ranks and int(env.get("RANK", "0")) != 0:
            return await_artifact(cfg, inputs)
        return None
    cfg = _job_config(cfg, ranks)
    plan = plan_launch(cfg, env)
    if plan.source == "slurm" and ranks is not None:
        # Inside an allocation (srun starts this on every node): the first task runs it, the others wait.
        return None if int(env.get("SLURM_PROCID", "0")) == 0 else await_artifact(cfg, inputs)
    if plan.launcher == "inprocess" or (plan.launcher == "torchrun" and plan.nproc_per_node * plan.nnodes == 1):
        return None
    out_dir = cfg.resolved_out_dir()
    if inputs is not None and not force:
        cached = _cached_artifact(cfg, out_dir, inputs)
        if cached is not None:
            return cached
    # One job dir per invocation: a second run waiting on the same out_dir never touches this one's files.
    job_dir = out_dir.with_name(out_dir.name + JOB_SUFFIX) / f"{socket.gethostname()}-{os.getpid()}"
    extra = {"entry": entry, "force": bool(force), "replace_stale": bool(_REPLACE_STALE.get())}
    result = run_node(cfg, None, job_dir, out_dir, [], plan=plan, extra=extra)
    if not plan.is_leader:
        return published(cfg, out_dir)
    shutil.rmtree(job_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        job_dir.parent.rmdir()  # only when no other invocation's dir is left in it
    return Artifact(out_dir, read_manifest(out_dir), skipped=bool((result or {}).get("skipped")))


def published(cfg, out_dir: Path):
    """The artifact node 0 published, as another node sees it: a shared file system may show the directory a
    moment late, so a missing manifest gives an artifact with the stage only (as a training node's does)."""
    from minima.core.artifacts import Artifact, is_complete, read_manifest

    if is_complete(out_dir):
        return Artifact(out_dir, read_manifest(out_dir))
    return Artifact(out_dir, {"stage": cfg.stage, "metrics": {}})


def await_artifact(cfg, inputs: Optional[Mapping[str, Optional[str]]], poll_s: float = 2.0):
    """Wait (``launch.collective_timeout_s`` at most) until another rank or node publishes this stage's
    artifact with this config's cache key, and return it."""
    from minima.core.artifacts import Artifact, cache_key, hash_input, is_complete, read_manifest

    out_dir = cfg.resolved_out_dir()
    key = cache_key(cfg, {k: hash_input(v) for k, v in (inputs or {}).items()}) if inputs is not None else None
    timeout = cfg.launch.collective_timeout_s
    deadline = time.time() + timeout
    while True:
        if is_complete(out_dir):
            manifest = read_manifest(out_dir)
            if key is None or manifest.get("cache_key") == key:
                return Artifact(out_dir, manifest, skipped=True)
        if time.time() > deadline:
            raise TrainingError(
                f"waited {timeout}s for the {cfg.stage} artifact that rank 0 runs alone",
                where=str(out_dir),
                fix="read rank 0's (the first node's) log for its error; raise launch.collective_timeout_s "
                "if it was only slow",
            )
        time.sleep(poll_s)


def run_stage_ranks(cfg, inputs: Mapping[str, Optional[str]], work, finish, *, force: bool = False, **kw):
    """``run_stage`` for a stage every rank of a torchrun world works on (evaluate, the logit cache).

    Rank 0 decides under the out_dir's lock exactly as one process would (reuse, rebuild a damaged or a
    stale artifact, wait for another run, or an error) and tells the others: on "run" every rank calls
    ``work(work_dir)`` (collectives allowed), rank 0's ``finish(work_dir, its result)`` returns the metrics
    and the artifact is published; on "skip" every rank returns the artifact; an error is raised on every
    rank with rank 0's message. ``kw`` goes to ``run_stage`` (``resumable``, ``disk_estimate``).
    """
    import torch.distributed as dist

    from minima.core import errors as E
    from minima.core.artifacts import Artifact, read_manifest, run_stage

    out_dir = cfg.resolved_out_dir()
    if dist.get_rank() == 0:
        told = []

        def tell(msg) -> None:
            if not told:
                dist.broadcast_object_list([msg], src=0)
                told.append(msg)

        def body(run):
            tell(("run", str(run.work_dir)))
            return finish(Path(run.work_dir), work(Path(run.work_dir)))

        try:
            art = run_stage(cfg, inputs, body, force=force, **kw)
        except MinimaError as e:
            tell(("error", (type(e).__name__, e.what, e.where, e.fix)))
            raise
        except BaseException as e:
            tell(("error", ("TrainingError", f"rank 0: {type(e).__name__}: {e}", None, "read rank 0's log")))
            raise
        if told[0][0] == "run":
            dist.barrier()  # published: the others may read it
        else:
            tell(("skip", None))
        return art
    msg = [None]
    dist.broadcast_object_list(msg, src=0)
    kind, value = msg[0]
    if kind == "error":
        name, what, where, fix = value
        cls = getattr(E, name, None)
        cls = cls if isinstance(cls, type) and issubclass(cls, MinimaError) else TrainingError
        raise cls(what, where=where, fix=fix)
    if kind == "skip":
        return Artifact(out_dir, read_manifest(out_dir), skipped=True)
    work(Path(value))
    dist.barrier()
    return published(cfg, out_dir)
