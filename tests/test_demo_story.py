"""The demo's story pieces: the scratch arm in the DAG, prune init=random, the report, the honest loss curves,
and the demo world's held-out split."""

import json
from pathlib import Path

import pytest

from minima.core import registry
from minima.core.config import EvaluateConfig, PipelineConfig, PruneConfig
from minima.core.errors import ConfigError
from minima.core.presets import get_preset
from minima.core.registry import pipeline_steps, select_steps, step_config, step_out_dir


def active_steps(cfg: PipelineConfig) -> list[str]:
    return [s.key for s in pipeline_steps(cfg)]


# ------------------------------------------------------------------------------ the scratch arm in the DAG


def test_scratch_arm_is_on_in_the_demo_preset_only():
    assert {"prune_scratch", "distill_scratch"} <= set(active_steps(get_preset("tiny")))
    for cfg in (get_preset("micro"), get_preset("minima-3b"), PipelineConfig()):
        assert not {"prune_scratch", "distill_scratch"} & set(active_steps(cfg))
    off = pipeline_steps(PipelineConfig())
    keys = {s.key for s in off}
    assert select_steps(from_stage="distill", steps=off) == (keys, {"distill", "sft", "evaluate"})
    on = pipeline_steps(PipelineConfig(scratch=True))
    assert select_steps(from_stage="distill", steps=on)[1] == {"distill", "sft", "evaluate"}
    assert select_steps(from_stage="prune_scratch", steps=on)[1] == {"prune_scratch", "distill_scratch", "evaluate"}
    with pytest.raises(ConfigError, match="scratch=true"):
        select_steps(only_stage="prune_scratch", steps=off)


def test_scratch_steps_share_the_prune_and_distill_configs(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path), scratch=True)
    cfg.prune.out_dir = str(tmp_path / "my_prune")  # the arm never writes into the main step's dir
    up = {k: str(tmp_path / k) for k in ("vocab", "records_lm", "adapt", "prune", "prune_scratch")}
    ps = step_config(cfg, "prune_scratch", up)
    assert ps.init == "random" and ps.teacher == up["adapt"] and ps.records is None
    assert ps.num_layers == cfg.prune.num_layers and ps.out_dir == str(tmp_path / "04_prune_scratch")
    assert step_out_dir(cfg, "prune") == str(tmp_path / "my_prune")
    main = step_config(cfg, "distill", up)
    scratch = step_config(cfg, "distill_scratch", up)
    assert scratch.student == up["prune_scratch"] and main.student == up["prune"]
    same = {k: v for k, v in main.model_dump().items() if k not in ("student", "out_dir", "model")}
    assert {k: v for k, v in scratch.model_dump().items() if k in same} == same  # same recipe, same tokens
    up.update(distill=str(tmp_path / "d"), distill_scratch=str(tmp_path / "ds"), sft=str(tmp_path / "s"))
    ev = step_config(cfg, "evaluate", up)
    assert ev.models == {
        "teacher": up["adapt"],
        "pruned": up["prune"],
        "distilled": up["distill"],
        "scratch": up["distill_scratch"],
        "chat": up["sft"],
    }
    assert ev.chat_models == ["chat"]
    cfg.scratch = False
    assert "scratch" not in step_config(cfg, "evaluate", up).models


def test_chat_models_must_be_evaluated_models():
    with pytest.raises(ValueError, match="chat_models"):
        EvaluateConfig(models={"a": "x"}, chat_models=["b"])


def test_flow_runs_the_scratch_arm_on_fake_stages(tmp_path, monkeypatch, prefect_ready):
    """The real flow, stages faked: with scratch=true both arms build, and evaluate gets both students."""
    from tests import test_flow_mechanics as fm

    for stage in registry.STAGE_RUNNERS:
        monkeypatch.setitem(registry.STAGE_RUNNERS, stage, f"tests.test_flow_mechanics:FAKE_{stage}")
    fm.CALLS.clear()
    from flows.pipeline import pipeline

    res = pipeline(config={"run_dir": str(tmp_path / "run"), "scratch": True})
    assert sorted(fm.CALLS) == sorted(registry.STEP[k].out_name for k in active_steps(PipelineConfig(scratch=True)))
    assert "04_prune_scratch" in fm.CALLS and "05_distill_scratch" in fm.CALLS
    ev = json.loads((Path(res["evaluate"]["path"]) / "manifest.json").read_text())
    assert ev["config"]["models"]["scratch"] == res["distill_scratch"]["path"]
    fm.CALLS.clear()
    pipeline(config={"run_dir": str(tmp_path / "run"), "scratch": True}, from_stage="distill_scratch")
    assert fm.CALLS == ["05_distill_scratch", "07_evaluate"]


# ------------------------------------------------------------------------------ prune init=random


