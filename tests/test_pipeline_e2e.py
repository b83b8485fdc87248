"""End to end: the real pipeline flow on the micro preset with the built-in demo data.

Every stage's artifact must exist and load; a second run must be a full cache hit with no training
subprocess started.
"""

import json
from pathlib import Path

import pytest

from minima.core.registry import ALL_STEPS, pipeline_steps


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
    from flows.cli import demo_config
    from flows.pipeline import resolve_config

    cfg = resolve_config(demo_config(root), "micro")
    assert not cfg.scratch and cfg.dpo.enabled  # the demo runs dpo; the scratch arm is off in micro
    assert set(results) == {s.key for s in pipeline_steps(cfg)}
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
    assert set(ev["models"]) == {"teacher", "pruned", "distilled", "chat", "dpo"}


def test_each_stage_consumed_its_predecessors(e2e):
    """Every step's manifest names each upstream artifact of the DAG as an input, by its path and with the
    hash that is that artifact's cache key (so a changed upstream changes every key downstream)."""
    root, results = e2e
    manifests = {k: json.loads((Path(r["path"]) / "manifest.json").read_text()) for k, r in results.items()}
    by_path = {Path(r["path"]).resolve(): k for k, r in results.items()}
    for step in [s for s in ALL_STEPS if s.key in results]:
        inputs = manifests[step.key]["inputs"]
        consumed = {}
        for name, inp in inputs.items():
            if inp["path"] is None:
                continue
            up = by_path.get(Path(inp["path"]).resolve())
            if up is not None:
                assert inp["hash"] == manifests[up]["cache_key"], (step.key, name, up)
                consumed[up] = name
        assert set(step.needs) <= set(consumed), (step.key, step.needs, inputs)


def _dev_perplexity(model_dir: str, records: str) -> float:
    """Token-weighted perplexity on the records' dev split (held out of every training stage)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from minima.data.records import RecordDataset, collate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ds = RecordDataset(records, "dev", shuffle_buffer=0)
    rows = list(ds)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            b = collate(rows[i : i + 16])
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            keep = labels != -100
            nll += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            n += int(keep.sum())
    assert n > 1000, n
    return math.exp(nll / n)


def test_distilled_beats_pruned_on_held_out_perplexity(e2e):
    """Distillation recovers what pruning lost: on the dev split of the lm records (never trained on), the
    distilled student's perplexity is below the pruned student's it starts from."""
    root, results = e2e
    rec = results["records_lm"]["path"]
    ppl = {k: _dev_perplexity(results[k]["path"], rec) for k in ("adapt", "prune", "distill")}
    print("held-out perplexity:", {k: round(v, 2) for k, v in ppl.items()})
    assert ppl["distill"] < ppl["prune"]


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
