"""Stage adapt: CLI kill-and-resume equals an uninterrupted run, new-embedding-only training,
and bad input rejected before any training."""

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

from minima.core.config import AdaptConfig
from minima.core.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    InputError,
)
from minima.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
ONE_THREAD = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_data_dir, tiny_tokenizer_dir):
    """Tiny lm records (seq 32) from the demo corpus and a tiny Llama (hidden 64, 2 layers) for its tokenizer."""
    from minima.testing import lm_records, save_tiny_model

    d = tmp_path_factory.mktemp("adapt")
    rec = lm_records(d, demo_data_dir / "text" / "pretrain_en.txt", tiny_tokenizer_dir)
    model = save_tiny_model(d / "model", tiny_tokenizer_dir, seed=0, **SHAPE)
    return d, model, rec


def cli_args(model, rec, out, *extra) -> list[str]:
    return [
        "adapt",
        "--preset",
        "tiny",
        f"model={model}",
        f"records={rec}",
        f"out_dir={out}",
        "max_steps=12",
        "save_steps=4",
        "eval_steps=6",
        "micro_batch_size=4",
        "keep_last=2",
        *extra,
    ]


def run_cli_inprocess(args: list[str]) -> int:
    from minima.cli import main

    old = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        return main(args)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def reference(inputs):
    """The uninterrupted run (in-process, 1 thread)."""
    d, model, rec = inputs
    assert run_cli_inprocess(cli_args(model, rec, d / "ref")) == 0
    return d / "ref"


def test_kill_and_resume_equals_uninterrupted(inputs, reference):
    """SIGKILL the CLI's training subprocess after the step-4 checkpoint; the rerun resumes there and ends
    bitwise equal (fp32 on CPU, same thread count) with every batch exactly once in metrics.jsonl."""
    d, model, rec = inputs
    out = d / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_NUM_THREADS="1", MINIMA_STEP_DELAY_S="0.5", PYTHONPATH=str(ROOT))
    env.pop("MINIMA_INPROCESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "minima.cli", *cli_args(model, rec, out)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marker = out.with_name("killed.partial") / "checkpoints" / "step_00000004" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.is_file():
        assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, torchrun and the worker
    log = proc.communicate(timeout=60)[0]  # returns once every process holding the pipe is gone
    assert "launch: " in log and "torch.distributed.run" in log  # the exact command is printed
    assert not (out / "manifest.json").exists()
    partial = out.with_name("killed.partial")
    steps_before = [r["step"] for r in read_metrics(partial / "metrics.jsonl") if r["split"] == "train"]
    assert 4 <= max(steps_before) < 12

    assert run_cli_inprocess(cli_args(model, rec, out)) == 0
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ref_m = [r for r in read_metrics(reference / "metrics.jsonl") if r["split"] == "train"]
    got_m = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in got_m] == list(range(1, 13))
    assert [r["batch_hash"] for r in got_m] == [r["batch_hash"] for r in ref_m]
    assert [r["loss"] for r in got_m] == [r["loss"] for r in ref_m]
    # keep_last=2: steps 8 and 12 remain
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000008", "step_00000012"]