def test_prune_init_random_keeps_shape_and_tokenizer_not_weights(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from minima.stages.prune import run

    shape = dict(num_layers=3, num_heads=2, num_key_value_heads=2, hidden_size=64, intermediate_size=128)
    kw = dict(teacher=str(tiny_model_dir), importance="magnitude", layer_importance="drop_last", **shape)
    pruned = run(PruneConfig(out_dir=str(tmp_path / "p"), **kw))
    rand = [run(PruneConfig(out_dir=str(tmp_path / f"r{i}"), init="random", **kw)) for i in (0, 1)]
    other = run(PruneConfig(out_dir=str(tmp_path / "r2"), init="random", seed=1, **kw))
    p, r0, r1, r2 = (AutoModelForCausalLM.from_pretrained(a.path) for a in (pruned, *rand, other))
    drop = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}
    assert drop(p.config) == drop(r0.config)
    assert {k: v.shape for k, v in p.state_dict().items()} == {k: v.shape for k, v in r0.state_dict().items()}
    emb = "model.embed_tokens.weight"
    assert not torch.allclose(p.state_dict()[emb], r0.state_dict()[emb])  # not the teacher's weights
    assert all(torch.equal(r0.state_dict()[k], v) for k, v in r1.state_dict().items())  # seeded
    assert not torch.equal(r0.state_dict()[emb], r2.state_dict()[emb])
    assert (Path(rand[0].path) / "tokenizer_config.json").read_text() == (
        Path(pruned.path) / "tokenizer_config.json"
    ).read_text()
    assert rand[0].metrics["params_after"] == pruned.metrics["params_after"]


# ------------------------------------------------------------------------------ loss curves


def test_loss_series_puts_like_beside_like():
    from minima.train.metrics import loss_series

    distill = [
        {"split": "train", "step": 1, "loss": 0.4, "kd": 0.4, "ce": 1.3, "tokens": 100, "lr": 0.1},
        {"split": "train", "step": 2, "loss": 0.2, "kd": 0.2, "ce": 1.1, "tokens": 100, "lr": 0.1},
        {"split": "dev", "step": 2, "dev_loss": 1.2},
    ]
    c = loss_series(distill)
    assert c["train_ce"] == [(1, 1.3), (2, 1.1)] and c["dev_ce"] == [(2, 1.2)]
    assert c["terms"] == {"kd": [(1, 0.4), (2, 0.2)]} and c["objective"] == []
    assert c["tokens"] == [(1, 100.0), (2, 200.0)]
    mixed = [dict(r, loss=0.5 * r["ce"] + 0.5 * r["kd"]) if r["split"] == "train" else r for r in distill]
    assert loss_series(mixed)["objective"] == [(1, pytest.approx(0.85)), (2, pytest.approx(0.65))]
    adapt = [{"split": "train", "step": 1, "loss": 7.0, "tokens": 64}, {"split": "dev", "step": 1, "dev_loss": 6.5}]
    c = loss_series(adapt)
    assert c["train_ce"] == [(1, 7.0)] and c["terms"] == {} and c["dev_ce"] == [(1, 6.5)]


def test_plot_draws_a_kd_panel_beside_the_ce_panel(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from minima.train.metrics import plot_loss_curve

    made = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append((a, k)) or real(*a, **k))
    recs = [{"split": "train", "step": s, "loss": 1 / s, "kd": 1 / s, "ce": 2 / s, "tokens": 8} for s in range(1, 9)]
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert plot_loss_curve(m, tmp_path / "a.png").is_file()
    m.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("kd", "ce")}) + "\n" for r in recs))
    assert plot_loss_curve(m, tmp_path / "b.png").is_file()
    pref = [
        {"split": "train", "step": s, "loss": 0.7 / s, "rewards/margins": 0.1 * s, "rewards/chosen": -0.1, "tokens": 8}
        for s in range(1, 9)
    ] + [{"split": "dev", "step": 8, "dev_loss": 0.2, "rewards/margins": 0.6}]
    m.write_text("".join(json.dumps(r) + "\n" for r in pref))
    assert plot_loss_curve(m, tmp_path / "c.png").is_file()
    assert [a[:2] for a, _ in made] == [(1, 2), (1, 1), (1, 2)]


def test_preference_runs_plot_the_loss_beside_the_reward_margin():
    from minima.train.metrics import loss_series

    recs = [
        {"split": "train", "step": 1, "loss": 0.69, "rewards/margins": 0.0, "logps/chosen": -3.0, "tokens": 10},
        {"split": "train", "step": 2, "loss": 0.5, "rewards/margins": 0.4, "logps/chosen": -2.0, "tokens": 10},
        {"split": "dev", "step": 2, "dev_loss": 0.55, "rewards/margins": 0.3},
    ]
    c = loss_series(recs)
    assert c["preference"] and c["terms"] == {}  # rewards/..., logps/... are no loss terms
    assert c["train_ce"] == [(1, 0.69), (2, 0.5)] and c["dev_ce"] == [(2, 0.55)]
    assert c["margins"] == {"train": [(1, 0.0), (2, 0.4)], "dev": [(2, 0.3)]}


