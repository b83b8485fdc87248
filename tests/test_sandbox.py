"""The sandbox for generated code: every escape is tried and the host is checked untouched.

Each program exits 0 only when its escape worked, so ``passed`` means the sandbox leaked. The
namespace layer is tested on its own (``audit_hook=False``) and with the hook; the ``python`` mode
(audit hook + rlimits only) is tested for the holes it closes; a host without namespaces refuses
unless unsafe code is allowed.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from minima.core.errors import SandboxError
from minima.evaluate import sandbox
from minima.evaluate.sandbox import allowing_unsafe_code, namespaces_available, run_program

needs_ns = pytest.mark.skipif(
    not namespaces_available(), reason=f"no namespace sandbox here: {sandbox.namespace_status()[1]}"
)


@pytest.fixture
def host(tmp_path):
    """Things on the host a program must not reach: secret files (here and in $HOME), a process, a port."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret-1")
    home_secret = Path.home() / f".minima-sandbox-test-{uuid.uuid4().hex}"
    home_secret.write_text("host-secret-2")
    outside = tmp_path / "outside"
    outside.mkdir()
    sleeper = subprocess.Popen(["sleep", "300"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield {
            "secret": secret,
            "home_secret": home_secret,
            "outside": outside,
            "pid": sleeper.pid,
            "port": listener.getsockname()[1],
            "accepted": accepted,
        }
    finally:
        stop.set()
        t.join(2)
        listener.close()
        sleeper.kill()
        sleeper.wait()
        home_secret.unlink(missing_ok=True)
    assert sleeper.returncode == -9  # alive until we killed it: no program signalled it


def _escapes(h: dict) -> dict[str, str]:
    out = h["outside"]
    return {
        "read_tmp_file": f"print(open({str(h['secret'])!r}).read())",
        "read_home_file": f"print(open({str(h['home_secret'])!r}).read())",
        "read_etc_passwd": "print(open('/etc/passwd').read())",
        "write_by_path": f"open({str(out / 'by_path')!r}, 'w').write('x')",
        "write_by_dir_fd": (
            f"import os\nfd = os.open({str(out)!r}, os.O_RDONLY)\n"
            "os.close(os.open('by_dir_fd', os.O_CREAT | os.O_WRONLY, dir_fd=fd))"
        ),
        "write_by_relative_dir_fd": (  # ../<path of outside from the temp root>, relative to the working dir
            "import os\nfd = os.open('.', os.O_RDONLY)\n"
            f"os.close(os.open({'../' + os.path.relpath(out / 'by_rel', tempfile.gettempdir())!r}, "
            "os.O_CREAT | os.O_WRONLY, dir_fd=fd))"
        ),
        "write_by_symlink": (f"import os\nos.symlink({str(out / 'by_link')!r}, 'l')\nopen('l', 'w').write('x')"),
        "kill_by_pid": f"import os\nos.kill({h['pid']}, 9)",
        "kill_by_pidfd": f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({h['pid']}), 9)",
        "connect_local_port": f"import socket\nsocket.create_connection(('127.0.0.1', {h['port']}), timeout=2)",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', {str(out / 'by_subprocess')!r}], check=True)",
        "os_system": f"import os\nassert os.system('touch {out / 'by_system'}') == 0",
    }


def _host_untouched(h: dict) -> None:
    assert list(h["outside"].iterdir()) == []
    assert h["secret"].read_text() == "host-secret-1" and h["home_secret"].read_text() == "host-secret-2"
    os.kill(h["pid"], 0)  # still alive
    assert h["accepted"] == []


def _sandbox_pids() -> set[int]:
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"-I\x00-S\x00-B\x00-c" in cmd and f"{sandbox.SANDBOX_DIR}\x00".encode() in cmd:
                pids.add(int(p.name))
    return pids


@needs_ns
@pytest.mark.parametrize("hook", [False, True], ids=["namespaces_alone", "with_audit_hook"])
def test_namespace_sandbox_stops_every_escape(host, hook):
    results = {
        k: run_program(code, timeout_s=10, isolation="namespace", audit_hook=hook) for k, code in _escapes(host).items()
    }
    leaked = {k: r for k, r in results.items() if r.passed}
    assert leaked == {}, leaked
    assert {r.isolation for r in results.values()} == {"namespace"}
    _host_untouched(host)
    if not hook:  # what stopped them was the namespaces, not the hook
        assert "No such file or directory" in results["read_tmp_file"].detail
        assert "No such file or directory" in results["read_home_file"].detail
        assert "ProcessLookupError" in results["kill_by_pid"].detail  # the host's pids do not exist in there
        assert "ConnectionRefused" in results["connect_local_port"].detail or "unreachable" in (
            results["connect_local_port"].detail.lower()
        )


@needs_ns
def test_namespace_sandbox_bounds_fork_bombs_memory_and_time(host):
    before = _sandbox_pids()
    bomb = (
        "import os, time\nkids = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n"
        "            time.sleep(1000)\n            os._exit(0)\n        kids += 1\n    except OSError:\n"
        "        break\ntime.sleep(1000)"
    )
    t0 = time.time()
    r = run_program(bomb, timeout_s=3, isolation="namespace", audit_hook=False)
    assert r.status == "timeout" and time.time() - t0 < 20
    time.sleep(0.5)
    assert _sandbox_pids() - before == set()  # the whole PID namespace went with it
    r = run_program("x = bytearray(10 * 2**30)", timeout_s=10, memory_mb=512, isolation="namespace", audit_hook=False)
    assert not r.passed and "MemoryError" in r.detail
    t0 = time.time()
    r = run_program("import time\ntime.sleep(10**6)", timeout_s=2, isolation="namespace", audit_hook=False)
    assert r.status == "timeout" and time.time() - t0 < 15
    r = run_program("open('big', 'wb').write(b'x' * (64 << 20))", timeout_s=10, file_mb=4, isolation="namespace")
    assert not r.passed
    _host_untouched(host)


def test_python_mode_closes_the_dir_fd_and_pidfd_holes(host):
    """No namespaces: the audit hook alone must stop dir_fd writes and pidfd signals."""
    codes = _escapes(host)
    for k in ("write_by_path", "write_by_dir_fd", "write_by_relative_dir_fd", "write_by_symlink"):
        r = run_program(codes[k], timeout_s=10, isolation="python")
        assert not r.passed and "sandbox:" in r.detail, (k, r)
    fwalk = (
        "import os\nfor root, dirs, files, fd in os.fwalk('/'):\n"
        "    os.close(os.open('by_fwalk', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\n    break"
    )
    for k, code in (("kill_by_pidfd", codes["kill_by_pidfd"]), ("kill_by_pid", codes["kill_by_pid"]), ("fwalk", fwalk)):
        r = run_program(code, timeout_s=10, isolation="python")
        assert not r.passed, (k, r)
    ok = run_program(
        "import os\nos.mkdir('d')\nfd = os.open('d', os.O_RDONLY)\n"
        "os.close(os.open('f', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\nassert os.listdir('d') == ['f']",
        timeout_s=10,
        isolation="python",
    )
    assert ok.passed, ok  # inside its own dir a dir_fd still works
    _host_untouched(host)
    assert not Path("/by_fwalk").exists()


def test_no_namespaces_refuses_unless_unsafe_code_is_allowed(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "namespace_status", lambda: (False, "bwrap cannot create the namespaces here: test"))
    sandbox._warn_unsafe.cache_clear()
    with pytest.raises(SandboxError) as e:
        run_program("print(1)")
    assert "cannot be isolated" in str(e.value) and "allow_unsafe_code=true" in str(e.value)
    with pytest.raises(SandboxError):
        sandbox.check_programs(["print(1)"])
    logger = logging.getLogger("minima")
    logger.addHandler(caplog.handler)
    try:
        with allowing_unsafe_code():
            r = run_program("print(1)")
            rs = sandbox.check_programs(["print(1)", "raise SystemExit(1)"])
    finally:
        logger.removeHandler(caplog.handler)
        sandbox._warn_unsafe.cache_clear()
    assert r.passed and r.isolation == "python" and [x.passed for x in rs] == [True, False]
    assert "WITHOUT a namespace sandbox" in caplog.text and "can read every file" in caplog.text
