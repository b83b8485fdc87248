"""Artifacts: directories that one stage writes and the next one reads.

An artifact is complete exactly when its ``manifest.json`` exists. A stage builds into
``<out_dir>.partial``, writes the manifest there last (atomically), and then renames the directory
into place, so a crash at any point leaves either the previous artifact or nothing that looks
complete. A training stage keeps ``.partial`` between attempts so it can resume from checkpoints.

The cache key of an artifact is the hash of (stage, config without nohash fields, input hashes). A
stage whose out_dir already holds a complete artifact with the same key is skipped unless forced.

Guards that every stage gets here, in one place:

- **one writer per out_dir**: an exclusive ``flock`` on ``.<out_dir name>.lock`` beside it (holding the holder's pid,
  host and start time) for the whole stage; a second run stops naming the holder, or waits with
  ``wait=true``; the lock of a run that died is taken over with a warning;
- **artifacts you can trust**: the manifest lists every file's size and checksum; a cache hit checks
  sizes always and checksums with ``verify=full`` (the default below 1 GB), and a damaged artifact
  is never reused; an artifact used as an input is size-checked;
- **disk full**: ENOSPC anywhere in a stage becomes one :class:`DiskFullError` line naming the file,
  the free space and the stage's need; the partial dir is removed (kept for resumable stages, whose
  checkpoints it holds) and the previous artifact stays;
- **tokenizer identity**: an artifact that holds a tokenizer (or whose inputs agree on one) records
  its fingerprint (see :data:`ARTIFACT_PROBES`).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import glob
import hashlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from minima import __version__
from minima.core.config import StageConfig, hash_view
from minima.core.errors import ArtifactError, DiskFullError, LockError, MinimaError
from minima.core.logs import get_logger

log = get_logger("minima.artifacts")

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
FULL_VERIFY_BYTES = 1 << 30  # verify=auto: checksums below this total size, sizes above
# Manifest fields computed from a finished work dir by code that lives above core: field ->
# "module:function(work_dir, inputs) -> value or None" (imported only when a stage publishes).
ARTIFACT_PROBES = {"tokenizer_fingerprint": "minima.data.tokenizers:artifact_fingerprint"}
_SMALL_FILE = 64 << 20  # files below this are hashed by content, larger ones by stat
# Inside a pipeline run a step's previous artifact is replaced when its inputs or config changed;
# a lone CLI run refuses that without --force (it might be somebody else's artifact).
_REPLACE_STALE = contextvars.ContextVar("minima_replace_stale", default=False)


@contextlib.contextmanager
def replacing_stale():
    """Let run_stage replace an out_dir that holds an older artifact of the same stage."""
    token = _REPLACE_STALE.set(True)
    try:
        yield
    finally:
        _REPLACE_STALE.reset(token)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    st = path.stat()
    if st.st_size > _SMALL_FILE:
        return sha256_text(f"stat:{st.st_size}:{st.st_mtime_ns}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_input(path: str | os.PathLike | None) -> Optional[str]:
    """Hash of an input: an artifact's cache key, a file's content, or a dir/glob's file listing."""
    if path is None:
        return None
    p = Path(path)
    if (p / MANIFEST).is_file():
        manifest = read_manifest(p)
        damage = verify_files(p, manifest, "sizes")
        if damage:
            raise ArtifactError(
                f"input artifact {p} is damaged: {damage}",
                where=str(p / damage.split(":")[0]),
                fix=f"rebuild it: rerun its {manifest.get('stage', '')} stage with --force (out_dir={p})",
            )
        return manifest["cache_key"]
    if p.is_file():
        return _file_digest(p)
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.is_file())
    else:
        files = sorted(Path(x) for x in glob.glob(str(path), recursive=True) if Path(x).is_file())
    if not files:
        return sha256_text(f"missing:{path}")
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return sha256_text("\n".join(parts))