# ------------------------------------------------------------------------------ report


def _artifact(path: Path, stage: str, config: dict, metrics: dict) -> str:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(
        json.dumps({"stage": stage, "complete": True, "config": config, "metrics": metrics, "cache_key": "k"})
    )
    return str(path)


def test_report_shows_students_side_by_side_with_captions_and_examples(tmp_path):
    from minima.core.artifacts import is_complete
    from minima.stages.report import write_report

    ev = tmp_path / "07_evaluate"
    scores = {
        "teacher": (5.0, 0.8),
        "pruned": (9.0, 0.1),
        "distilled": (5.2, 0.75),
        "scratch": (6.5, 0.3),
        "chat": (5.5, 0.72),
    }
    res = {
        "models": {
            n: {
                "tasks": {
                    "perplexity": {"token_perplexity": p, "files": {}},
                    "demo_qa": {"exact_match_en": q, "exact_match_en_stderr": 0.1},
                }
            }
            for n, (p, q) in scores.items()
        }
    }
    _artifact(ev, "evaluate", {}, {})
    (ev / "results.json").write_text(json.dumps(res))
    samples = [
        {"model": "chat", "task": "demo_qa", "lang": "en", "question": "Q1?", "generation": " A1.", "gold": "A1"},
        {"model": "chat", "task": "demo_qa", "lang": "en", "question": "Q2?", "generation": " B.", "gold": "A2"},
        {"model": "teacher", "task": "demo_qa", "lang": "en", "question": "Q3?", "generation": "x", "gold": "y"},
    ]
    for s, ok in zip(samples, (1.0, 0.0, 0.0)):
        s["exact_match"] = ok
    (ev / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    d = _artifact(tmp_path / "05_distill", "distill", {"loss": {"alpha": 0.0, "kd": "forward_kl"}}, {"steps": 3})
    (Path(d) / "loss_curve.png").write_bytes(b"png")
    if not is_complete(ev):
        pytest.skip("manifest layout changed")
    results = {"evaluate": {"path": str(ev)}, "distill": {"path": d}}
    timing = [{"what": "minima demo", "wall_s": 100.4, "cpu_s": 180.6}]
    md = Path(write_report(tmp_path, results, timing=timing)["markdown"]).read_text()
    assert "| task | metric | teacher | pruned | pruned+distilled | scratch+distilled | chat |" in md
    assert "| perplexity | token_perplexity | 5 | 9 | 5.2 | 6.5 | 5.5 |" in md
    assert "| demo_qa | exact_match_en | 0.8 | 0.1 | 0.75 | 0.3 | 0.72 |" in md
    assert "**distill**: left: train CE" in md and "the KD term (forward_kl" in md
    assert "| ✓ | Q1? | A1. | A1 |" in md and "| ✗ | Q2? | B. | A2 |" in md and "Q3?" not in md
    assert "| minima demo | 100 | 181 |" in md


# ------------------------------------------------------------------------------ the demo world


def test_held_out_questions_and_text_are_never_trained_on(demo_data_dir):
    text = "\n".join((demo_data_dir / "text" / f"pretrain_{lang}.txt").read_text() for lang in ("en", "zh"))
    chat = json.loads((demo_data_dir / "chat" / "demo_chat.json").read_text())
    asked = {t["User"] for conv in chat for t in conv}
    qa = [json.loads(x) for x in (demo_data_dir / "eval/demo_qa/test.jsonl").read_text().splitlines()]
    dev = [json.loads(x) for x in (demo_data_dir / "eval/demo_qa/dev.jsonl").read_text().splitlines()]
    assert len(qa) >= 50 and {r["lang"] for r in qa} == {"en", "zh"}
    for r in qa:
        assert r["question"] not in text and r["question"] not in asked  # never asked anywhere in training
        assert r["reply"] in text  # but the fact is stated in the pretraining text
        assert r["answer"] in r["reply"]
    assert all(r["question"] in asked for r in dev)  # shots come from chat-train facts
    from minima.data import demo

    c = demo.generate()  # the fixture's corpus (seed 0)
    for lang in ("en", "zh"):
        train_docs = set((demo_data_dir / "text" / f"pretrain_{lang}.txt").read_text().splitlines())
        held = getattr(c, f"heldout_{lang}")
        assert len(held) >= 100 and not train_docs & set(held)
        assert (demo_data_dir / "heldout" / f"heldout_{lang}.txt").read_text() == demo.SEP[lang].join(held)
