"""The README's deployment steps, on loopback: local Prefect server, process work pool, `prefect
deploy --all` from prefect.yaml, a worker, and a run triggered by deployment name."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def prefect_server(tmp_path):
    if not Path(PREFECT).exists():
        pytest.skip("prefect CLI not installed in this environment")
    port = _free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect_home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        MINIMA_ROOT=str(ROOT),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    procs = []

    def start(*args, log):
        # the child gets its own copy of the log's descriptor, so ours can close right away
        with open(tmp_path / log, "w") as out:
            p = subprocess.Popen(
                [PREFECT, *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(p)
        return p

    start("server", "start", "--host", "127.0.0.1", "--port", str(port), log="server.log")
    for _ in range(180):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        pytest.fail("prefect server did not come up: " + (tmp_path / "server.log").read_text()[-2000:])
    yield env, start
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_deploy_worker_and_trigger_by_name(prefect_server, tmp_path):
    env, start = prefect_server

    def cli(*args, timeout=240):
        r = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    cli("work-pool", "create", "minima-pool", "--type", "process")
    out = cli("--no-prompt", "deploy", "--all")
    assert "minima-stage/prune" in out and "minima-pipeline/pipeline" in out
    start("worker", "start", "--pool", "minima-pool", log="worker.log")
    dest = tmp_path / "prune_plan"
    out = cli(
        "deployment",
        "run",
        "minima-stage/prune",
        "-p",
        "stage=prune",
        "-p",
        "preset=minima-3b",
        "-p",
        f'overrides=["dry_run=true", "out_dir={dest}"]',
        "--watch",
        timeout=300,
    )
    log = (tmp_path / "worker.log").read_text()
    assert "Completed" in out, out[-3000:] + log[-3000:]
    # The run used the parameters given by name: the minima-3b preset's target shape and its parameter
    # count (3.02B, checked by hand arithmetic in test_prune.py), printed by the flow run the worker started.
    assert "layers 24, heads 24 (kv 24), hidden 3072, ffn 8192" in log and "3.02B params" in log, log[-3000:]
