"""The records reader: rank/worker sharding, seeded per-epoch shuffle, exact resume, labels, collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from minima.core.errors import ConfigError, DataError
from minima.data.records import RecordDataset, collate
from minima.data.records.tfrecord_io import ShardWriter

N = 103


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory):
    """103 records in 11 shards; record i holds [i, i+1, ...] of length 3 + i % 5."""
    d = tmp_path_factory.mktemp("records")
    with ShardWriter(d / "train", 10) as w:
        for i in range(N):
            w.write({"indices": np.arange(i, i + 3 + i % 5)})
    (d / "dev").mkdir()
    return d


def ids_of(samples) -> list[int]:
    return [int(s["input_ids"][0]) for s in samples]


def test_ranks_together_see_every_record_once_per_epoch(rec_dir):
    for world in (2, 3):
        orders = []
        for epoch in (0, 1):
            seen = []
            for rank in range(world):
                ds = RecordDataset(str(rec_dir), "train", rank, world, seed=5, shuffle_buffer=16)
                ds.set_epoch(epoch)
                got = ids_of(ds)
                assert len(got) == ds.samples_per_epoch() == len(ds)
                seen += got
            assert sorted(seen) == list(range(N))
            orders.append(seen)
        assert orders[0] != orders[1], "the shuffle differs per epoch"


def test_shuffle_is_seeded_and_buffer_zero_reads_in_order(rec_dir):
    a = ids_of(RecordDataset(str(rec_dir), seed=1, shuffle_buffer=16))
    assert a == ids_of(RecordDataset(str(rec_dir), seed=1, shuffle_buffer=16))
    assert a != ids_of(RecordDataset(str(rec_dir), seed=2, shuffle_buffer=16))
    assert ids_of(RecordDataset(str(rec_dir), shuffle_buffer=0)) == list(range(N))
    assert ids_of(RecordDataset(str(rec_dir), rank=1, world_size=2, shuffle_buffer=0)) == list(range(1, N, 2))


def test_dataloader_workers_each_take_their_share(rec_dir):
    ds = RecordDataset(str(rec_dir), seed=3, shuffle_buffer=16)
    plain = [
        int(x) for b in DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate) for x in b["input_ids"][:, 0]
    ]
    assert sorted(plain) == list(range(N))
    # With the loader helper, the batch order is the single-process order for any worker count.
    ref = ids_of(RecordDataset(str(rec_dir), seed=3, shuffle_buffer=16))
    for workers in (0, 2):
        ds = RecordDataset(str(rec_dir), seed=3, shuffle_buffer=16)
        got = [int(x) for b in ds.loader(4, num_workers=workers) for x in b["input_ids"][:, 0]]
        assert got == ref


@pytest.mark.parametrize("rank,world,cut", [(0, 1, 1), (0, 1, 37), (0, 1, 103), (1, 2, 60), (0, 2, 140)])
def test_resume_in_process_matches_an_uninterrupted_read(rec_dir, rank, world, cut):
    def make():
        return RecordDataset(str(rec_dir), "train", rank, world, seed=9, shuffle_buffer=16, loop=True)

    full = make()
    it = iter(full)
    ref = [int(next(it)["input_ids"][0]) for _ in range(cut + 80)]  # crosses an epoch boundary
    first = make()
    it = iter(first)
    head = [int(next(it)["input_ids"][0]) for _ in range(cut)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [int(next(it)["input_ids"][0]) for _ in range(80)]
    assert head + tail == ref


def test_resume_with_dataloader_workers(rec_dir):
    def batches(ds, n, workers):
        out = []
        for b in ds.loader(4, num_workers=workers):
            out.append(b["input_ids"][:, 0].tolist())
            if len(out) == n:
                break
        return out

    ref = batches(RecordDataset(str(rec_dir), seed=4, shuffle_buffer=16, loop=True), 40, 0)
    ds = RecordDataset(str(rec_dir), seed=4, shuffle_buffer=16, loop=True)
    head = batches(ds, 30, 2)  # 120 samples: past the end of epoch 0
    state = ds.state_dict()
    assert (state["epoch"], state["offset"]) == (1, 120 - N)
    ds2 = RecordDataset(str(rec_dir), seed=4, shuffle_buffer=16, loop=True)
    ds2.load_state_dict(state)
    assert head + batches(ds2, 10, 2) == ref


def test_finished_epoch_state_continues_with_the_next_epoch(rec_dir):
    ds = RecordDataset(str(rec_dir), seed=4, shuffle_buffer=16)
    first = ids_of(ds)
    assert ds.state_dict()["offset"] == N
    second = ids_of(ds)  # no set_epoch: a finished epoch goes on with the next one
    assert sorted(second) == list(range(N)) and second != first
    ds.set_epoch(0)
    assert ids_of(ds) == first


def test_state_from_another_setup_is_refused(rec_dir):
    state = RecordDataset(str(rec_dir), seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed=1 in the checkpoint"):
        RecordDataset(str(rec_dir), seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="world_size"):
        RecordDataset(str(rec_dir), seed=1, rank=0, world_size=2).load_state_dict(state)


def test_labels_attention_and_collate(tmp_path):
    with ShardWriter(tmp_path / "train", 10) as w:
        w.write({"indices": [1, 5, 6, 2, 7, 8, 2], "mask": [0, 0, 0, 0, 1, 1, 1]})  # chat: reply + EOS trained
        w.write({"indices": [1, 9, 2, 0, 0], "mask": [1, 1, 1, 0, 0]})  # lm tail: padding
        w.write({"indices": [1, 3, 4]})  # lm: every token trained
    a, b, c = list(RecordDataset(str(tmp_path), shuffle_buffer=0))
    assert a["labels"].tolist() == [-100, -100, -100, -100, 7, 8, 2] and a["attention_mask"].tolist() == [1] * 7
    assert b["labels"].tolist() == [1, 9, 2, -100, -100] and b["attention_mask"].tolist() == [1, 1, 1, 0, 0]
    assert c["labels"].tolist() == [1, 3, 4] and c["input_ids"].dtype == torch.long
    batch = collate([c, a], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 3, 4, 0, 0, 0, 0], [1, 5, 6, 2, 7, 8, 2]]
    assert batch["labels"][0].tolist() == [1, 3, 4, -100, -100, -100, -100]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]


def test_corrupt_record_is_detected_and_missing_index_is_rebuilt(tmp_path):
    with ShardWriter(tmp_path / "train", 10) as w:
        for i in range(5):
            w.write({"indices": [i, i + 1]})
    f = tmp_path / "train" / "part-00000.tfrecord"
    f.with_suffix(".index").unlink()  # scanned instead
    assert ids_of(RecordDataset(str(tmp_path), shuffle_buffer=0)) == [0, 1, 2, 3, 4]
    data = bytearray(f.read_bytes())
    data[20] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DataError, match="CRC mismatch"):
        list(RecordDataset(str(tmp_path), shuffle_buffer=0))


def test_reader_on_a_built_artifact(tmp_path, demo_data_dir, tiny_tokenizer_dir):
    from minima.core.config import RecordsConfig
    from minima.stages.records import run

    art = run(
        RecordsConfig(
            inputs=str(demo_data_dir / "chat" / "demo_chat.json"),
            tokenizer=str(tiny_tokenizer_dir),
            out_dir=str(tmp_path / "rec"),
            format="chat",
            max_length=128,
            dev_fraction=0.1,
        )
    )
    m = art.metrics
    for split in ("train", "dev"):
        ds = RecordDataset(str(art.path), split, shuffle_buffer=0)
        samples = list(ds)
        assert len(samples) == m["num_records"][split] and ds.pad_id == m["pad_id"]
        assert sum(len(s["input_ids"]) for s in samples) == m["num_tokens"][split]
        assert all(s["labels"][-1] == m["eos_id"] for s in samples)


@pytest.mark.tfio
def test_tensorflow_reads_our_records(tmp_path, demo_data_dir, tiny_tokenizer_dir):
    tf = pytest.importorskip("tensorflow", reason="the tfio extra (tensorflow) is not installed")
    from minima.core.config import RecordsConfig
    from minima.stages.records import run

    art = run(
        RecordsConfig(
            inputs=str(demo_data_dir / "text" / "*.txt"),
            tokenizer=str(tiny_tokenizer_dir),
            out_dir=str(tmp_path / "rec"),
            max_length=64,
            shard_size=200,
            dev_fraction=0.0,
        )
    )
    files = sorted(str(p) for p in (art.path / "train").glob("*.tfrecord"))
    spec = {"indices": tf.io.VarLenFeature(tf.int64)}
    got = [
        tf.sparse.to_dense(tf.io.parse_single_example(x, spec)["indices"]).numpy().tolist()
        for x in tf.data.TFRecordDataset(files)
    ]
    ours = [s["input_ids"].tolist() for s in RecordDataset(str(art.path), shuffle_buffer=0)]
    assert got == ours and len(got) == art.metrics["num_records"]["train"]


FD_LIMITED = """import resource, sys
import numpy as np
from minima.data.records import RecordDataset
from minima.data.records.tfrecord_io import ShardWriter
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
d = sys.argv[1]
with ShardWriter(d + "/train", 1) as w:
    for i in range(1200):
        w.write({"indices": np.arange(i, i + 4)})
seen = []
for rank in range(2):
    ds = RecordDataset(d, "train", rank=rank, world_size=2, seed=0, shuffle_buffer=64)
    seen += [int(s["input_ids"][0]) for s in ds]
assert sorted(seen) == list(range(1200)), len(seen)
print("OK", len(seen))
"""


def test_thousands_of_shards_under_a_low_file_limit(tmp_path):
    """1200 one-record shards read in a shuffled epoch under ``ulimit -n 256`` (a fresh process): the reader
    keeps only a few shards open instead of every shard it has touched."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    r = subprocess.run(
        [sys.executable, "-c", FD_LIMITED, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "OK 1200" in r.stdout, r.stderr[-2000:]
    from minima.data.records.reader import MAX_OPEN_SHARDS

    assert MAX_OPEN_SHARDS < 64
