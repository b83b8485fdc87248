"""Iterative compression rounds in the pipeline: the DAG, each round's config, caching (fake stages that
build in milliseconds; the real prune and distill stages run on a tiny pair in the last test)."""

from __future__ import annotations

import pytest

from minima.core import registry
from minima.core.artifacts import read_manifest, run_stage
from minima.core.config import PipelineConfig
from minima.core.errors import ConfigError

CALLS: list[str] = []
INPUT_FIELDS = ("tokenizer", "model", "records", "teacher", "student")
SEEN: dict[str, dict] = {}


def _fake_runner(stage):
    def run(cfg, force=False):
        inputs = {f: getattr(cfg, f) for f in INPUT_FIELDS if getattr(cfg, f, None)}
        inputs.update({f"models.{k}": v for k, v in (getattr(cfg, "models", None) or {}).items()})

        def body(r):
            CALLS.append(cfg.resolved_out_dir().name)
            SEEN[cfg.resolved_out_dir().name] = cfg.model_dump()
            (r.work_dir / "weights.txt").write_text(f"{stage} seed={cfg.seed}")
            return {"loss": 1.0}

        return run_stage(cfg, inputs, body, force=force)

    return run


for _stage in registry.STAGE_RUNNERS:
    globals()[f"FAKE_{_stage}"] = _fake_runner(_stage)


@pytest.fixture
def fake_stages(monkeypatch):
    for stage in registry.STAGE_RUNNERS:
        monkeypatch.setitem(registry.STAGE_RUNNERS, stage, f"{__name__}:FAKE_{stage}")
    CALLS.clear()
    SEEN.clear()
    yield


SMALL = {"hidden_size": 64, "num_heads": 2, "num_key_value_heads": 2, "intermediate_size": 128}
ROUNDS = {
    "compress": {
        "rounds": [
            {"tokens": 4096, "prune": {"num_layers": 3, "hidden_size": 96}},
            {"tokens": 8192, "prune": dict(SMALL, num_layers=2), "distill": {"lr": 5e-4}},
        ]
    }
}


def _pipeline(tmp_path, extra=None) -> PipelineConfig:
    from minima.core.config import deep_merge

    data = deep_merge({"run_dir": str(tmp_path / "run"), "records_lm": {"max_length": 64}}, ROUNDS)
    return PipelineConfig.model_validate(deep_merge(data, extra or {}))


def test_round_steps_and_configs(tmp_path):
    p = _pipeline(tmp_path)
    steps = {s.key: s for s in registry.pipeline_steps(p)}
    keys = [s.key for s in registry.pipeline_steps(p)]
    assert keys.index("prune_r1") < keys.index("distill_r1") < keys.index("prune") < keys.index("distill")
    assert steps["prune"].needs == ("distill_r1", "records_lm") and steps["distill"].needs[0] == "distill_r1"
    run = str(tmp_path / "run")
    up = {"adapt": f"{run}/03_adapt", "records_lm": f"{run}/02_records_lm"}
    c1 = registry.step_config(p, "prune_r1", up)
    assert (c1.teacher, c1.num_layers, c1.hidden_size) == (f"{run}/03_adapt", 3, 96)
    assert str(c1.resolved_out_dir()) == f"{run}/04_prune_r1"
    d1 = registry.step_config(p, "distill_r1", {**up, "prune_r1": f"{run}/04_prune_r1"})
    # tokens 4096 at micro batch 4 x 1 x 1 rank x 64 tokens = 16 steps
    assert (d1.teacher, d1.student, d1.max_steps) == (f"{run}/03_adapt", f"{run}/04_prune_r1", 16)
    c2 = registry.step_config(p, "prune", {**up, "distill_r1": f"{run}/05_distill_r1"})
    assert (c2.teacher, c2.num_layers, c2.hidden_size) == (f"{run}/05_distill_r1", 2, 64)
    d2 = registry.step_config(p, "distill", {**up, "distill_r1": f"{run}/05_distill_r1", "prune": f"{run}/04_prune"})
    assert (d2.teacher, d2.student, d2.max_steps, d2.lr) == (f"{run}/05_distill_r1", f"{run}/04_prune", 32, 5e-4)
    # the adapted teacher for every round's distill on request
    po = _pipeline(tmp_path, {"compress": {"teacher": "original"}})
    d2o = registry.step_config(po, "distill", {**up, "distill_r1": f"{run}/05_distill_r1", "prune": f"{run}/04_prune"})
    assert d2o.teacher == f"{run}/03_adapt"
    # a budget passes through to prune only when prune takes one
    from minima.core.config import PruneConfig

    pb = _pipeline(tmp_path, {"compress": {"rounds": [{"target_params": 1e6}, {"target_params": 5e5}]}})
    if "target_params" in PruneConfig.model_fields:
        assert registry.step_config(pb, "prune_r1", up).target_params == 1e6
    else:
        with pytest.raises(ConfigError, match="target_params"):
            registry.step_config(pb, "prune_r1", up)


