"""Artifacts: directories that one stage writes and the next one reads.

An artifact is complete exactly when its ``manifest.json`` exists. A stage builds into
``<out_dir>.partial``, writes the manifest there last (atomically), and then renames the directory
into place, so a crash at any point leaves either the previous artifact or nothing that looks
complete. A training stage keeps ``.partial`` between attempts so it can resume from checkpoints.

The cache key of an artifact is the hash of (stage, config without nohash fields, input hashes). A
stage whose out_dir already holds a complete artifact with the same key is skipped unless forced.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from minima import __version__
from minima.core.config import StageConfig, hash_view
from minima.core.errors import ArtifactError

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
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
        return read_manifest(p)["cache_key"]
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


def run_stage(
    cfg: StageConfig,
    inputs: Mapping[str, Optional[str]],
    body: Callable[[StageRun], Optional[dict]],
    *,
    force: bool = False,
    resumable: bool = False,
) -> Artifact:
    """Run ``body`` into a temp dir and publish it atomically as the stage's artifact.

    Args:
        cfg: the resolved stage config (its out_dir is where the artifact lands).
        inputs: name -> input path; their hashes go into the cache key and the manifest.
        body: writes the outputs into ``run.work_dir``; may return extra metrics.
        force: rebuild even when a complete artifact with the same key exists, and replace an
            artifact with a different key.
        resumable: keep ``<out_dir>.partial`` from an interrupted attempt with the same key
            (training resumes from its checkpoints); otherwise a stale one is wiped.
    """
    out_dir = cfg.resolved_out_dir()
    input_hashes = {k: hash_input(v) for k, v in inputs.items()}
    key = cache_key(cfg, input_hashes)
    if is_complete(out_dir):
        old = read_manifest(out_dir)
        if old.get("cache_key") == key and not force:
            return Artifact(out_dir, old, skipped=True)
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

    work = _partial_dir(out_dir)
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
    atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
    publish(work, out_dir)
    return Artifact(out_dir, manifest)


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
