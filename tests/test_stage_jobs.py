"""prune, evaluate and the logit cache run as jobs on the launch block's ranks, as training does: a local
torchrun of two gloo ranks, or an sbatch job under the fake Slurm of _loopback. Each job's artifact is
compared with the one-process run's, and the launching process is checked never to load a model."""

from __future__ import annotations

import json

import _loopback as fake
import numpy as np
import pytest
import torch

from minima.core.config import DistillCacheConfig, EvaluateConfig, PruneConfig
from minima.core.errors import InputError


@pytest.fixture(scope="module")
def records(tmp_path_factory, demo_data_dir, tiny_tokenizer_dir):
    """LM records (seq 32) of the demo corpus in the tiny tokenizer: several train shards, a dev split."""
    from minima.core.config import RecordsConfig
    from minima.stages.records import run as build_records

    d = tmp_path_factory.mktemp("jobs")
    text = d / "text.txt"
    text.write_text("\n".join((demo_data_dir / "text" / "pretrain_en.txt").read_text().splitlines()[:300]) + "\n")
    cfg = RecordsConfig(
        inputs=str(text),
        tokenizer=str(tiny_tokenizer_dir),
        format="lm",
        max_length=32,
        dev_fraction=0.1,
        shard_size=40,
        out_dir=str(d / "records"),
    )
    rec = build_records(cfg).path
    assert len(list((rec / "train").glob("part-*.tfrecord"))) >= 3
    return rec


def _no_model_loads(monkeypatch):
    """Make every model loader of this (the launching) process raise."""
    import minima.compress.logit_cache as logit_cache
    import minima.models.loader as loader
    import minima.stages.evaluate as evaluate
    import minima.stages.prune as prune

    def refuse(*a, **k):
        raise AssertionError("the launching process loaded a model")

    for mod, names in (
        (loader, ("load_model_and_tokenizer", "load_model", "load_teacher")),
        (evaluate, ("load_model_and_tokenizer",)),
        (prune, ("load_model",)),
        (logit_cache, ("load_teacher",)),
    ):
        for name in names:
            monkeypatch.setattr(mod, name, refuse)


def _eval_tasks(demo_data_dir) -> dict:
    return {
        "demo_mc": {"path": str(demo_data_dir / "eval" / "demo_mc"), "limit": 16},
        "perplexity": {"path": str(demo_data_dir / "text"), "limit": 4, "max_length": 64},
    }


def _samples(path) -> list[dict]:
    return [json.loads(x) for x in (path / "samples.jsonl").read_text().splitlines()]


def test_evaluate_job_on_two_ranks_equals_one_process(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch, capsys):
    """`minima evaluate ... launch.nproc_per_node=2`: a 2-rank torchrun job scores the items; results and
    per-item loglikelihoods equal the one-process run, and the launching process loads no model."""
    from minima.cli import main
    from minima.stages.evaluate import run

    tasks = _eval_tasks(demo_data_dir)
    one = run(EvaluateConfig(model=str(tiny_model_dir), batch_size=4, tasks=tasks, out_dir=str(tmp_path / "one"))).path
    _no_model_loads(monkeypatch)
    overrides = [f"tasks.{t}.{k}={v}" for t, spec in tasks.items() for k, v in spec.items()]
    argv = ["evaluate", f"model={tiny_model_dir}", "batch_size=4", f"out_dir={tmp_path / 'two'}", *overrides]
    assert main([*argv, "launch.nproc_per_node=2"]) == 0
    out = capsys.readouterr().out
    assert "--nproc_per_node 2" in out and "minima.train.worker" in out  # a 2-rank job ran it
    two = tmp_path / "two"
    assert not (tmp_path / "two.job").exists()  # the job's spec dir is gone after success
    r1 = json.loads((one / "results.json").read_text())["models"]["tiny"]["tasks"]
    r2 = json.loads((two / "results.json").read_text())["models"]["tiny"]["tasks"]
    assert (r1["demo_mc"]["acc"], r1["demo_mc"]["acc_norm"]) == (r2["demo_mc"]["acc"], r2["demo_mc"]["acc_norm"])
    assert r2["perplexity"]["token_perplexity"] == pytest.approx(r1["perplexity"]["token_perplexity"], rel=1e-5)
    s1, s2 = _samples(one), _samples(two)
    mc1 = [s for s in s1 if s["task"] == "demo_mc"]
    mc2 = [s for s in s2 if s["task"] == "demo_mc"]
    assert len(mc1) == len(mc2) == 16
    for a, b in zip(mc1, mc2):
        assert a["where"] == b["where"] and a["pred"] == b["pred"]
        np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], rtol=0, atol=1e-5)
    assert main([*argv, "launch.nproc_per_node=2"]) == 0  # cached: no job is started
    assert "cached, skipped" in capsys.readouterr().out
    # A pipeline rerun after a config change replaces the stale artifact on several ranks as in one process.
    from minima.core.artifacts import read_manifest, replacing_stale
    from minima.core.config import LaunchConfig

    fewer = {**tasks, "demo_mc": {**tasks["demo_mc"], "limit": 8}}
    cfg = EvaluateConfig(
        model=str(tiny_model_dir), batch_size=4, tasks=fewer, out_dir=str(two), launch=LaunchConfig(nproc_per_node=2)
    )
    old_key = read_manifest(two)["cache_key"]
    with replacing_stale():
        art = run(cfg)
    assert not art.skipped and read_manifest(two)["cache_key"] != old_key
    assert len([s for s in _samples(two) if s["task"] == "demo_mc"]) == 8


