"""Generate now, judge later: ``answers_only=true`` writes the chat answers with no judge call, and
``minima evaluate judge answers=DIR`` then gives the same scores as the one-shot run."""

from __future__ import annotations

import json
from pathlib import Path

import _chat_server as cs
import pytest

from minima.core.config import EvaluateConfig, build

MT = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
    {"question_id": 111, "category": "math", "turns": ["What is 12 * 12?"], "reference": ["144"]},
]


def _judge_reply(prompt: str) -> str:
    """Grades and verdicts that follow the prompt (pairwise: the answer to 12 * 12 always wins)."""
    if "<<Conversation with assistant A>>" in prompt:
        return "[[A]]" if "12 * 12" in prompt else "[[B]]"
    return "Grade: [[9]]" if "[Reference answer" in prompt else "Rating: [[4]]" if "snow" in prompt else "?"


@pytest.fixture
def judge():
    j = cs.StubJudge(_judge_reply)
    yield j
    j.close()


def _common(model_dir, qfile, out, *extra) -> list[str]:
    return [
        f"model={model_dir}",
        f"out_dir={out}",
        "tasks=[mt_bench]",
        f"tasks.mt_bench.path={qfile}",
        "chat_max_new_tokens=10",
        "chat_temperature=0",
        "judge_concurrency=1",  # one answer decoded at a time: greedy answers that do not depend on batching
        *extra,
    ]


def test_answers_only_then_judge_equals_the_one_shot_run(tmp_path, tmp_path_factory, tiny_tokenizer_dir, judge):
    from minima.cli import main
    from minima.stages.evaluate import run

    model_dir = cs.chat_model_dir(tmp_path_factory, tiny_tokenizer_dir)
    qfile = tmp_path / "question.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in MT), encoding="utf-8")
    judge_args = [f"judge_base_url={judge.base_url}", "judge_model=stub", "judge_max_tokens=16"]

    one_shot = run(build(EvaluateConfig, overrides=_common(model_dir, qfile, tmp_path / "one", *judge_args)))
    calls_one_shot = judge.calls
    assert calls_one_shot == 3  # one grade per turn

    # No judge configured at all, and none called.
    ans = run(build(EvaluateConfig, overrides=_common(model_dir, qfile, tmp_path / "ans", "answers_only=true")))
    assert judge.calls == calls_one_shot
    entry = json.loads((ans.path / "results.json").read_text())["models"][model_dir.name]["tasks"]["mt_bench"]
    assert entry["info"]["mode"] == "answers only" and entry["answers"] == 2
    answers_file = ans.path / entry["info"]["answers_file"]
    one_answers = one_shot.path / "chat" / "mt_bench" / "answers" / f"{model_dir.name}.jsonl"
    turns = [json.loads(x)["choices"][0]["turns"] for x in answers_file.read_text().splitlines()]
    assert turns == [json.loads(x)["choices"][0]["turns"] for x in one_answers.read_text().splitlines()]

    out = tmp_path / "judged"
    assert main(["evaluate", "judge", f"answers={ans.path}", f"out_dir={out}", *judge_args]) == 0
    assert judge.calls == 2 * calls_one_shot
    later = json.loads((out / "results.json").read_text())["models"][model_dir.name]["tasks"]["mt_bench"]
    first = json.loads((one_shot.path / "results.json").read_text())["models"][model_dir.name]["tasks"]["mt_bench"]
    for key in ("score", "score_stderr", "unparseable", "judged", "per_category"):
        assert later[key] == first[key], key
    assert later["score"] == pytest.approx((4 + 9) / 2) and later["unparseable"] == 1
    assert "mt_bench" in (out / "report.md").read_text()

    # Pairwise later, against the one-shot answers as the baseline: win rate and LC win rate reported.
    pair = run(
        build(
            EvaluateConfig,
            overrides=_common(
                model_dir,
                qfile,
                tmp_path / "pair",
                *judge_args,
                "chat_mode=pairwise",
                f"baseline_answers={one_answers}",
            ),
        )
    )
    first_pair = json.loads((pair.path / "results.json").read_text())["models"][model_dir.name]["tasks"]["mt_bench"]
    out2 = tmp_path / "judged_pair"
    assert (
        main(
            [
                "evaluate",
                "judge",
                f"answers={ans.path}",
                f"out_dir={out2}",
                "chat_mode=pairwise",
                f"baseline_answers={one_answers}",
                *judge_args,
            ]
        )
        == 0
    )
    later_pair = json.loads((out2 / "results.json").read_text())["models"][model_dir.name]["tasks"]["mt_bench"]
    for key in ("win_rate", "lc_win_rate", "pairs", "per_category"):
        assert later_pair[key] == first_pair[key], key
    assert later_pair["lc_win_rate"] is not None


def test_judge_without_answers_is_a_clear_error(tmp_path):
    from minima.cli import main

    assert main(["evaluate", "judge", f"answers={tmp_path}", "judge_model=x"]) == 2
    assert not Path(str(tmp_path) + ".judged").exists()
