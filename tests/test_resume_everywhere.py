"""Kill -9 and resume equals an uninterrupted run, bitwise on CPU, for every training recipe users run:
distill with a live teacher, distill from the logit cache, sft with packing (and NEFTune noise), LoRA sft,
FSDP sft, and adapt, distill and sft with packing in bf16.

One helper does it for all: the reference runs uninterrupted in this process; the same config runs in a
subprocess (in-process training there, one thread, a delay after each step) that is SIGKILLed once its
step-4 checkpoint is complete; the rerun in this process resumes from it. The published weights must be
bit-identical, and every step's batch hash, loss and lr must appear once, equal to the reference's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minima.core.config import AdaptConfig, DistillConfig, LoraConfig, RecordsConfig, SftConfig
from minima.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TEACHER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
STUDENT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3)
ENV = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}  # the killed run's process too
STEPS, KILL_AFTER = 6, 4
COMMON = dict(max_steps=STEPS, save_steps=2, keep_last=2, micro_batch_size=4, log_steps=1)

DRIVER = """import json, sys
from minima.core import config as C
from minima.stages import adapt, distill, sft
stage = {"AdaptConfig": adapt, "DistillConfig": distill, "SftConfig": sft}[sys.argv[1]]
stage.run(getattr(C, sys.argv[1]).model_validate(json.loads(open(sys.argv[2]).read())))
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_inprocess):
    yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_data_dir, tiny_tokenizer_dir) -> dict[str, Path]:
    """lm records (seq 32), chat records (seq 128), a teacher, a smaller student, and where the logit cache goes."""
    from minima.stages.records import run as build_records
    from minima.testing import lm_records_from_lines, save_tiny_model

    d = tmp_path_factory.mktemp("resume")
    lm = lm_records_from_lines(d / "lm_src", demo_data_dir / "text" / "pretrain_en.txt", tiny_tokenizer_dir, 200)
    chat = build_records(
        RecordsConfig(
            inputs=str(demo_data_dir / "chat" / "demo_chat.json"),
            tokenizer=str(tiny_tokenizer_dir),
            format="chat",
            chat_format="minichat",
            max_length=128,
            dev_fraction=0.05,
            out_dir=str(d / "chat"),
        )
    ).path
    teacher = save_tiny_model(d / "teacher", tiny_tokenizer_dir, seed=0, **TEACHER)
    student = save_tiny_model(d / "student", tiny_tokenizer_dir, seed=1, **STUDENT)
    return dict(lm=lm, chat=chat, teacher=teacher, student=student, cache=d / "cache")


def _distill(p, out, **kw):
    base = dict(
        teacher=str(p["teacher"]),
        student=str(p["student"]),
        records=str(p["lm"]),
        out_dir=str(out),
        precision="fp32",
        zero_stage=0,
        lr=1e-3,
    )
    return DistillConfig(**{**base, **COMMON, **kw})


def _adapt(p, out, **kw):
    base = dict(model=str(p["student"]), records=str(p["lm"]), out_dir=str(out), zero_stage=2, lr=1e-3)
    return AdaptConfig(**{**base, **COMMON, **kw})


def _sft(p, out, **kw):
    base = dict(
        model=str(p["teacher"]),
        records=str(p["chat"]),
        out_dir=str(out),
        precision="fp32",
        zero_stage=2,
        lr=3e-3,
        max_length=128,
        eval_steps=3,
    )
    return SftConfig(**{**base, **COMMON, **kw})


CASES = {
    "distill_live_teacher": lambda p, out: _distill(p, out, eval_steps=3),
    "distill_logit_cache": lambda p, out: _distill(  # the first run builds the cache, the others reuse it
        p, out, cache_logits=True, cache_dir=str(p["cache"]), cache_top_k=16, loss={"alpha": 0.5, "kd": "soft_ce"}
    ),
    "sft_packing_neftune": lambda p, out: _sft(p, out, packing=True, neftune_alpha=5.0),
    "sft_lora": lambda p, out: _sft(p, out, lr=1e-2, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1)),
    "sft_fsdp": lambda p, out: _sft(p, out, strategy="fsdp", zero_stage=None),
    "distill_bf16": lambda p, out: _distill(p, out, precision="bf16", zero_stage=2),
    "adapt_bf16": lambda p, out: _adapt(p, out, precision="bf16", eval_steps=3),
    "sft_packing_bf16": lambda p, out: _sft(p, out, precision="bf16", packing=True),
}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no weights in {d}"
    return out


def _rows(d: Path, split: str = "train") -> list[dict]:
    return [r for r in read_metrics(d / "metrics.jsonl") if r["split"] == split]


def _run(cfg):
    from minima.stages import adapt, distill, sft

    return {AdaptConfig: adapt, DistillConfig: distill, SftConfig: sft}[type(cfg)].run(cfg)


def kill_and_resume(tmp_path: Path, make) -> tuple[Path, Path]:
    """Run ``make(out)``'s config uninterrupted and killed-then-resumed; return (reference dir, resumed dir)."""
    ref = _run(make(tmp_path / "ref")).path
    cfg = make(tmp_path / "killed")
    spec, driver = tmp_path / "cfg.json", tmp_path / "driver.py"
    spec.write_text(json.dumps(cfg.model_dump(mode="json")))
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_STEP_DELAY_S="0.25", PYTHONPATH=str(ROOT), **ENV)
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the run before its checkpoint
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(driver), type(cfg).__name__, str(spec)],
            env=env,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    partial = tmp_path / "killed.partial"
    marker = partial / "checkpoints" / f"step_{KILL_AFTER:08d}" / "COMPLETE"
    deadline = time.time() + 240
    try:
        while not marker.is_file():
            assert proc.poll() is None, f"training ended before it could be killed:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    done = [r["step"] for r in _rows(partial)]
    assert KILL_AFTER <= max(done) < STEPS and not (tmp_path / "killed" / "manifest.json").exists()
    import logging

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("minima").addHandler(handler)
    try:
        resumed = _run(cfg).path
    finally:
        logging.getLogger("minima").removeHandler(handler)
    # the newest checkpoint of the killed run (steps 2 and 4 saved, killed before 6): a deterministic run
    # restarted from scratch would end bitwise equal too, so the resume itself is checked
    assert any(m.startswith("resumed from") and f"step_{KILL_AFTER:08d}" in m for m in said), said[-5:]
    return ref, resumed


@pytest.mark.parametrize("case", list(CASES))
def test_kill_and_resume_equals_uninterrupted(case, inputs, tmp_path):
    ref, out = kill_and_resume(tmp_path, lambda o: CASES[case](inputs, o))
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run: {differ[:4]}"
    r_rows, g_rows = _rows(ref), _rows(out)
    assert [r["step"] for r in g_rows] == list(range(1, STEPS + 1))
    for key in ("batch_hash", "loss", "lr"):
        assert [r[key] for r in g_rows] == [r[key] for r in r_rows], key
    assert [r["dev_loss"] for r in _rows(out, "dev")] == [r["dev_loss"] for r in _rows(ref, "dev")]
    if case.endswith("bf16"):  # both runs trained in bf16 (on CPU only when asked for)
        from minima.core.artifacts import read_manifest

        assert read_manifest(ref)["metrics"]["precision"] == read_manifest(out)["metrics"]["precision"] == "bf16"
    # the run trained: its weights moved from the initial model
    init = _weights(inputs["student"] if case.startswith(("distill", "adapt")) else inputs["teacher"])
    assert any(not torch.equal(init[k].to(b[k].dtype), b[k]) for k in b if k in init)
