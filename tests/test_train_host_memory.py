"""Host memory per rank while the model to train is loaded (2 ranks, torchrun, gloo): ZeRO-3 partitions
the model as it is built (zero.Init) and FSDP builds it on the meta device and each rank reads only its shard
from the checkpoint, so a rank's peak is well below the fp32 model, where a plain load holds all of it on every
rank (measured side by side)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)


def _bench():
    spec = importlib.util.spec_from_file_location("minima_bench_host_memory", ROOT / "benchmarks" / "host_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc/self/status")
def test_sharded_loading_keeps_each_rank_below_the_fp32_model(tmp_path):
    bench = _bench()
    model_dir, n = bench.save_model(tmp_path / "model", dict(SHAPE, vocab_size=1000))
    full = 4 * n  # the fp32 model (the checkpoint is bf16 on disk)
    arms = ("zero3", "full", "fsdp")
    got = {arm: {g["rank"]: g["delta"] / full for g in bench.measure(model_dir, arm, tmp_path)} for arm in arms}
    print({arm: {r: round(x, 2) for r, x in v.items()} for arm, v in got.items()})
    assert min(got["full"].values()) > 0.9  # the reference: a plain load puts the whole fp32 model on each rank
    assert max(got["zero3"].values()) < 0.7  # ZeRO-3: half the model per rank, plus one gathered module
    assert max(got["fsdp"].values()) < 0.7  # FSDP: every rank, rank 0 too, holds only its shard
