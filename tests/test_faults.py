"""Faults and bad input: each case ends in a clear message or a correct result, never silent damage.

One test per case, named after it: concurrent writers, tokenizer identity, damaged artifacts, a
full disk, validation before launch, and warnings that name things. The sandbox escapes are in
tests/test_sandbox.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minima.core.artifacts import (
    hash_input,
    lock_path,
    read_manifest,
    replacing_stale,
    run_stage,
)
from minima.core.config import VocabConfig
from minima.core.errors import ArtifactError, DiskFullError, LockError, TokenizerMismatchError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def minima_log(caplog):
    """caplog for the minima logger (which does not propagate to the root logger)."""
    logger = logging.getLogger("minima")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="minima")
    yield caplog
    logger.removeHandler(caplog.handler)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MINIMA_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    return env


def _wait_for(pred, timeout: float = 60.0, what: str = "condition") -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------ case 1: one writer per out_dir
HOLDER = r"""
import sys, time
from pathlib import Path
from minima.core.artifacts import run_stage
from minima.core.config import VocabConfig

out, started, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def body(run):
    (run.work_dir / "a.txt").write_text("first")
    started.write_text("1")
    while not go.exists():
        time.sleep(0.02)

run_stage(VocabConfig(out_dir=out), {}, body)
"""


def _holder(tmp_path: Path, name: str):
    started, go = tmp_path / f"{name}.started", tmp_path / f"{name}.go"
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / name), str(started), str(go)],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(started.exists, what="the holder to start writing")
    return p, go


def test_case1_second_writer_fails_naming_the_holder_or_waits_and_a_dead_holder_is_taken_over(tmp_path, minima_log):
    out = tmp_path / "out"
    holder, go = _holder(tmp_path, "out")
    try:
        with pytest.raises(LockError) as e:
            run_stage(VocabConfig(out_dir=str(out)), {}, lambda r: pytest.fail("must not run"))
        msg = str(e.value)
        assert f"pid {holder.pid} on " in msg and "started 20" in msg and "wait=true" in msg
        assert (tmp_path / "out.partial" / "a.txt").read_text() == "first"  # the holder's work is untouched

        # wait=true queues behind the holder, then finds its artifact (same config) and reuses it
        result = {}
        t = threading.Thread(
            target=lambda: result.update(a=run_stage(VocabConfig(out_dir=str(out), wait=True), {}, lambda r: None))
        )
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and "waiting for it" in minima_log.text
        go.write_text("1")
        t.join(60)
        assert holder.wait(60) == 0 and result["a"].skipped
        assert (out / "a.txt").read_text() == "first" and not lock_path(out).exists()
    finally:
        go.write_text("1")
        holder.wait(60)

    # a holder killed with SIGKILL leaves its lock file behind; the next run takes it over, with a warning
    killed, _ = _holder(tmp_path, "k")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert json.loads(lock_path(tmp_path / "k").read_text())["pid"] == killed.pid
    minima_log.clear()
    a = run_stage(
        VocabConfig(out_dir=str(tmp_path / "k")), {}, lambda r: (r.work_dir / "b.txt").write_text("ok") and None
    )
    assert (a.path / "b.txt").read_text() == "ok" and not a.skipped
    assert f"died without releasing it (pid {killed.pid} on" in minima_log.text


RUNNER = r"""
import sys, time
from pathlib import Path
# everything a records run imports, loaded before the start signal, so the run starts at once
from transformers import AutoTokenizer, PreTrainedTokenizerFast
import minima.stages.records
from minima.cli import main
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
sys.exit(main(sys.argv[2:]))
"""


def _records_cli(tmp_path: Path, name: str, args: list[str]):
    go = tmp_path / f"{name}.go"
    p = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(go), "records", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return p, go


def _shard_records(out: Path) -> dict[str, int]:
    """Records actually in the shards, counted from their .index files (one line per record)."""
    return {s: sum(len(f.read_text().splitlines()) for f in (out / s).glob("*.index")) for s in ("train", "dev")}


def test_case1_two_concurrent_records_runs_publish_a_manifest_that_matches_the_shards(
    tmp_path, tiny_tokenizer_dir, capsys, minima_log
):
    """Two `minima records` into one out_dir (another process, and this one): the second stops naming
    the first, or waits for it; the published manifest always counts the records the shards hold."""
    import minima.stages.records  # noqa: F401  (imported now, so this run reaches the lock at once)
    from minima.cli import main
    from minima.data.tokenizers import load_tokenizer

    load_tokenizer(tiny_tokenizer_dir)
    text = tmp_path / "corpus.txt"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "keeps", "running", "far"]
    text.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(30)) for i in range(8000)))
    out = tmp_path / "rec"
    common = [f"inputs={text}", f"tokenizer={tiny_tokenizer_dir}", f"out_dir={out}", "dev_fraction=0.01"]
    a, go_a = _records_cli(tmp_path, "a", [*common, "max_length=64"])
    go_a.write_text("1")
    _wait_for(lock_path(out).exists, what="run a to take the lock")
    capsys.readouterr()
    assert main(["records", *common, "max_length=32", "--force"]) == 2
    b_err = capsys.readouterr().err
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err
    assert f"being written by another run (pid {a.pid} on" in b_err, b_err
    m = read_manifest(out)
    assert m["config"]["max_length"] == 64 and m["metrics"]["num_records"] == _shard_records(out)

    # with wait=true the second run queues behind the first and then replaces its artifact whole
    a, go_a = _records_cli(tmp_path, "a2", [*common, "max_length=64", "--force"])
    go_a.write_text("1")
    _wait_for(lock_path(out).exists, what="run a2 to take the lock")
    assert main(["records", *common, "max_length=32", "--force", "wait=true"]) == 0
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err
    assert f"(pid {a.pid} on" in minima_log.text and "waiting for it" in minima_log.text
    m = read_manifest(out)
    assert m["config"]["max_length"] == 32 and m["metrics"]["num_records"] == _shard_records(out)
    assert sum(m["metrics"]["num_records"].values()) > 0 and not lock_path(out).exists()


# ------------------------------------------------------------------------------ case 2: tokenizer identity
def _permuted_tokenizer(demo_data_dir: Path, out: Path) -> Path:
    """The demo tokenizer with two normal pieces swapped: same vocab size, different ids."""
    from minima.data.tokenizers import NORMAL, load_proto, save_proto_tokenizer

    proto = load_proto(demo_data_dir / "tokenizers" / "base_en.model")
    i, j = [k for k, p in enumerate(proto.pieces) if p.type == NORMAL][100:102]
    a, b = proto.pieces[i].piece, proto.pieces[j].piece
    proto.pieces[i].piece, proto.pieces[j].piece = b, a
    return save_proto_tokenizer(proto, out)


def _records(tmp_path: Path, name: str, tokenizer: Path, **kw):
    from minima.core.config import RecordsConfig
    from minima.stages.records import run

    kw.setdefault("max_length", 64)
    kw.setdefault("dev_fraction", 0.1)
    return run(RecordsConfig(out_dir=str(tmp_path / name), tokenizer=str(tokenizer), **kw))


def test_case2_records_from_another_tokenizer_of_the_same_size_are_refused(
    tmp_path, demo_data_dir, tiny_tokenizer_dir, tiny_model_dir
):
    import shutil

    from minima.core.config import DistillConfig, PruneConfig, SftConfig
    from minima.data.tokenizers import load_tokenizer, tokenizer_fingerprint
    from minima.stages import distill, prune, sft

    perm = _permuted_tokenizer(demo_data_dir, tmp_path / "perm_tok")
    assert len(load_tokenizer(perm)) == len(load_tokenizer(tiny_tokenizer_dir))
    fp_model, fp_perm = tokenizer_fingerprint(tiny_model_dir), tokenizer_fingerprint(perm)
    assert fp_model == tokenizer_fingerprint(tiny_tokenizer_dir) != fp_perm  # a saved copy is the same tokenizer

    text = str(demo_data_dir / "text" / "pretrain_en.txt")
    chat = str(demo_data_dir / "chat" / "demo_chat.json")
    lm_bad = _records(tmp_path, "lm_bad", perm, inputs=text)
    chat_bad = _records(tmp_path, "chat_bad", perm, inputs=chat, format="chat", max_length=256)
    assert read_manifest(lm_bad.path)["tokenizer_fingerprint"] == fp_perm

    def refused(fn, *args):
        with pytest.raises(TokenizerMismatchError) as e:
            fn(*args)
        msg = str(e.value)
        assert fp_model in msg and fp_perm in msg and str(tiny_model_dir) in msg, msg
        return msg

    d = DistillConfig(teacher=str(tiny_model_dir), student=str(tiny_model_dir), records=str(lm_bad.path))
    assert "teacher tokenizer" in refused(distill.validate_inputs, d)
    d = d.model_copy(update={"loss": d.loss.model_copy(update={"alpha": 1.0}), "teacher": None})
    assert "student tokenizer" in refused(distill.validate_inputs, d)  # CE-only: the student alone is checked
    refused(sft.validate, SftConfig(model=str(tiny_model_dir), records=str(chat_bad.path)))
    refused(prune.validate_inputs, PruneConfig(teacher=str(tiny_model_dir), records=str(lm_bad.path), num_layers=2))

    # the same tokenizer with another chat template is the same tokenizer: accepted
    other = tmp_path / "tok_template"
    shutil.copytree(tiny_tokenizer_dir, other)
    cfg_file = other / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    cfg_file.write_text(json.dumps(cfg))
    assert tokenizer_fingerprint(other) == fp_model
    lm_ok = _records(tmp_path, "lm_ok", other, inputs=text)
    distill.validate_inputs(
        DistillConfig(teacher=str(tiny_model_dir), student=str(tiny_model_dir), records=str(lm_ok.path))
    )
    prune.validate_inputs(PruneConfig(teacher=str(tiny_model_dir), records=str(lm_ok.path), num_layers=2))


# ------------------------------------------------------------------------------ case 5: damaged artifacts
def test_case5_a_truncated_model_file_is_never_reported_cached(tmp_path, tiny_model_dir, minima_log):
    from minima.cli import main
    from minima.core.config import PruneConfig
    from minima.stages import prune

    out = tmp_path / "pruned"
    args = ["prune", f"teacher={tiny_model_dir}", f"out_dir={out}", "importance=magnitude"]
    args += ["keep_layers=[0,1]", "num_layers=2", "device=cpu"]
    assert main(args) == 0
    m = read_manifest(out)
    weights = out / "model.safetensors"
    entry = m["files"]["model.safetensors"]
    assert entry["size"] == weights.stat().st_size and entry["checksum"].split(":")[0] in ("xxh3_128", "sha256")
    assert m["tokenizer_fingerprint"] == read_manifest(out)["tokenizer_fingerprint"]
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError) as e:
        hash_input(out)  # a downstream stage's cache key: checks sizes
    assert "model.safetensors" in str(e.value) and "--force" in str(e.value)
    err = subprocess.run(
        [sys.executable, "-m", "minima.cli", *args], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert err.returncode == 2 and "cached, skipped" not in err.stdout
    assert "model.safetensors" in err.stderr and "damaged" in err.stderr and "--force" in err.stderr

    # same size, one byte changed: verify=full (the default below 1 GB) sees it, verify=sizes does not
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    cfg = PruneConfig(
        teacher=str(tiny_model_dir), out_dir=str(out), importance="magnitude", keep_layers=[0, 1], num_layers=2
    )
    assert prune.run(cfg.model_copy(update={"verify": "sizes"})).skipped
    with pytest.raises(ArtifactError, match="model.safetensors: checksum"):
        prune.run(cfg)
    # inside a pipeline run the damaged artifact is rebuilt, with a warning naming the file
    with replacing_stale():
        a = prune.run(cfg)
    assert not a.skipped and weights.read_bytes() == good
    assert "damaged (model.safetensors: checksum" in minima_log.text and "rebuilding" in minima_log.text


# ------------------------------------------------------------------------------ case 7: disk full
@contextlib.contextmanager
def _tiny_disk(path: Path, size: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_case7_disk_full_is_one_line_and_keeps_the_previous_artifact(tmp_path, tiny_tokenizer_dir):
    import torch

    from minima.cli import main

    with _tiny_disk(tmp_path / "disk", "2m") as disk:
        cfg = VocabConfig(out_dir=str(disk / "out"))
        run_stage(cfg, {}, lambda r: (r.work_dir / "small.bin").write_bytes(b"x" * 100_000) and None)

        def big(r):
            with open(r.work_dir / "big.bin", "wb") as f:
                for _ in range(8):
                    f.write(os.urandom(1 << 20))

        with pytest.raises(DiskFullError) as e:
            run_stage(cfg, {}, big, force=True)
        msg = str(e.value)
        assert msg.startswith(f"disk full while writing {disk / 'out.partial' / 'big.bin'} (")
        assert " GB free; this stage needs about " in msg and "see `minima plan`" in msg and "\n" not in msg
        assert not (disk / "out.partial").exists() and (disk / "out" / "small.bin").stat().st_size == 100_000
        assert read_manifest(disk / "out")["files"]["small.bin"]["size"] == 100_000

        # torch hides the errno ("basic_ios::clear" / "file write failed"): still a disk-full error
        with pytest.raises(DiskFullError, match="disk full while writing"):
            run_stage(cfg, {}, lambda r: torch.save(torch.zeros(1 << 20), r.work_dir / "t.pt"), force=True)
        assert not (disk / "out.partial").exists() and read_manifest(disk / "out")

    # the CLI: exit 2, the message on one line, nothing half-written left
    with _tiny_disk(tmp_path / "disk2", "64k") as disk:
        (tmp_path / "a.txt").write_text("one two three\n" * 50)
        proc = subprocess.run(
            [sys.executable, "-m", "minima.cli", "records", f"inputs={tmp_path / 'a.txt'}"]
            + [f"tokenizer={tiny_tokenizer_dir}", f"out_dir={disk / 'rec'}", "max_length=16"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr
        first = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(first) == 1 and "disk full while writing" in first[0] and "Traceback" not in proc.stderr
        assert sorted(p.name for p in disk.iterdir()) == []
    assert main  # the CLI module imports in-process too


# ------------------------------------------------------------------------------ case 8: validate before launch
def test_case8_bad_train_config_fails_before_any_dir_lock_or_worker(tmp_path, tiny_model_dir):
    from minima.core.config import AdaptConfig, ConfigError, build

    work = tmp_path / "runs"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "minima.cli", "adapt", "max_steps=-3", f"model={tiny_model_dir}"]
        + [f"records={tmp_path / 'none'}", f"out_dir={work / 'adapt'}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: AdaptConfig.max_steps: ") and "-3" in lines[0]
    assert lines[1].startswith("hint: ")
    assert list(work.iterdir()) == []  # no out_dir, no .partial, no lock file
    for bad in ("max_steps=0", "betas=[0.9, 1.5]", "launch.master_port=70000", "launch.gpus_per_node=0"):
        with pytest.raises(ConfigError):
            build(AdaptConfig, overrides=[bad])


# ------------------------------------------------------------------------------ case 10: warnings that name things
def test_case10_skipped_records_tiny_dev_split_chat_records_in_distill_and_corrupt_tokenizer(
    tmp_path, demo_data_dir, tiny_tokenizer_dir, tiny_model_dir, minima_log
):
    import shutil

    from minima.core.config import DistillConfig
    from minima.core.errors import ConfigError, InputError
    from minima.data.tokenizers import load_tokenizer
    from minima.stages import distill

    src = tmp_path / "docs.jsonl"
    rows = []
    for i in range(40):
        rows.append("{broken" if i % 5 == 2 else json.dumps({"text": f"document number {i} about foxes"}))
    src.write_text("\n".join(rows) + "\n")
    bad = [f"{src}:{i + 1}" for i in range(40) if i % 5 == 2]  # 8 malformed lines
    art = _records(tmp_path, "skip", tiny_tokenizer_dir, inputs=str(src), on_error="skip", dev_fraction=0.05)
    named = art.metrics["skipped_records"]
    assert [s.split(": ")[0] for s in named] == bad  # all of them in the manifest, by file:line
    logged = [r.getMessage() for r in minima_log.records if "skipped" in r.getMessage() and src.name in r.getMessage()]
    assert [m.split("skipped ")[1].split(": ")[0] for m in logged] == bad[:5]
    assert "3 more skipped records" in minima_log.text
    assert any("dev split is tiny" in w for w in art.metrics["warnings"]) and "dev split is tiny" in minima_log.text

    chat = _records(
        tmp_path, "chat", tiny_tokenizer_dir, inputs=str(demo_data_dir / "chat" / "demo_chat.json"), format="chat"
    )
    with pytest.raises(ConfigError) as e:
        distill.validate_inputs(
            DistillConfig(teacher=str(tiny_model_dir), student=str(tiny_model_dir), records=str(chat.path))
        )
    assert "format=lm" in str(e.value) and "format=chat" in str(e.value) and "sft" in str(e.value)

    broken = tmp_path / "broken_tok"
    shutil.copytree(tiny_tokenizer_dir, broken)
    (broken / "tokenizer.json").write_text((broken / "tokenizer.json").read_text()[:500])
    (broken / "tokenizer.model").unlink()
    with pytest.raises(InputError) as e:
        load_tokenizer(broken)
    assert str(e.value).startswith(f"{broken}: tokenizer at {broken} is unreadable: ")
