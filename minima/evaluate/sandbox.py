"""Run untrusted generated code (HumanEval) in a sandboxed subprocess.

Layers, each enough to stop the others' known gaps:

1. **Resource limits** (``setrlimit``, soft = hard so the program cannot raise them): address space
   (memory), CPU seconds, file size, no core dumps; plus a wall-clock timeout that kills the whole
   process group.
2. **Namespaces** (when ``unshare`` works here): a new network namespace (no interfaces, so no
   network) and a mount namespace where every mount is remounted read-only except the program's
   temp dir; the program then runs in a *nested* user+mount namespace, where those read-only
   mounts are locked and cannot be remounted writable.
3. **A Python audit hook** installed before the program runs: writes, renames, deletes and
   chmods outside the temp dir, ``chdir``, sockets, subprocesses, ``fork``/``exec`` and ``ctypes`` raise
   ``PermissionError``. (A hook cannot be removed from Python code; ``ctypes``, the usual way
   around it, is blocked.)

The temp dir is the working directory and ``HOME``/``TMPDIR``, and it is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal, Optional

Isolation = Literal["auto", "namespace", "python"]

# Runs inside the sandbox's Python before the program: installs the audit hook, then execs prog.py.
_GUARD = r"""
import os, sys
ROOT = os.path.realpath(sys.argv[1])
os.chdir(ROOT)  # re-enter the dir: after the bind mount the old cwd still points below it
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.symlink": (0, 1),
               "os.link": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
               "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.rmtree": (0,),
               "shutil.chown": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,)}
BLOCK = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
         "pty.", "ctypes.", "os.kill", "os.killpg", "os.chdir", "os.fchdir", "os.chroot", "_posixsubprocess",
         "os.startfile", "webbrowser.", "resource.setrlimit", "os.setuid", "os.setgid", "os.unshare", "os.setns")
BLOCK_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "multiprocessing", "_multiprocessing"}

def inside(p):
    if isinstance(p, int):
        return True  # an already-open descriptor
    try:
        p = os.fsdecode(p)
    except TypeError:
        return False
    rp = os.path.realpath(os.path.join(ROOT, p))
    return rp == ROOT or rp.startswith(ROOT + os.sep)

def hook(event, args):
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS
        )
        if writing and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the temp dir is not allowed")
    elif event in PATH_EVENTS:
        for i in PATH_EVENTS[event]:
            if i < len(args) and not inside(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the temp dir is not allowed")
    elif event == "import":
        if args[0].split(".")[0] in BLOCK_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    elif event.startswith(BLOCK):
        raise PermissionError(f"sandbox: {event} is not allowed")

if sys.argv[2:3] != ["nohook"]:
    for _m in list(sys.modules):
        if _m.split(".")[0] in BLOCK_IMPORTS:
            del sys.modules[_m]
    sys.addaudithook(hook)
del hook
with open(os.path.join(ROOT, "prog.py"), encoding="utf-8") as _f:
    _code = compile(_f.read(), "prog.py", "exec")
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

# Runs as the namespace's root: bind the temp dir writable, remount everything else read-only, then
# re-exec the guard in a nested user+mount namespace (where those mounts are locked read-only).
_SETUP = r"""
import os, subprocess, sys
root = sys.argv[1]
subprocess.run(["mount", "--bind", root, root], check=True)
points = []
with open("/proc/self/mountinfo") as f:
    for line in f:
        p = line.split()[4]
        points.append(p.encode().decode("unicode_escape"))
for p in sorted(set(points), reverse=True):
    if p == root or p == "/proc" or p.startswith("/proc/"):
        continue
    subprocess.run(["mount", "-o", "remount,bind,ro", p], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.execvp("unshare", ["unshare", "--user", "--map-root-user", "--mount", "--",
                      sys.executable, "-I", "-B", "-c", sys.argv[2], root, *sys.argv[3:]])
"""


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str
    isolation: str


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether unprivileged user+net+mount namespaces work here (``unshare -rmn true``)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    try:
        return (
            subprocess.run(
                ["unshare", "--user", "--map-root-user", "--net", "--mount", "true"], capture_output=True, timeout=10
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(memory_mb: int, cpu_s: int, file_mb: int):
    def apply():
        import resource

        for res, val in (
            (resource.RLIMIT_AS, memory_mb << 20),
            (resource.RLIMIT_CPU, cpu_s),
            (resource.RLIMIT_FSIZE, file_mb << 20),
            (resource.RLIMIT_CORE, 0),
        ):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(res, (val, val))

    return apply


def run_program(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    isolation: Isolation = "auto",
    audit_hook: bool = True,
) -> ExecResult:
    """Execute ``code`` as a Python program in the sandbox; it passes when it exits with status 0.

    Args:
        code: the whole program (HumanEval: prompt + completion + tests + ``check(entry_point)``).
        timeout_s: wall-clock limit; the CPU limit is the same, rounded up.
        memory_mb: address-space limit.
        file_mb: largest file the program may write (inside its temp dir).
        isolation: ``namespace`` (needs unshare), ``python`` (limits + audit hook only), or ``auto``.
        audit_hook: install the audit hook (off only to test the other layers on their own).
    """
    use_ns = isolation == "namespace" or (isolation == "auto" and namespaces_available())
    if isolation == "namespace" and not namespaces_available():
        raise RuntimeError("namespace isolation asked for but `unshare -rmn` does not work here")
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="minima-sandbox-"))
    try:
        with open(os.path.join(tmp, "prog.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if use_ns:
            cmd = [
                "unshare",
                "--user",
                "--map-root-user",
                "--net",
                "--mount",
                "--",
                sys.executable,
                "-I",
                "-c",
                _SETUP,
                tmp,
                _GUARD,
            ]
        else:
            cmd = [sys.executable, "-I", "-B", "-c", _GUARD, tmp]
        if not audit_hook:
            cmd.append("nohook")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_limits(memory_mb, int(timeout_s) + 1, file_mb),
        )
        try:
            out, err = proc.communicate(timeout=timeout_s + (2.0 if use_ns else 0.5))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult(False, "timeout", f"timed out after {timeout_s:g}s", "namespace" if use_ns else "python")
        tail = (err or b"").decode("utf-8", "replace").strip().splitlines()[-3:]
        mode = "namespace" if use_ns else "python"
        if proc.returncode == 0:
            return ExecResult(True, "passed", "", mode)
        if proc.returncode < 0 and -proc.returncode in (signal.SIGXCPU, signal.SIGKILL):
            return ExecResult(False, "timeout", f"killed by signal {-proc.returncode} (CPU limit)", mode)
        return ExecResult(False, "failed", " | ".join(tail)[-500:], mode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_programs(
    programs: list[str], timeout_s: float = 10.0, workers: Optional[int] = None, isolation: Isolation = "auto"
) -> list[ExecResult]:
    """Run many programs, a few at a time (threads only wait on subprocesses)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or max(1, min(4, (os.cpu_count() or 2)))
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda c: run_program(c, timeout_s=timeout_s, isolation=isolation), programs))
