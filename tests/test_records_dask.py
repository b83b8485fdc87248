"""Records tokenization fanned out over a local Dask cluster gives the same bytes as a local build."""

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("prefect_dask", reason="the optional 'dask' extra (prefect-dask) is not installed")


def _digests(d):
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.suffix in (".tfrecord", ".index")
    }


def test_dask_build_equals_local_build(tmp_path, demo_data_dir, tiny_tokenizer_dir, prefect_ready):
    from flows.records_dask import records_dask
    from minima.core.config import RecordsConfig
    from minima.stages.records import run

    locals_, remote = [], []
    for fmt, src in (("lm", "text/pretrain_en.txt"), ("chat", "chat/demo_chat.json")):
        base = dict(
            inputs=str(demo_data_dir / src),
            tokenizer=str(tiny_tokenizer_dir),
            format=fmt,
            max_length=64,
            dev_fraction=0.1,
            chunk_size=64,
            shard_size=500,
        )
        locals_.append(run(RecordsConfig(**base, out_dir=str(tmp_path / f"local_{fmt}"))))
        remote.append(RecordsConfig(**base, out_dir=str(tmp_path / f"dask_{fmt}")).model_dump(mode="json"))
    outs = records_dask(remote, n_workers=2)  # one local cluster of 2 worker processes for both builds
    for local, out in zip(locals_, outs):
        a, b = _digests(local.path), _digests(Path(out["path"]))
        assert a and a == b
        assert out["metrics"]["num_records"] == local.metrics["num_records"]
