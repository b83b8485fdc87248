"""README.md is true: its evaluate example runs on the bundled data, its speed ratios come from
benchmarks/RESULTS.md, and every fenced shell command is run by a test or says why it can't run in CI."""

from __future__ import annotations

import json
from pathlib import Path

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


# ------------------------------------------------------------------------------ scripts/0N_*.sh
# The training scripts (03_adapt, 05_distil, 07_instruct, 08_instruct_lora) are not run here: each launches a
# DeepSpeed job; their stages run at tiny scale in tests/test_adapt.py, test_distill.py, test_sft.py, test_lora.py.
CHEAP_SCRIPTS = ("01_expand_vocab", "02_build_pretraining_data", "04_prune", "06_build_instruction_data", "09_evaluate")


def _script(name: str, env: dict, *args: str, tmp: Path) -> None:
    import os
    import subprocess
    import sys

    wrapper = tmp / "minima"
    if not wrapper.exists():  # this checkout's minima, whatever .venv/bin/minima points at
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m minima.cli "$@"\n')
        wrapper.chmod(0o755)
    full = {**os.environ, "PYTHONPATH": str(ROOT), "MINIMA": str(wrapper), "PRESET": "tiny", **env}
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / f"{name}.sh"), *args], env=full, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{name}.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def test_cheap_scripts_run_at_tiny_scale(tmp_path, demo_data_dir, tiny_model_dir):
    """01 vocab -> 02 records -> 04 prune, 06 chat records, 09 evaluate (README's task list) with PRESET=tiny."""
    t, demo = tmp_path, demo_data_dir
    _script(
        "01_expand_vocab",
        {
            "BASE_TOKENIZER": str(demo / "tokenizers/base_en.model"),
            "EXTRA_SP": str(demo / "tokenizers/extra_zh.model"),
            "BASE_MODEL": str(tiny_model_dir),
            "OUT": str(t / "01_vocab"),
        },
        tmp=t,
    )
    _script(
        "02_build_pretraining_data",
        {"INPUTS": str(demo / "text/*.txt"), "TOKENIZER": str(t / "01_vocab"), "OUT": str(t / "02_records_lm")},
        tmp=t,
    )
    _script(
        "04_prune",
        {"TEACHER": str(t / "01_vocab"), "RECORDS": str(t / "02_records_lm")},
        f"out_dir={t / '04_prune'}",
        "num_samples=8",
        tmp=t,
    )
    _script(
        "06_build_instruction_data",
        {"INPUTS": str(demo / "chat/demo_chat.json"), "TOKENIZER": str(t / "01_vocab"), "OUT": str(t / "02_chat")},
        tmp=t,
    )
    for d in ("01_vocab", "02_records_lm", "04_prune", "02_chat"):
        assert (t / d / "manifest.json").is_file(), d  # complete artifacts
    prune = json.loads((t / "04_prune" / "config.json").read_text())
    assert prune["num_hidden_layers"] == 3 and prune["hidden_size"] == 96  # the tiny preset's student shape
    if (ROOT.parent / "shared" / "data" / "eval" / "cmmlu").is_dir():
        _script(
            "09_evaluate", {"MODEL": str(t / "04_prune")}, "limit=1", "max_new_tokens=8", f"out_dir={t / '09'}", tmp=t
        )
        samples = (t / "09" / "samples.jsonl").read_text().splitlines()
        assert {json.loads(s)["task"] for s in samples} == {"mmlu", "ceval", "cmmlu", "gsm8k"}