# ------------------------------------------------------------------------------ file checksums
def checksum_algorithm() -> str:
    """xxh3_128 when the xxhash package is installed (about 20x faster), else sha256."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def file_checksum(path: str | os.PathLike, algorithm: Optional[str] = None) -> str:
    """``"<algorithm>:<hex>"`` of a file's bytes."""
    algorithm = algorithm or checksum_algorithm()
    if algorithm == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
    elif algorithm == "sha256":
        h = hashlib.sha256()
    else:
        raise ArtifactError(f"unknown checksum algorithm {algorithm!r}", fix="install xxhash (pip install xxhash)")
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def file_table(root: Path, algorithm: Optional[str] = None) -> dict[str, dict]:
    """Every file under ``root`` except the manifest: relative path -> size and checksum."""
    algorithm = algorithm or checksum_algorithm()
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and not f.is_symlink() and f.relative_to(root).as_posix() != MANIFEST:
            out[f.relative_to(root).as_posix()] = {"size": f.stat().st_size, "checksum": file_checksum(f, algorithm)}
    return out


def verify_files(path: str | os.PathLike, manifest: dict, level: str = "auto") -> Optional[str]:
    """The first damaged file of an artifact as ``"name: what is wrong"``, or None when it is intact.

    Args:
        path: the artifact dir.
        manifest: its manifest (a manifest without a file table, written before it existed, passes).
        level: ``sizes`` (each file exists with its size), ``full`` (and its checksum), or ``auto``
            (full below 1 GB in all, sizes above).
    """
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    root = Path(path)
    if level == "auto":
        level = "full" if sum(int(e.get("size", 0)) for e in files.values()) < FULL_VERIFY_BYTES else "sizes"
    for name, entry in files.items():
        f = root / name
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return f"{name}: missing"
        if size != entry.get("size"):
            return f"{name}: {size} bytes on disk, {entry.get('size')} when the artifact was written"
    if level == "full":
        for name, entry in files.items():
            want = entry.get("checksum")
            if not want:
                continue
            got = file_checksum(root / name, want.split(":")[0])
            if got != want:
                return f"{name}: checksum {got} differs from the recorded {want}"
    return None


def config_hash(cfg: StageConfig) -> str:
    """Stable under key order and blind to nohash fields (out_dir, workers, launcher)."""
    return sha256_text(canonical_json({"stage": cfg.stage, "config": hash_view(cfg)}))


def cache_key(cfg: StageConfig, inputs: Mapping[str, Optional[str]]) -> str:
    return sha256_text(canonical_json({"config": config_hash(cfg), "inputs": dict(sorted(inputs.items()))}))


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{path} is not a complete artifact (no {MANIFEST})",
            fix="run the stage that produces it (an interrupted stage leaves no manifest)",
        ) from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"corrupt manifest: {e}", where=str(p), fix="rerun the stage with --force") from None


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class Artifact:
    """A complete stage output."""

    path: Path
    manifest: dict
    skipped: bool = False  # True when a cached artifact was reused

    @property
    def cache_key(self) -> str:
        return self.manifest["cache_key"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        return cls(Path(path), read_manifest(path))


@dataclass
class StageRun:
    """Handed to a stage body: where to write, and a dict to fill with metrics."""

    work_dir: Path
    out_dir: Path
    config: StageConfig
    metrics: dict = field(default_factory=dict)
    resumed: bool = False


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)


