"""README.md is true: its evaluate example runs on the bundled data, its speed ratios come from
benchmarks/RESULTS.md, and every fenced shell command is run by a test or says why it can't run in CI."""

from __future__ import annotations

import json

from conftest import ROOT, shared

from minima.cli import main


def test_readme_evaluate_example_runs_on_bundled_data(tmp_path, tiny_model_dir, monkeypatch):
    """`minima evaluate model=... tasks=[mmlu,ceval,cmmlu,gsm8k] limit=50` (README, scripts/09_evaluate.sh)
    on ../shared/data/eval: CMMLU ships only dev, so its items get 4 shots from the other dev items."""
    shared("eval/cmmlu")
    monkeypatch.chdir(ROOT)  # data_dir defaults to ../shared/data/eval, relative to the repo root
    out = tmp_path / "eval"
    argv = ["evaluate", f"model={tiny_model_dir}", "tasks=[mmlu,ceval,cmmlu,gsm8k]", "limit=1"]
    assert main([*argv, "max_new_tokens=8", f"out_dir={out}"]) == 0
    res = json.loads((out / "results.json").read_text())
    text = json.dumps(res)
    for name in ("mmlu", "ceval", "cmmlu", "gsm8k"):
        assert f'"{name}"' in text
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    per_task = {t: sum(s["task"] == t for s in samples) for t in ("mmlu", "ceval", "cmmlu", "gsm8k")}
    assert per_task == {"mmlu": 57, "ceval": 52, "cmmlu": 67, "gsm8k": 1}
