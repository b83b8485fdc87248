"""benchmarks/gpu_check.sh --cpu-smoke: every arm of the prepared GPU check runs at toy size on CPU, so the
script cannot rot before a GPU session runs it (figures are toy-sized; only their presence is checked)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("train", "distill", "sft", "evaluate", "checkpoint", "serve")


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_arm(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIMEOUT_S="300")
    env.pop("MINIMA_INPROCESS", None)
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text()
    t0 = time.time()
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--work", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=320,
    )
    wall = time.time() - t0
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("gpu_check ")]
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for arm in ARMS:
        figures = [ln for ln in lines if ln.startswith(f"gpu_check {arm}: ") and "arm seconds" not in ln]
        assert figures and not any("FAILED" in ln or "skipped = out of time" in ln for ln in figures), (arm, lines)
    assert "SIGKILL + resume equals uninterrupted (bitwise) = yes" in r.stdout
    assert "failed arms: none" in r.stdout
    assert results.read_text() == before  # the smoke run never writes the GPU section
    assert wall < 180, f"--cpu-smoke took {wall:.0f} s"
