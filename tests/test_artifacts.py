import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from minima.core.artifacts import (
    Artifact,
    config_hash,
    hash_input,
    is_complete,
    read_manifest,
    run_stage,
)
from minima.core.config import RecordsConfig, VocabConfig
from minima.core.errors import ArtifactError


def _body(text):
    def body(run):
        (run.work_dir / "out.txt").write_text(text)
        return {"n": len(text)}

    return body


def test_hash_stable_under_key_order_and_blind_to_nohash():
    a = VocabConfig.model_validate({"mode": "minima", "pad_to_multiple_of": 64, "seed": 1})
    b = VocabConfig.model_validate({"seed": 1, "pad_to_multiple_of": 64, "mode": "minima"})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) == config_hash(a.model_copy(update={"out_dir": "/elsewhere", "run_dir": "r2"}))
    assert config_hash(a) != config_hash(a.model_copy(update={"pad_to_multiple_of": 128}))
    r = RecordsConfig()
    assert config_hash(r) == config_hash(r.model_copy(update={"num_workers": 8}))


def test_publish_skip_force_and_clash(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    cfg = VocabConfig(out_dir=str(tmp_path / "out"))
    a1 = run_stage(cfg, {"src": str(src)}, _body("one"))
    assert not a1.skipped and is_complete(a1.path)
    m = read_manifest(a1.path)
    assert m["stage"] == "vocab" and m["metrics"]["n"] == 3 and m["inputs"]["src"]["hash"] == hash_input(src)
    assert (a1.path / "config.yaml").is_file()
    # same config + inputs: skipped, body not called
    a2 = run_stage(cfg, {"src": str(src)}, lambda run: pytest.fail("body must not run"))
    assert a2.skipped and a2.cache_key == a1.cache_key
    # changed input content: a different artifact -> clash unless forced
    src.write_text("hello!")
    with pytest.raises(ArtifactError) as e:
        run_stage(cfg, {"src": str(src)}, _body("two"))
    assert "--force" in str(e.value)
    assert (a1.path / "out.txt").read_text() == "one"  # the previous artifact is intact
    a3 = run_stage(cfg, {"src": str(src)}, _body("two"), force=True)
    assert (a3.path / "out.txt").read_text() == "two" and a3.cache_key != a1.cache_key
    assert not any(p.name.startswith(".out.old") for p in tmp_path.iterdir())


def test_failing_body_leaves_previous_artifact(tmp_path):
    cfg = VocabConfig(out_dir=str(tmp_path / "out"))
    run_stage(cfg, {}, _body("good"))

    def bad(run):
        (run.work_dir / "out.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(cfg, {}, bad, force=True)
    assert (tmp_path / "out" / "out.txt").read_text() == "good"
    assert Artifact.load(tmp_path / "out").metrics["n"] == 4


def test_non_artifact_dir_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("x")
    with pytest.raises(ArtifactError) as e:
        run_stage(VocabConfig(out_dir=str(tmp_path / "out")), {}, _body("a"))
    assert "not a minima artifact" in str(e.value)
    assert (tmp_path / "out" / "precious.txt").read_text() == "x"


def _slow_stage(out_dir):
    def body(run):
        (run.work_dir / "a.bin").write_bytes(b"x" * 1000)
        time.sleep(60)

    run_stage(VocabConfig(out_dir=out_dir), {}, body)


def test_crash_mid_write_leaves_nothing_complete(tmp_path):
    """SIGKILL while the stage is writing: no complete-looking artifact, and a rerun succeeds."""
    out = tmp_path / "out"
    p = mp.get_context("spawn").Process(target=_slow_stage, args=(str(out),))
    p.start()
    partial = tmp_path / "out.partial"
    for _ in range(300):
        if (partial / "a.bin").exists():
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert not is_complete(out) and not out.exists()
    with pytest.raises(ArtifactError):
        read_manifest(out)
    a = run_stage(VocabConfig(out_dir=str(out)), {}, _body("ok"))
    assert is_complete(a.path) and not partial.exists()


def test_resumable_partial_is_kept_only_for_same_key(tmp_path):
    cfg = VocabConfig(out_dir=str(tmp_path / "out"))
    seen = {}

    def crash(run):
        (run.work_dir / "ckpt").write_text("step 10")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, {}, crash, resumable=True)

    def resume(run):
        seen["resumed"] = run.resumed
        seen["ckpt"] = (run.work_dir / "ckpt").read_text()

    run_stage(cfg, {}, resume, resumable=True)
    assert seen == {"resumed": True, "ckpt": "step 10"}
    # a different config never resumes from a stale partial
    cfg2 = cfg.model_copy(update={"seed": 5})
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg2.model_copy(update={"out_dir": str(tmp_path / "o2")}), {}, crash, resumable=True)
    seen.clear()
    run_stage(
        cfg2.model_copy(update={"out_dir": str(tmp_path / "o2"), "seed": 6}),
        {},
        lambda r: seen.update(resumed=r.resumed, has=(r.work_dir / "ckpt").exists()),
        resumable=True,
    )
    assert seen == {"resumed": False, "has": False}


def test_manifest_is_valid_json_with_required_fields(tmp_path):
    import hashlib
    import subprocess
    from datetime import datetime
    from pathlib import Path

    import minima

    src = tmp_path / "in.txt"
    src.write_text("input bytes")
    cfg = VocabConfig(out_dir=str(tmp_path / "o"), seed=3)
    t0 = time.time()
    a = run_stage(cfg, {"x": None, "src": str(src)}, _body("zz"))
    t1 = time.time()
    m = json.loads((a.path / "manifest.json").read_text())
    assert m["stage"] == "vocab" and m["metrics"]["n"] == 2
    assert m["config"] == json.loads(cfg.model_dump_json()) and m["config"]["seed"] == 3
    # the hashes, recomputed by hand from the canonical JSON of the documented fields
    canon = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    sha = lambda t: hashlib.sha256(t.encode()).hexdigest()
    # out_dir, run_dir, wait and verify change where and how a stage runs, not what it builds
    view = {k: v for k, v in m["config"].items() if k not in ("out_dir", "run_dir", "wait", "verify")}
    assert m["config_hash"] == config_hash(cfg) == sha(canon({"stage": "vocab", "config": view}))
    src_hash = hashlib.sha256(b"input bytes").hexdigest()
    assert m["inputs"] == {"x": {"path": None, "hash": None}, "src": {"path": str(src), "hash": src_hash}}
    assert m["cache_key"] == sha(canon({"config": m["config_hash"], "inputs": {"src": src_hash, "x": None}}))
    created = datetime.strptime(m["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert t0 - 1 <= created <= t1 + 1
    assert 0 <= m["wall_time_s"] <= t1 - t0 + 0.01
    assert m["minima_version"] == minima.__version__
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(minima.__file__).parent
    )
    assert m["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert set(m["files"]) >= {"out.txt", "config.yaml"}
    assert m["files"]["out.txt"]["size"] == 2