def test_two_round_flow_caches_each_round(tmp_path, fake_stages, prefect_ready):
    """Two prune + distill artifact pairs; round 2 prunes round 1's student; a rerun is all cache hits."""
    from flows.pipeline import pipeline

    cfg = _pipeline(tmp_path).model_dump(mode="json")
    r1 = pipeline(config=cfg)
    assert {"04_prune_r1", "05_distill_r1", "04_prune", "05_distill"} <= set(CALLS)
    assert (
        CALLS.index("04_prune_r1") < CALLS.index("05_distill_r1") < CALLS.index("04_prune") < CALLS.index("05_distill")
    )
    run = tmp_path / "run"
    assert read_manifest(run / "04_prune")["inputs"]["teacher"]["path"] == str(run / "05_distill_r1")
    assert read_manifest(run / "05_distill")["inputs"]["student"]["path"] == str(run / "04_prune")
    assert read_manifest(run / "07_evaluate")["inputs"]["models.distilled"]["path"] == str(run / "05_distill")
    assert SEEN["04_prune_r1"]["num_layers"] == 3 and SEEN["04_prune"]["num_layers"] == 2
    assert all(r["state"] == "Completed" for r in r1.values())
    report = (run / "report.md").read_text()
    assert "## Compression rounds" in report and "\n| 2 |" in report and "\n| 3 |" not in report

    CALLS.clear()
    r2 = pipeline(config=cfg)
    assert CALLS == [] and all(r["state"] == "Cached" for r in r2.values())

    CALLS.clear()
    pipeline(config=cfg, from_stage="distill_r1")  # a round reruns with everything after it
    assert CALLS == ["05_distill_r1", "04_prune", "05_distill", "06_sft", "07_evaluate"]


def test_plan_sizes_every_round(tmp_path, capsys):
    """`minima plan pipeline` with rounds: a plan per step; round 2 prunes (and is taught by) round 1's student."""
    from minima.train.plan import PlanOptions, plan_schedule

    p = _pipeline(tmp_path)
    plans = dict(plan_schedule(p, PlanOptions(device="cpu", gpus=1), "tiny"))
    assert list(plans) == ["prune_r1", "distill_r1", "prune", "distill"]
    rows = {k: dict(v.rows) for k, v in plans.items()}
    assert (
        rows["prune"]["teacher params"] == rows["prune_r1"]["pruned params"] == rows["distill_r1"]["params"].split()[0]
    )
    assert rows["distill"]["teacher params"] == rows["distill_r1"]["params"].split()[0]
    assert rows["distill"]["layers / hidden / heads / ffn"].startswith("2 / 64 /")
    assert any(k.startswith("time for 8.19K tokens") for k in rows["distill"])

    from minima.train.plan import main

    cfg = tmp_path / "rounds.yaml"
    cfg.write_text(
        "compress:\n  rounds:\n    - {tokens: 4096, prune: {num_layers: 3, hidden_size: 96}}\n"
        "    - {tokens: 8192, prune: {num_layers: 2, hidden_size: 64, num_heads: 2, num_key_value_heads: 2}}\n"
    )
    assert main(["pipeline", "--preset", "tiny", "--config", str(cfg), "plan.device=cpu", "plan.gpus=1"]) == 0
    out = capsys.readouterr().out
    assert "round 1/2: prune_r1" in out and "round 2/2: distill" in out
