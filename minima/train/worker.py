"""The per-rank entry point: ``python -m minima.train.worker SPEC.json`` (started by torchrun).

The spec (written by ``launch.py``) names the config class and its values, the recipe, the work and
output dirs and the callbacks; or, for a stage that is not trained (prune, evaluate, the logit cache),
an ``entry`` (``"module:function"``) that every rank calls with the config. A MinimaError in any rank
is written to ``<work_dir>/errors/`` so the launcher can re-raise it with its message and fix; rank 0
writes the result to ``train_result.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

RESULT = "train_result.json"
ERRORS = "errors"


def import_obj(target: str):
    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _quiet_logs(strategy: str) -> None:
    import logging

    if strategy == "deepspeed":
        try:
            from deepspeed.utils import logger as ds_logger

            ds_logger.setLevel(os.environ.get("MINIMA_DS_LOG_LEVEL", "WARNING"))
        except Exception:
            pass
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)


def init_distributed(timeout_s: int, strategy: str = "deepspeed") -> None:
    """Join the process group (gloo on CPU, nccl on GPU); ``timeout_s`` bounds every collective.

    DeepSpeed joins through its own wrapper (it keeps a handle on the group); FSDP needs only torch.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if strategy == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
    else:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def run_spec(spec: dict) -> dict:
    """Run one rank of the job described by ``spec`` (a training recipe, or a stage's ``entry``); returns its result."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("MINIMA_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["MINIMA_NUM_THREADS"]))
    cfg = import_obj(spec["config_class"]).model_validate(spec["config"])
    if spec.get("entry"):
        return _run_entry(spec, cfg)
    from minima.core.errors import MinimaError, TrainingError
    from minima.train import guard, loop
    from minima.train.recipe import TrainContext

    _quiet_logs(cfg.strategy)
    work_dir, out_dir = Path(spec["work_dir"]), Path(spec["out_dir"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        init_distributed(cfg.launch.collective_timeout_s, cfg.strategy)
        _quiet_logs(cfg.strategy)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        from minima.train.model_init import configure_backends

        configure_backends(device)
        ctx = TrainContext(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            device=device,
            dtype=torch.float32,
            work_dir=work_dir,
            out_dir=out_dir,
            seed=cfg.seed,
        )
        recipe = import_obj(spec["recipe"])(cfg)
        callbacks = [import_obj(c)(cfg) for c in spec.get("callbacks", [])]
        callbacks = list(recipe.build_callbacks(ctx)) + callbacks
        beat = guard.Heartbeat(rank, world)
        try:
            result = loop.train(cfg, recipe, ctx, callbacks, heartbeat=beat)
        except Exception as e:
            if world > 1 and not isinstance(e, MinimaError) and guard.is_timeout(e):
                who = beat.laggards() or "the other ranks did not answer"
                raise TrainingError(
                    f"a collective timed out after {cfg.launch.collective_timeout_s}s on rank {rank}: {who}",
                    fix="look at that rank's log for its error; raise launch.collective_timeout_s if it was only slow",
                ) from e
            raise
    except MinimaError as e:
        _write_error(work_dir, rank, e)
        raise
    if rank == 0:
        (work_dir / RESULT).write_text(json.dumps(result, indent=2, default=str))
    return result


def _run_entry(spec: dict, cfg) -> dict:
    """One rank of a stage job: join the process group, then ``entry(cfg, force=...)`` as a torchrun rank would.

    The stage sees torchrun's environment, so it runs its share here instead of launching again. Rank 0
    writes ``{"path", "skipped"}`` of the artifact for the launcher.
    """
    import contextlib

    import torch

    from minima.core.errors import MinimaError

    work_dir = Path(spec["work_dir"])
    rank = int(os.environ.get("RANK", "0"))
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_distributed(cfg.launch.collective_timeout_s, "torch")
        from minima.core.artifacts import replacing_stale

        with replacing_stale() if spec.get("replace_stale") else contextlib.nullcontext():
            art = import_obj(spec["entry"])(cfg, force=bool(spec.get("force")))
    except MinimaError as e:
        _write_error(work_dir, rank, e)
        raise
    result = {"path": str(art.path), "skipped": bool(art.skipped)}
    if rank == 0:
        (work_dir / RESULT).write_text(json.dumps(result))
    return result


def _write_error(work_dir: Path, rank: int, e) -> None:
    try:
        d = work_dir / ERRORS
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{rank:05d}.json").write_text(
            json.dumps({"class": type(e).__name__, "what": e.what, "where": e.where, "fix": e.fix, "rank": rank})
        )
    except OSError:
        pass


def die_with_parent() -> None:
    """Linux: get SIGKILL when the launching process dies.

    torchrun starts workers in their own session, so killing the launcher (OOM killer, a cancelled
    job, SIGKILL) would otherwise leave them training on, racing a rerun in the same directory.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        parent = os.getppid()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    except OSError:
        pass


def parse_args(argv: list[str]):
    """``SPEC.json`` plus the ``--local_rank=N`` the deepspeed launcher appends to every rank's command."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m minima.train.worker")
    p.add_argument("spec", help="the launch spec written by minima.train.launch")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse printed the usage
        return int(e.code or 2)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))  # the launcher's env, when set, agrees
    spec = json.loads(Path(args.spec).read_text())
    from minima.core.errors import MinimaError

    try:
        run_spec(spec)
    except MinimaError as e:
        print(f"error [rank {os.environ.get('RANK', '0')}]: {e}", file=sys.stderr)
        return 3
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
