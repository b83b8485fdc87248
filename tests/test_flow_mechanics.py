"""The pipeline flow's caching and rerun rules, on fake stages that build in milliseconds.

The real stages are exercised end to end in test_pipeline_e2e.py; here every rule of the DAG is
checked cheaply: cache hits, --from-stage, a changed field, a failing stage, --only-stage.
"""

import pytest

from minima.core import registry
from minima.core.artifacts import run_stage
from minima.core.registry import STEPS, downstream, select_steps

CALLS: list[str] = []
FAIL: set[str] = set()
INPUT_FIELDS = ("tokenizer", "model", "records", "teacher", "student")


def _fake_runner(stage):
    def run(cfg, force=False):
        inputs = {f: getattr(cfg, f) for f in INPUT_FIELDS if getattr(cfg, f, None)}
        inputs.update({f"models.{k}": v for k, v in (getattr(cfg, "models", None) or {}).items()})

        def body(r):
            CALLS.append(cfg.resolved_out_dir().name)
            if cfg.resolved_out_dir().name in FAIL:
                raise RuntimeError(f"injected failure in {stage}")
            (r.work_dir / "weights.txt").write_text(f"{stage} seed={cfg.seed}")
            return {"loss": 1.0}

        return run_stage(cfg, inputs, body, force=force)

    return run


@pytest.fixture
def fake_stages(monkeypatch):
    for stage in registry.STAGE_RUNNERS:
        monkeypatch.setitem(registry.STAGE_RUNNERS, stage, f"{__name__}:FAKE_{stage}")
    CALLS.clear()
    FAIL.clear()
    yield


for _stage in registry.STAGE_RUNNERS:
    globals()[f"FAKE_{_stage}"] = _fake_runner(_stage)


def _run(tmp_path, **kw):
    from flows.pipeline import pipeline

    overrides = kw.pop("overrides", [])
    return pipeline(config={"run_dir": str(tmp_path / "run")}, overrides=overrides, **kw)


def test_select_steps():
    assert downstream("distill") == ["distill", "sft", "evaluate"]
    assert downstream("records_chat") == ["records_chat", "sft", "evaluate"]
    run, forced = select_steps(from_stage="distill")
    assert forced == {"distill", "sft", "evaluate"} and len(run) == len(STEPS)
    assert select_steps(only_stage="records") == ({"records_lm", "records_chat"},) * 2


def test_cache_from_stage_changed_field_and_failure(tmp_path, fake_stages, prefect_ready):
    r1 = _run(tmp_path)
    assert sorted(CALLS) == sorted(s.out_name for s in STEPS if not s.switch)  # every stage built once
    assert all(r["state"] == "Completed" for r in r1.values())

    CALLS.clear()
    r2 = _run(tmp_path)
    assert CALLS == [] and all(r["state"] == "Cached" for r in r2.values())  # a full cache hit

    CALLS.clear()
    _run(tmp_path, from_stage="distill")
    assert CALLS == ["05_distill", "06_sft", "07_evaluate"]

    CALLS.clear()
    _run(tmp_path, overrides=["distill.loss.temperature=2"])
    assert CALLS == ["05_distill", "06_sft", "07_evaluate"]  # only distill and what follows

    # a failure in sft leaves every earlier artifact intact; the rerun resumes at sft
    CALLS.clear()
    FAIL.add("06_sft")
    with pytest.raises(RuntimeError, match="injected failure in sft"):
        _run(tmp_path, overrides=["distill.loss.temperature=2", "sft.lr=1e-5"])
    assert CALLS == ["06_sft"]
    assert (tmp_path / "run/05_distill/manifest.json").is_file()
    assert (tmp_path / "run/06_sft/weights.txt").read_text() == "sft seed=0"  # previous sft artifact kept
    FAIL.clear()
    CALLS.clear()
    _run(tmp_path, overrides=["distill.loss.temperature=2", "sft.lr=1e-5"])
    assert CALLS == ["06_sft", "07_evaluate"]

    CALLS.clear()
    _run(tmp_path, overrides=["distill.loss.temperature=2", "sft.lr=1e-5"], only_stage="prune", force=True)
    assert CALLS == ["04_prune"]
    assert (tmp_path / "run/report.md").is_file()


def test_forked_children_exit_cleanly_after_a_flow(prefect_ready):
    """A process that ran a flow can still fork workers (DataLoader, records pool) that exit 0."""
    import multiprocessing as mp

    import tasks._common  # noqa: F401  (installs the at-fork fix)

    p = mp.get_context("fork").Process(target=print, args=("child",))
    p.start()
    p.join()
    assert p.exitcode == 0


def test_optional_dpo_step(tmp_path, fake_stages, prefect_ready):
    """dpo.enabled adds records_pref -> dpo after sft; evaluate then compares the dpo model; from/only/force work."""
    import pytest

    from minima.core.artifacts import read_manifest
    from minima.core.errors import ConfigError
    from minima.core.registry import ALL_STEPS

    on = ["dpo.enabled=true"]
    r = _run(tmp_path, overrides=on)
    assert set(r) == {s.key for s in ALL_STEPS if s.switch in (None, "dpo")} and {"06_records_pref", "06_dpo"} <= set(
        CALLS
    )
    inputs = read_manifest(tmp_path / "run/07_evaluate")["inputs"]
    assert inputs["models.dpo"]["path"] == str(tmp_path / "run/06_dpo")
    assert read_manifest(tmp_path / "run/06_records_pref")["inputs"]["tokenizer"]["path"] == str(
        tmp_path / "run/06_sft"
    )
    CALLS.clear()
    _run(tmp_path, overrides=on, from_stage="dpo")
    assert CALLS == ["06_dpo", "07_evaluate"]
    CALLS.clear()
    _run(tmp_path, overrides=[*on, "dpo.loss.beta=0.2"])
    assert CALLS == ["06_dpo", "07_evaluate"]
    CALLS.clear()
    _run(tmp_path, overrides=on, only_stage="dpo", force=True)
    assert CALLS == ["06_dpo"]
    CALLS.clear()
    _run(tmp_path)  # off again: evaluate goes back to comparing the default models
    assert CALLS == ["07_evaluate"] and "models.dpo" not in read_manifest(tmp_path / "run/07_evaluate")["inputs"]
    with pytest.raises(ConfigError, match="dpo.enabled"):
        select_steps(only_stage="dpo")
    with pytest.raises(ConfigError, match="dpo.enabled"):
        select_steps(from_stage="records_pref")
    assert select_steps(only_stage="records")[0] == {"records_lm", "records_chat"}