# ------------------------------------------------------------------------------ one writer per out_dir
def lock_path(out_dir: str | os.PathLike) -> Path:
    """The lock file beside an out_dir: ``.<name>.lock`` (hidden, so input globs never match it)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}{LOCK_SUFFIX}")


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def _holder_text(h: dict) -> str:
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"


@contextlib.contextmanager
def out_dir_lock(out_dir: str | os.PathLike, wait: bool = False, stage: str = ""):
    """Hold the exclusive lock of ``out_dir`` for the duration of the block.

    The lock is an ``flock`` on :func:`lock_path`, which holds the holder's pid, host and start time.
    The kernel releases an flock when its holder dies, so a lock file that still names a holder but
    can be locked belongs to a run that died: it is taken over with a warning. A holder that finishes
    removes the file; a run that was waiting on the removed file then locks the new one instead.

    Raises:
        LockError: another live run holds the lock and ``wait`` is false.
    """
    import fcntl

    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            if not wait:
                os.close(fd)
                raise LockError(
                    f"{out_dir} is being written by another run ({_holder_text(holder)})",
                    where=str(path),
                    fix="let that run finish, pass wait=true to queue behind it, or choose another out_dir",
                ) from None
            log.warning(f"{out_dir} is being written by another run ({_holder_text(holder)}); waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        try:
            here, now = os.fstat(fd), os.stat(path)
            same = (here.st_dev, here.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder finished and removed this file: lock the current one
    try:
        old = _read_holder(fd)
        if old:
            log.warning(
                f"taking over the lock of {out_dir} from a run that died without releasing it ({_holder_text(old)})"
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": stage,
            "argv": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        yield me
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# ------------------------------------------------------------------------------ disk full
_DISK_FULL_TEXT = ("no space left on device", "basic_ios::clear", "disk quota exceeded", "file write failed")


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _dir_bytes(path: Path) -> int:
    total = 0
    for f in path.rglob("*") if path.is_dir() else ():
        with contextlib.suppress(OSError):
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
    return total


def _newest_file(path: Path) -> Optional[Path]:
    """The most recently modified file under ``path``: the one being written when a write() failed
    (a write error carries no file name, only open() does)."""
    best, best_t = None, -1.0
    for f in path.rglob("*") if path.is_dir() else ():
        with contextlib.suppress(OSError):
            t = f.stat().st_mtime
            if f.is_file() and t >= best_t:
                best, best_t = f, t
    return best


def _free_bytes(path: Path) -> Optional[int]:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


def _disk_full_cause(exc: BaseException, where: Path) -> Optional[str]:
    """The path being written when ``exc`` says the disk is full ("" when unknown), else None.

    ENOSPC/EDQUOT anywhere in the exception chain counts. So does a message known to mean a full
    disk in libraries that hide the errno (torch's "basic_ios::clear", a rank's "No space left on
    device" relayed as text), when the file system really is (almost) full.
    """
    seen, todo, texts = set(), [exc], []
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(e.filename or "")
        texts.append(str(e).lower())
        todo += [e.__cause__, e.__context__]
    if any(t in text for text in texts for t in _DISK_FULL_TEXT):
        with contextlib.suppress(OSError):
            for p in (where, *where.parents):
                if p.exists():
                    usage = shutil.disk_usage(p)
                    if usage.free < max(64 << 20, usage.total // 100):
                        return ""
                    break
    return None


def check_free_space(path: str | os.PathLike, need_bytes: Optional[float], what: str) -> None:
    """Stop before a stage starts when its disk estimate exceeds the free space at ``path``.

    Raises:
        DiskFullError: naming the free space and the need.
    """
    if not need_bytes:
        return
    free = _free_bytes(Path(path))
    if free is not None and free < need_bytes:
        raise DiskFullError(
            f"{what} needs about {_gb(need_bytes)} on disk and {path} has {_gb(free)} free",
            where=str(path),
            fix="free some space or choose another out_dir (see `minima plan` for the estimate)",
        )


# ------------------------------------------------------------------------------ run_stage
def run_stage(
    cfg: StageConfig,
    inputs: Mapping[str, Optional[str]],
    body: Callable[[StageRun], Optional[dict]],
    *,
    force: bool = False,
    resumable: bool = False,
    disk_estimate: Optional[float] = None,
) -> Artifact:
    """Run ``body`` into a temp dir and publish it atomically as the stage's artifact.

    The whole stage runs under the out_dir's lock (see :func:`out_dir_lock`; ``cfg.wait`` says
    whether a second run waits or stops).

    Args:
        cfg: the resolved stage config (its out_dir is where the artifact lands).
        inputs: name -> input path; their hashes go into the cache key and the manifest.
        body: writes the outputs into ``run.work_dir``; may return extra metrics.
        force: rebuild even when a complete artifact with the same key exists, and replace an
            artifact with a different key.
        resumable: keep ``<out_dir>.partial`` from an interrupted attempt with the same key
            (training resumes from its checkpoints); otherwise a stale one is wiped.
        disk_estimate: bytes the stage will write (from ``minima plan``): checked against the free
            space before the body runs, and quoted when the disk fills up.
    """
    out_dir = cfg.resolved_out_dir()
    with out_dir_lock(out_dir, wait=bool(getattr(cfg, "wait", False)), stage=cfg.stage):
        return _run_locked(cfg, out_dir, inputs, body, force, resumable, disk_estimate)


def _run_locked(cfg, out_dir: Path, inputs, body, force: bool, resumable: bool, disk_estimate) -> Artifact:
    input_hashes = {k: hash_input(v) for k, v in inputs.items()}
    key = cache_key(cfg, input_hashes)
    previous_bytes = 0
    if is_complete(out_dir):
        old = read_manifest(out_dir)
        previous_bytes = sum(int(e.get("size", 0)) for e in (old.get("files") or {}).values())
        if old.get("cache_key") == key and not force:
            damage = verify_files(out_dir, old, getattr(cfg, "verify", "auto"))
            if damage is None:
                return Artifact(out_dir, old, skipped=True)
            if not _REPLACE_STALE.get():
                raise ArtifactError(
                    f"the cached {cfg.stage} artifact {out_dir} is damaged: {damage}",
                    where=str(out_dir / damage.split(":")[0]),
                    fix="pass --force to rebuild it",
                )
            log.warning(f"{cfg.stage}: the cached artifact {out_dir} is damaged ({damage}); rebuilding it")
        else:
            same_stage = old.get("stage") == cfg.stage
            if not force and not (same_stage and _REPLACE_STALE.get()):
                raise ArtifactError(
                    f"{out_dir} already holds a different {old.get('stage')} artifact "
                    f"(cache key {old.get('cache_key', '?')[:12]} != {key[:12]})",
                    fix="pass --force to replace it, or choose another out_dir",
                )
    elif out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ArtifactError(
            f"{out_dir} exists, is not empty and is not a minima artifact",
            fix="choose another out_dir, or pass --force to replace it",
        )
    check_free_space(out_dir.parent, disk_estimate, f"the {cfg.stage} stage")

    work = _partial_dir(out_dir)
    try:
        return _build(cfg, out_dir, work, inputs, input_hashes, key, body, force, resumable)
    except BaseException as e:
        path = None if isinstance(e, DiskFullError) else _disk_full_cause(e, work)
        if path is None:
            raise
        free = _free_bytes(work)
        written = _dir_bytes(work)
        path = path or _newest_file(work)
        need = max(disk_estimate or 0, previous_bytes, written)
        if resumable:
            kept = f"; {work} ({_gb(written)}) is kept for resuming"
        else:
            shutil.rmtree(work, ignore_errors=True)
            kept = ""
        raise DiskFullError(
            f"disk full while writing {path or work} ({_gb(free or 0)} free; this stage needs about "
            f"{_gb(need)}, see `minima plan`){kept}",
            fix=f"free space on the disk of {out_dir.parent}, or set out_dir elsewhere, then rerun",
        ) from None


def _build(cfg, out_dir: Path, work: Path, inputs, input_hashes, key, body, force, resumable) -> Artifact:
    key_file = work / ".cache_key"
    resumed = False
    if work.exists():
        if resumable and key_file.is_file() and key_file.read_text() == key and not force:
            resumed = True
        else:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)

    run = StageRun(work_dir=work, out_dir=out_dir, config=cfg, resumed=resumed)
    t0 = time.time()
    extra = body(run) or {}
    run.metrics.update(extra)
    manifest = {
        "stage": cfg.stage,
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "cache_key": key,
        "inputs": {k: {"path": str(v) if v is not None else None, "hash": input_hashes[k]} for k, v in inputs.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "minima_version": __version__,
        "git_commit": git_commit(),
        "wall_time_s": round(time.time() - t0, 3),
        "metrics": run.metrics,
    }
    key_file.unlink(missing_ok=True)
    import yaml

    (work / "config.yaml").write_text(yaml.safe_dump(manifest["config"], sort_keys=False, allow_unicode=True))
    manifest.update(_probe(work, inputs))
    manifest["files"] = file_table(work)
    atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
    publish(work, out_dir)
    return Artifact(out_dir, manifest)


def _probe(work: Path, inputs: Mapping[str, Optional[str]]) -> dict:
    """The :data:`ARTIFACT_PROBES` fields of a finished work dir (a failing probe is logged, not fatal)."""
    out = {}
    for name, target in ARTIFACT_PROBES.items():
        module, fn = target.split(":")
        try:
            value = getattr(importlib.import_module(module), fn)(work, inputs)
        except ImportError:
            continue
        except MinimaError as e:
            log.warning(f"{name} not recorded: {e}")
            continue
        if value is not None:
            out[name] = value
    return out


def publish(work: Path, out_dir: Path) -> None:
    """Move a finished work dir into place; an existing out_dir is swapped out, then removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{int(time.time())}")
        os.rename(out_dir, trash)
        os.rename(work, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(work, out_dir)
