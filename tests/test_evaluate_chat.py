"""LLM-judged chat tasks inside `minima evaluate`: a real `minima serve` judge on loopback, scores as parsed,
resume after a failed attempt, pairwise win rate, and bad settings rejected before any model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import _chat_server as cs
import pytest

from minima.core.config import EvaluateConfig, build
from minima.core.errors import ConfigError, InputError
from minima.evaluate.judge import combine_swap, parse_score, parse_verdict
from minima.infer.api_client import ApiError

MT = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
    {
        "question_id": 111,
        "category": "math",
        "turns": ["What is 12 * 12?", "And 13 * 13?"],
        "reference": ["144", "169"],
    },
]
WRONG_KEY_ENV = "MINIMA_TEST_WRONG_KEY"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer_dir):
    model_dir = cs.chat_model_dir(tmp_path_factory, tiny_tokenizer_dir)
    return cs.server(model_dir), model_dir


def _args(srv, model_dir, qfile, demo_data_dir, out, *extra) -> list[str]:
    return [
        f"model={model_dir}",
        f"out_dir={out}",
        "tasks=[demo_mc,mt_bench]",
        f"tasks.mt_bench.path={qfile}",
        f"tasks.demo_mc.path={demo_data_dir / 'eval' / 'demo_mc'}",
        "tasks.demo_mc.limit=8",
        "shots=0",
        f"judge_base_url={srv.base_url}",
        f"judge_model={model_dir.name}",
        "judge_max_tokens=16",
        "judge_concurrency=2",
        "chat_max_new_tokens=12",
        "chat_temperature=0",
        *extra,
    ]


def test_mt_bench_in_evaluate_stage_resumes_and_reports_parsed_scores(tmp_path, served, demo_data_dir):
    """The tiny model answers in process and judges itself over HTTP. A first attempt with a wrong key fails
    at the judge; the rerun reuses the answers JSONL kept in <out_dir>.partial, and the reported score is the
    mean of what parse_score reads from the judge texts, with unparseable rows counted."""
    from minima.stages.evaluate import run

    srv, model_dir = served
    qfile = _jsonl(tmp_path / "question.jsonl", MT)
    out = tmp_path / "eval"
    os.environ[WRONG_KEY_ENV] = "sk-not-the-key"
    with pytest.raises(ApiError, match="401"):
        run(
            build(
                EvaluateConfig,
                overrides=_args(srv, model_dir, qfile, demo_data_dir, out, f"judge_api_key_env={WRONG_KEY_ENV}"),
            )
        )
    partial = out.with_name("eval.partial")
    answers = partial / "chat" / "mt_bench" / "answers" / f"{model_dir.name}.jsonl"
    first = answers.read_text(encoding="utf-8")
    assert len(_rows(answers)) == 2 and not (out / "manifest.json").exists()

    art = run(
        build(
            EvaluateConfig,
            overrides=_args(srv, model_dir, qfile, demo_data_dir, out, f"judge_api_key_env={cs.KEY_ENV}"),
        )
    )
    chat_dir = out / "chat" / "mt_bench"
    assert (chat_dir / "answers" / answers.name).read_text(encoding="utf-8") == first  # not answered again
    judged = _rows(chat_dir / "judgments" / f"single_{model_dir.name}.jsonl")
    assert len(judged) == 4 and all(r["judgment"] for r in judged)  # 2 questions x 2 turns
    parsed = [parse_score(r["judgment"]) for r in judged]
    good = [s for s in parsed if s is not None]

    results = json.loads((out / "results.json").read_text())
    tasks = results["models"][model_dir.name]["tasks"]
    mt = tasks["mt_bench"]
    assert mt["unparseable"] == parsed.count(None) and mt["judged"] == 4
    if good:
        assert mt["score"] == pytest.approx(sum(good) / len(good))
    else:
        assert mt["score"] is None
    assert mt["info"]["kind"] == "chat" and mt["info"]["n"] == 2 and mt["info"]["dir"] == "chat/mt_bench"
    assert set(mt["per_category"]) == {"math", "writing", "all"}
    assert "acc" in tasks["demo_mc"] and tasks["demo_mc"]["info"]["n"] == 8  # the benchmark ran next to it
    assert art.metrics[f"{model_dir.name}/mt_bench/unparseable"] == parsed.count(None)
    report = (out / "report.md").read_text()
    shown = "–" if not good else f"{sum(good) / len(good):.4g}"
    assert f"| mt_bench | score | judge single | 0 | 2 | {shown}" in report
    assert f"| mt_bench | unparseable | judge single | 0 | 2 | {parsed.count(None)} |" in report
    assert "## mt_bench: judged by" in report and "| **all** |" in report
    assert not partial.exists()

    # pairwise against a baseline answer file (here: the model's own answers), both orders per turn
    pair_out = tmp_path / "pair"
    base = chat_dir / "answers" / answers.name
    art2 = run(
        build(
            EvaluateConfig,
            overrides=_args(
                srv,
                model_dir,
                qfile,
                demo_data_dir,
                pair_out,
                f"judge_api_key_env={cs.KEY_ENV}",
                "chat_mode=pairwise",
                f"baseline_answers={base}",
            ),
        )
    )
    rows = _rows(next((pair_out / "chat" / "mt_bench" / "judgments").glob("pairwise_*.jsonl")))
    assert len(rows) == 8 and all(r["verdict"] == parse_verdict(r["judgment"]) for r in rows)
    by = {}
    for r in rows:
        by.setdefault((r["question_id"], r["turn"]), {})[r["order"]] = parse_verdict(r["judgment"])
    outcomes = [combine_swap(v.get("model_first"), v.get("model_second")) for v in by.values()]
    value = {"win": 1.0, "tie": 0.5, "inconsistent": 0.5, "loss": 0.0}
    decided = [value[o] for o in outcomes if o != "error"]
    res = json.loads((pair_out / "results.json").read_text())["models"][model_dir.name]["tasks"]["mt_bench"]
    assert res["pairs"] == 4 and res["unparseable"] == outcomes.count("error")
    assert res["win_rate"] == (pytest.approx(sum(decided) / len(decided)) if decided else None)
    assert art2.metrics[f"{model_dir.name}/mt_bench/pairs"] == 4


def _grade(prompt: str) -> str:
    """The stub judge's grade: from the prompt, some unreadable."""
    if "[Reference answer" in prompt:
        return "Matches the reference. Grade: [[9]]"
    return "Rating: [[4]]" if "snow" in prompt else "I cannot grade this."


