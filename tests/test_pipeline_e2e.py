"""End to end: the real pipeline flow on the micro preset with the built-in demo data.

Every stage's artifact must exist and load; a second run must be a full cache hit with no training
subprocess started.
"""

import json
from pathlib import Path

import pytest

from minima.core.presets import get_preset
from minima.core.registry import pipeline_steps


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, prefect_ready):
    from flows.cli import demo_config, prepare_demo
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("e2e") / "run"
    prepare_demo(root)
    first = pipeline(config=demo_config(root), preset="micro")
    return root, first


def test_every_artifact_exists_and_loads(e2e):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, results = e2e
    assert set(results) == {s.key for s in pipeline_steps(get_preset("micro"))}  # the scratch arm is off in micro
    for key, r in results.items():
        assert (Path(r["path"]) / "manifest.json").is_file(), key
    tok = AutoTokenizer.from_pretrained(results["vocab"]["path"])
    for key in ("adapt", "prune", "distill", "sft"):
        model = AutoModelForCausalLM.from_pretrained(results[key]["path"])
        assert model.config.vocab_size == len(tok), key
    student = AutoModelForCausalLM.from_pretrained(results["prune"]["path"]).config
    assert student.num_hidden_layers == 3 and student.hidden_size == 96
    assert AutoTokenizer.from_pretrained(results["sft"]["path"]).chat_template
    report = (root / "report.md").read_text()
    assert "## Evaluation" in report and "## Pruning" in report
    assert (root / "report.html").is_file()
    ev = json.loads((Path(results["evaluate"]["path"]) / "results.json").read_text())
    assert set(ev["models"]) == {"teacher", "pruned", "distilled", "chat"}


def test_second_run_is_a_full_cache_hit(e2e, monkeypatch):
    import minima.train.launch as launch
    from flows.cli import demo_config
    from flows.pipeline import pipeline

    root, first = e2e

    def no_training(*a, **k):
        raise AssertionError("a training subprocess was started on a cached rerun")

    monkeypatch.setattr(launch, "launch_training", no_training)
    second = pipeline(config=demo_config(root), preset="micro")
    assert {k: r["state"] for k, r in second.items()} == dict.fromkeys(first, "Cached")
    assert {k: r["path"] for k, r in second.items()} == {k: r["path"] for k, r in first.items()}