def test_a_bad_input_in_the_job_comes_back_as_the_same_error(tmp_path, tiny_model_dir, demo_data_dir):
    """A task file that is not there: the 2-rank job's MinimaError is re-raised in the launcher with the
    in-process run's class, message and fix (the launcher's own checks are bypassed to reach the job)."""
    from minima.stages.evaluate import run
    from minima.train.launch import stage_job

    tasks = {"demo_mc": {"path": str(tmp_path / "missing.jsonl")}}
    cfg = EvaluateConfig(model=str(tiny_model_dir), tasks=tasks, out_dir=str(tmp_path / "e"))
    with pytest.raises(InputError) as here:
        run(cfg)
    job_cfg = cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"nproc_per_node": 2})})
    with pytest.raises(InputError) as job:
        stage_job(job_cfg, "minima.stages.evaluate:run")
    assert (job.value.what, job.value.fix) == (here.value.what, here.value.fix)
    assert job.value.where == "rank 0" + (f", {here.value.where}" if here.value.where else "")
    assert "\n" not in str(job.value)
    assert not (tmp_path / "e").exists()


def test_prune_job_under_fake_slurm_equals_in_process_prune(tmp_path, tiny_model_dir, records, monkeypatch):
    """prune with launch.launcher=slurm: one sbatch job of one node and one GPU (whatever the launch block
    says for training), no launcher accelerator in the script, and the same weights as an in-process prune."""
    from safetensors.torch import load_file

    from minima.stages.prune import run

    for k, v in fake.install(tmp_path).items():
        monkeypatch.setenv(k, v)
    base = dict(
        teacher=str(tiny_model_dir),
        records=str(records),
        num_samples=8,
        max_length=32,
        batch_size=4,
        num_layers=3,
        hidden_size=96,
        intermediate_size=192,
        device="cpu",
    )
    here = run(PruneConfig(out_dir=str(tmp_path / "here"), **base)).path
    _no_model_loads(monkeypatch)
    import minima.train.slurm as slurm

    scripts, render = [], slurm.render_sbatch

    def keep(*a, **k):  # the job dir holding the script is removed when the job succeeds
        path = render(*a, **k)
        scripts.append(path.read_text())
        return path

    monkeypatch.setattr(slurm, "render_sbatch", keep)
    launch = dict(launcher="slurm", nnodes=4, gpus_per_node=8, master_port=fake.free_port_pair())
    art = run(PruneConfig(out_dir=str(tmp_path / "job"), launch=launch, **base))
    assert art.path == tmp_path / "job" and not art.skipped
    a, b = load_file(here / "model.safetensors"), load_file(art.path / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((here / "importance.json").read_text()) == json.loads((art.path / "importance.json").read_text())
    (text,) = scripts
    assert "#SBATCH --nodes=1\n" in text and "#SBATCH --gpus-per-node=1\n" in text
    assert "--nnodes 1 --nproc_per_node 1" in text and "minima.train.worker" in text
    assert "DS_ACCELERATOR=" not in text and "unset DS_ACCELERATOR" in text
    assert list(fake.node_accelerators(tmp_path).values()) == ["unset"]  # one node, no login-node accelerator
    assert not (tmp_path / "job.job").exists()  # the job's spec, script and log are removed on success


def test_prune_sbatch_script_is_one_node_one_gpu(tmp_path, tiny_model_dir, records, monkeypatch):
    """The sbatch script a prune job renders: --nodes=1 --gpus-per-node=1, one rank, no DS_ACCELERATOR export."""
    from minima.core.errors import TrainingError
    from minima.stages.prune import run

    for k, v in fake.install(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/bash\necho 'no queue' >&2\nexit 1\n")
    cfg = PruneConfig(
        teacher=str(tiny_model_dir),
        records=str(records),
        num_layers=3,
        device="cuda",  # the nodes have GPUs; this machine's lack of one is not checked for a Slurm job
        launch=dict(launcher="slurm", nnodes=4, gpus_per_node=8),
        out_dir=str(tmp_path / "p"),
    )
    with pytest.raises(TrainingError, match="sbatch failed"):
        run(cfg)
    (script,) = (tmp_path / "p.job").glob("*/scripts/slurm/prune.sbatch")  # one dir per invocation
    text = script.read_text()
    assert "#SBATCH --nodes=1\n" in text and "#SBATCH --gpus-per-node=1\n" in text
    assert "--nnodes 1 --nproc_per_node 1" in text and "minima.train.worker" in text
    assert "DS_ACCELERATOR=" not in text and "unset DS_ACCELERATOR" in text


def test_cache_job_on_two_ranks_equals_one_process(tmp_path, tiny_model_dir, records, monkeypatch):
    """distill-cache with launch.nproc_per_node=2: both ranks write shards, the cache equals the
    one-process cache array for array, and the launching process never loads the teacher."""
    from minima.stages.distill import build_cache

    kw = dict(teacher=str(tiny_model_dir), records=str(records), top_k=8, dtype="fp32", batch_size=8, device="cpu")
    one = build_cache(DistillCacheConfig(out_dir=str(tmp_path / "one"), **kw)).path
    _no_model_loads(monkeypatch)
    two = build_cache(DistillCacheConfig(out_dir=str(tmp_path / "two"), launch={"nproc_per_node": 2}, **kw)).path
    a = sorted(p.relative_to(one) for p in one.glob("*/*/*.npy"))
    assert a == sorted(p.relative_to(two) for p in two.glob("*/*/*.npy")) and len(a) > 10
    for rel in a:
        assert np.array_equal(np.load(one / rel), np.load(two / rel)), rel
    assert json.loads((one / "cache.json").read_text()) == json.loads((two / "cache.json").read_text())
    writers = {json.loads(p.read_text())["rank"] for p in two.glob("*/*/done.json")}
    assert writers == {0, 1}
    assert {json.loads(p.read_text())["rank"] for p in one.glob("*/*/done.json")} == {0}


def test_no_nested_launch_inside_a_job(monkeypatch, tmp_path):
    """Inside torchrun (a job's rank), inside a Slurm allocation for a one-process stage, or with one local
    process, the stage runs in this process: stage_job returns None and starts nothing."""
    from minima.train import launch

    monkeypatch.setattr(launch, "run_node", lambda *a, **k: pytest.fail("a job was launched"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    slurm = EvaluateConfig(model="m", out_dir=str(tmp_path / "e"), launch={"launcher": "slurm", "nnodes": 2})
    assert launch.stage_job(EvaluateConfig(model="m", out_dir=str(tmp_path / "e")), "x:y") is None  # local, 1 rank
    with monkeypatch.context() as m:  # one rank of a torchrun job (the job's own worker, or the user's torchrun)
        m.setenv("RANK", "1"), m.setenv("WORLD_SIZE", "2"), m.setenv("LOCAL_RANK", "1"), m.setenv("MASTER_ADDR", "h")
        assert launch.stage_job(slurm, "x:y") is None
        assert launch.runs_here(slurm)
    with monkeypatch.context() as m:  # a node of a Slurm allocation with one GPU: evaluate runs here
        m.setenv("SLURM_JOB_ID", "7"), m.setenv("SLURM_NNODES", "1"), m.setenv("SLURM_GPUS_ON_NODE", "1")
        assert launch.stage_job(slurm, "x:y") is None
        m.setenv("SLURM_GPUS_ON_NODE", "8")  # prune is one process on whatever node it is called
        prune = PruneConfig(teacher="t", out_dir=str(tmp_path / "p"), launch={"launcher": "slurm", "nnodes": 2})
        assert launch.stage_job(prune, "x:y", ranks=1) is None
    assert not launch.runs_here(slurm) and not launch.runs_here(prune, ranks=1)  # a login node: sbatch


def test_distill_builds_its_cache_as_a_job_of_its_launch_block(monkeypatch, tmp_path, tiny_model_dir, records):
    """distill cache_logits=true hands the cache to stage_job with the distill config's launch block (the
    launcher does not build it); the launch block leaves the cache's key unchanged."""
    from minima.core.artifacts import cache_key
    from minima.core.config import DistillConfig
    from minima.stages import distill
    from minima.train import launch

    class Launched(Exception):
        pass

    seen = []

    def fake_job(cfg, entry, force=False, ranks=None, inputs=None):
        seen.append((cfg, entry, ranks, inputs))
        raise Launched

    monkeypatch.setattr(launch, "stage_job", fake_job)
    _no_model_loads(monkeypatch)
    cfg = DistillConfig(
        teacher=str(tiny_model_dir),
        student=str(tiny_model_dir),
        records=str(records),
        cache_logits=True,
        loss={"alpha": 0.5},
        cache_dir=str(tmp_path / "cache"),
        launch={"launcher": "slurm", "nnodes": 2, "gpus_per_node": 4},
    )
    with pytest.raises(Launched):
        distill.run(cfg)
    ((ccfg, entry, ranks, inputs),) = seen
    assert entry == "minima.stages.distill:build_cache" and ranks is None
    assert isinstance(ccfg, DistillCacheConfig) and ccfg.launch == cfg.launch
    assert inputs == {"teacher": str(tiny_model_dir), "records": str(records)}
    plain = ccfg.model_copy(update={"launch": DistillCacheConfig().launch})
    assert cache_key(ccfg, {}) == cache_key(plain, {})


def test_plan_sizes_prune_and_evaluate_for_the_job_gpu(capsys):
    """`minima plan prune|evaluate launch.launcher=slurm launch.gpu=A100-40G` plans against the nodes' GPU."""
    from minima.cli import main

    for stage in ("prune", "evaluate"):
        assert main(["plan", stage, "--preset", "minima-3b", "launch.launcher=slurm", "launch.gpu=A100-40G"]) == 0
        assert "of 40 GiB" in capsys.readouterr().out, stage
        assert main(["plan", stage, "--preset", "minima-3b", "launch.launcher=slurm", "launch.gpu=H200"]) == 0
        assert "of 141 GiB" in capsys.readouterr().out, stage


def test_fixed_size_stage_runs_once_in_a_larger_world(tmp_path, monkeypatch):
    """prune (one process) started on every node of an allocation, or on every rank of a torchrun world: the
    first task runs it, the others wait for its artifact (with this config's cache key) instead of pruning too."""
    from minima.core.artifacts import run_stage
    from minima.core.errors import TrainingError
    from minima.train.launch import stage_job

    teacher = tmp_path / "teacher.txt"
    teacher.write_text("weights")
    inputs = {"teacher": str(teacher)}
    cfg = PruneConfig(teacher=str(teacher), out_dir=str(tmp_path / "p"), launch={"collective_timeout_s": 1})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert stage_job(cfg, "minima.stages.prune:run", ranks=1, inputs=inputs) is None  # task 0 runs it
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(TrainingError, match="waited 1s for the prune artifact"):
        stage_job(cfg, "minima.stages.prune:run", ranks=1, inputs=inputs)
    run_stage(cfg, inputs, lambda run: (run.work_dir / "w.txt").write_text("pruned") and None)
    art = stage_job(cfg, "minima.stages.prune:run", ranks=1, inputs=inputs)
    assert art.skipped and (art.path / "w.txt").read_text() == "pruned"
    for k in ("SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NODEID", "SLURM_PROCID"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert stage_job(cfg, "minima.stages.prune:run", ranks=1, inputs=inputs).path == art.path  # rank 1 waits
    monkeypatch.setenv("RANK", "0")
    assert stage_job(cfg, "minima.stages.prune:run", ranks=1, inputs=inputs) is None  # rank 0 runs it