def test_stage_score_is_the_mean_of_the_parsed_grades(tmp_path, tiny_tokenizer_dir, tmp_path_factory, demo_data_dir):
    """With a judge whose replies mix readable and unreadable grades, results.json holds the hand-computed mean."""
    from minima.stages.evaluate import run

    model_dir = cs.chat_model_dir(tmp_path_factory, tiny_tokenizer_dir)
    stub = cs.StubJudge(_grade)
    try:
        qfile = _jsonl(tmp_path / "question.jsonl", MT)
        run(build(EvaluateConfig, overrides=_args(stub, model_dir, qfile, demo_data_dir, tmp_path / "e")))
    finally:
        stub.close()
    res = json.loads((tmp_path / "e" / "results.json").read_text())["models"][model_dir.name]["tasks"]["mt_bench"]
    # 81/1 (haiku about rain): unreadable; 81/2 (snow): 4; 111/1 and 111/2 (have references): 9
    assert res["score"] == pytest.approx((4 + 9 + 9) / 3) and res["unparseable"] == 1 and res["judged"] == 4
    assert res["per_category"]["math"]["mean"] == 9 and res["per_category"]["writing"]["unparseable"] == 1
    assert res["score_stderr"] == pytest.approx((sum((x - 22 / 3) ** 2 for x in (4, 9, 9)) / 2) ** 0.5 / 3**0.5)
    assert "| mt_bench | score | judge single | 0 | 2 | 7.333 ± 1.7 |" in (tmp_path / "e" / "report.md").read_text()


def test_chat_task_settings_checked_before_loading(tmp_path, tiny_model_dir, demo_data_dir):
    from minima.evaluate import evaluate_model
    from minima.stages.evaluate import run

    q = _jsonl(tmp_path / "q.jsonl", MT)
    base = [f"model={tiny_model_dir}", f"out_dir={tmp_path / 'o'}", "tasks=[mt_bench]", f"tasks.mt_bench.path={q}"]
    with pytest.raises(ConfigError, match="need a judge"):
        run(build(EvaluateConfig, overrides=base))
    with pytest.raises(ConfigError, match="needs a baseline"):
        run(
            build(
                EvaluateConfig,
                overrides=base + ["judge_model=j", "judge_base_url=http://127.0.0.1:9/v1", "chat_mode=pairwise"],
            )
        )
    with pytest.raises(InputError, match="no question file"):
        run(
            build(
                EvaluateConfig,
                overrides=[
                    f"model={tiny_model_dir}",
                    f"out_dir={tmp_path / 'o'}",
                    "tasks=[zbench]",
                    f"data_dir={demo_data_dir / 'eval'}",
                    "judge_model=j",
                    "judge_base_url=http://x/v1",
                ],
            )
        )
    with pytest.raises(InputError, match="chat task"):
        evaluate_model(None, None, ["vicuna_bench"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_belle_eval_defaults_to_the_shared_file(tmp_path):
    """belle_eval needs no path: data_dir ../shared/data/eval -> ../shared/data/instruction/belle_eval_set.jsonl."""
    from conftest import shared

    from minima.evaluate.chat import question_file
    from minima.evaluate.tasks import get_task

    f = shared("instruction/belle_eval_set.jsonl")
    assert question_file(get_task("belle_eval"), f.parent.parent / "eval", None) == f
    d = tmp_path / "mt_bench"
    d.mkdir()
    _jsonl(d / "question.jsonl", MT)
    (d / "notes.json").write_text("{}")
    assert question_file(get_task("mt_bench"), tmp_path, None) == d / "question.jsonl"