def test_acceptance_outputs(reference):
    """The published dir loads with AutoModelForCausalLM, the loss falls, and a rerun skips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(reference))
    tok = AutoTokenizer.from_pretrained(str(reference))
    assert model.config.vocab_size == len(tok)
    train = [r for r in read_metrics(reference / "metrics.jsonl") if r["split"] == "train"]
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3]) - 1.0
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["stage"] == "adapt" and manifest["metrics"]["steps"] == 12 and "dev_loss" in manifest["metrics"]
    assert (reference / "config.yaml").is_file() and (reference / "ds_config.resolved.json").is_file()
    mtime = (reference / "manifest.json").stat().st_mtime_ns
    d = reference.parent
    assert run_cli_inprocess(cli_args(d / "model", d / "records", reference)) == 0
    assert (reference / "manifest.json").stat().st_mtime_ns == mtime  # skipped, not retrained


@pytest.mark.parametrize("zero", [2, 3])
def test_train_only_new_embeddings(inputs, zero):
    """Only rows >= new_token_start of embed_tokens/lm_head change; everything else is bit-identical."""
    from minima.stages.adapt import run

    d, model, rec = inputs
    start = 900
    cfg = AdaptConfig(
        model=str(model),
        records=str(rec),
        out_dir=str(d / f"newemb{zero}"),
        precision="fp32",
        zero_stage=zero,
        micro_batch_size=4,
        max_steps=3,
        lr=1e-2,
        train_only_new_embeddings=True,
        new_token_start=start,
    )
    old = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        art = run(cfg)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    before, after = weights(model), weights(art.path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}
    for k in changed:
        assert torch.equal(before[k][:start], after[k][:start])
        assert not torch.equal(before[k][start:], after[k][start:])


def test_new_token_start_from_vocab_manifest(inputs, tmp_path):
    from minima.stages.adapt import resolve_new_token_start

    d, model, rec = inputs
    vocab_art = tmp_path / "vocab"
    vocab_art.mkdir()
    (vocab_art / "manifest.json").write_text(json.dumps({"metrics": {"new_token_start": 777}}))
    assert (
        resolve_new_token_start(AdaptConfig(model=str(vocab_art), records=str(rec), train_only_new_embeddings=True))
        == 777
    )
    with pytest.raises(ConfigError, match="new_token_start"):
        resolve_new_token_start(AdaptConfig(model=str(model), records=str(rec), train_only_new_embeddings=True))


def _expect(err, match, **kw):
    from minima.stages.adapt import run

    with pytest.raises(err, match=match):
        run(AdaptConfig(**kw))


def test_bad_input_fails_before_training(inputs, tmp_path, tiny_tokenizer_dir):

    d, model, rec = inputs
    out = tmp_path / "out"
    common = dict(precision="fp32", max_steps=2, out_dir=str(out))
    # missing records
    _expect(InputError, "records not found", model=str(model), records=str(tmp_path / "nope"), **common)
    # not a model dir
    _expect(InputError, "config.json", model=str(tmp_path), records=str(rec), **common)
    # unreadable ds_config names file:line
    bad = tmp_path / "ds.json"
    bad.write_text("{\n\n  oops\n}")
    _expect(ConfigError, r"ds.json:3", model=str(model), records=str(rec), ds_config=str(bad), **common)
    # a model with a smaller vocab than the records' ids: the arithmetic is in the message
    from minima.testing import tiny_llama

    small_dir = tmp_path / "small"
    tiny_llama(500, **SHAPE).save_pretrained(str(small_dir))
    _expect(DataError, "1000 tokens but the model's vocab is 500", model=str(small_dir), records=str(rec), **common)
    # an id out of range below the tokenizer's size: the manifest's id range reveals it without reading a shard
    rec2 = tmp_path / "rec2"
    import shutil

    shutil.copytree(rec, rec2)
    m = json.loads((rec2 / "manifest.json").read_text())
    m["metrics"]["vocab_size"] = 400
    (rec2 / "manifest.json").write_text(json.dumps(m))
    tiny_llama(400, **SHAPE).save_pretrained(str(tmp_path / "m400"))
    _expect(
        DataError,
        r"manifest.json \(min_token_id=\d+, max_token_id=",
        model=str(tmp_path / "m400"),
        records=str(rec2),
        **common,
    )
    # records without the range in their manifest: found by the scan, naming file and record
    del m["metrics"]["max_token_id"], m["metrics"]["min_token_id"]
    (rec2 / "manifest.json").write_text(json.dumps(m))
    _expect(DataError, r"part-\d+\.tfrecord record \d+", model=str(tmp_path / "m400"), records=str(rec2), **common)
    # tokenizer and model disagree: the model dir's tokenizer has an extra token the records' lacks
    from transformers import AutoTokenizer

    other = tmp_path / "other_tok"
    shutil.copytree(model, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<extra_piece>"])
    tok.save_pretrained(str(other))
    _expect(DataError, "differs from the records", model=str(other), records=str(rec), **common)
    # chat records are refused
    rec3 = tmp_path / "rec3"
    shutil.copytree(rec, rec3)
    m = json.loads((rec3 / "manifest.json").read_text())
    m["metrics"]["format"] = "chat"
    (rec3 / "manifest.json").write_text(json.dumps(m))
    _expect(ConfigError, "format=lm", model=str(model), records=str(rec3), **common)
    # nothing was created by any of these
    assert not out.exists() and not out.with_name("out.partial").exists()
    # out_dir clash: a non-artifact dir with files in it
    out.mkdir()
    (out / "precious.txt").write_text("x")
    _expect(ArtifactError, "not a minima artifact", model=str(model), records=str(rec), **common)
    assert (out / "precious.txt").read_text() == "x"


def test_cli_reports_bad_input_as_one_line(inputs, tmp_path, capsys):
    d, model, rec = inputs
    rc = run_cli_inprocess(["adapt", f"model={model}", f"records={tmp_path / 'missing'}", f"out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "records not found" in err and "hint:" in err


def test_manifest_keeps_the_token_id_range(inputs):
    from minima.data.records import tfrecord_io as tio

    _, _, rec = inputs
    ids = []
    for f in sorted(Path(rec).glob("*/part-*.tfrecord")):
        with open(f, "rb") as fh:
            ids += [tio.decode_example(e, str(f))["indices"] for e in tio.iter_entries(fh, str(f))]
    m = json.loads((Path(rec) / "manifest.json").read_text())["metrics"]
    assert m["min_token_id"] == min(int(x.min()) for x in ids) and m["max_token_id"] == max(int(x.max()) for x in ids)


def _many_shards(root: Path, n: int) -> Path:
    import numpy as np

    from minima.data.records.tfrecord_io import ShardWriter

    with ShardWriter(root / "train", 1) as w:
        for i in range(n):
            w.write({"indices": np.arange(i % 50, i % 50 + 8)})
    (root / "dev").mkdir()
    (root / "manifest.json").write_text(json.dumps({"metrics": {"format": "lm", "total_tokens": 10**11}}))
    return root


def test_prelaunch_scan_time_does_not_grow_with_shards(tmp_path):
    """A 126B-token corpus has ~3,000 shards: without a manifest id range the scan reads a fixed sample (at
    most SAMPLE_SHARDS shards, SAMPLE_RECORDS records) whatever the count; with one it reads no shard."""
    import time

    from minima.stages import adapt

    timings = {}
    for n in (300, 3000):
        rec = _many_shards(tmp_path / f"r{n}", n)
        t0 = time.perf_counter()
        scanned, shards = adapt._scan_records(rec, 1000, full=False)
        timings[n] = time.perf_counter() - t0
        assert shards == adapt.SAMPLE_SHARDS and scanned == shards  # one record per shard here
    print(f"pre-launch scan: 300 shards {timings[300]:.3f}s, 3000 shards {timings[3000]:.3f}s")
    assert timings[3000] < 1.0 + 3 * timings[300]
    with pytest.raises(DataError, match=r"part-\d+\.tfrecord record 0"):
        adapt._scan_records(rec, 40, full=False)  # ids reach 57: the sample still sees bad ids
    meta = {"min_token_id": 0, "max_token_id": 57}
    assert adapt._check_id_range(meta, rec, 58) and not adapt._check_id_range({}, rec, 58)
    with pytest.raises(DataError, match="token id 57"):
        adapt._check_id_range(meta, rec, 57)
