"""Host memory per rank while the model to train is loaded: sharded loading vs a full copy per rank.

Two ranks (torchrun, gloo, CPU) load a Llama checkpoint (bf16 on disk, fp32 for training) through
:func:`minima.train.model_init.load_pretrained` and hand it to the strategy's ``setup``. Each rank
samples its private memory (``RssAnon``: the mapped checkpoint file's pages are shared page cache,
not the rank's) every 2 ms and reports the peak above its level before the load. Arms:

- ``zero3``: DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` under ``HfDeepSpeedConfig``), load only;
- ``full``: the same load with ZeRO-2 (every rank builds the whole fp32 model: the reference);
- ``fsdp``: FSDP2 (every rank builds on meta; ``FSDPStrategy.setup`` shards, and each rank reads only
  its own shard from the memory-mapped safetensors file);
- ``fsdp_rank0``: FSDP2's fallback for checkpoints it cannot slice (rank 0 loads, the others build on
  meta, then ``setup`` shards and broadcasts rank 0's weights).

Usage: ``python benchmarks/host_memory.py [--params 300]`` (millions of parameters; writes the
``host_memory`` section of RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("zero3", "full", "fsdp", "fsdp_rank0")


def shape_for(millions: int) -> dict:
    """A Llama shape of about ``millions`` M parameters (hidden 1024 x L layers, vocab 32000)."""
    per_layer = 4 * 1024 * 1024 + 3 * 1024 * 2816
    layers = max(1, round((millions * 1e6 - 2 * 32000 * 1024) / per_layer))
    return dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )


def save_model(d: Path, shape: dict) -> tuple[Path, int]:
    """A random Llama saved in bf16, as released checkpoints are (training loads it in fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape)).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(d))
    del model
    LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **dict(shape, **TINY))).save_pretrained(f"{d}-tiny")
    return d, n


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The peak of ``RssAnon`` while open, sampled on a thread."""

    def __init__(self, period_s: float = 0.002):
        self.period, self.peak, self._stop = period_s, 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_anon()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_anon())

    @property
    def delta(self) -> int:
        return self.peak - self.base


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def child(model_dir: str, arm: str, out: str) -> None:
    """One rank (under torchrun): load the model for ``arm`` and write its peak to ``out``.rank<r>.json.

    The same path first runs on a tiny copy of the model (``<model_dir>-tiny``), so the modules it
    imports on first use are not counted as the model's memory.
    """
    import gc

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from minima.train.model_init import load_pretrained
    from minima.train.recipe import TrainContext
    from minima.train.synthetic import SyntheticConfig
    from minima.train.worker import init_distributed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    strategy = "fsdp" if arm.startswith("fsdp") else "deepspeed"
    init_distributed(600, strategy)
    ctx = TrainContext(rank, world, rank, torch.device("cpu"), torch.float32, Path(out).parent, Path(out).parent, 0)

    def load(path: str):
        cfg = SyntheticConfig(model=path, strategy=strategy, zero_stage=3 if arm == "zero3" else 2, precision="fp32")
        model = load_pretrained(path, cfg, ctx, dtype=torch.float32, rank0_copy=arm == "fsdp_rank0")
        if strategy == "fsdp":
            from minima.train.strategies.fsdp import FSDPStrategy

            strategy_obj = FSDPStrategy()
            strategy_obj.setup(model, list(model.parameters()), cfg, 10, ctx)
            return strategy_obj
        return model

    warm = load(model_dir + "-tiny")
    del warm
    gc.collect()
    torch.distributed.barrier()
    with PeakSampler() as s:
        model = load(model_dir)
        torch.distributed.barrier()
    del model
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"rank": rank, "delta": s.delta, "base": s.base}))
    torch.distributed.destroy_process_group()


def measure(model_dir: Path, arm: str, work: Path, timeout: float = 600) -> list[dict]:
    """Run ``arm`` on 2 ranks; returns each rank's {rank, delta, base} (bytes)."""
    out = work / f"mem_{arm}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    # Blocks >= 1 MiB come from mmap and go back to the OS when freed, so the peak measures live tensors
    # (glibc otherwise raises its mmap threshold after the first free and keeps freed tensors in its heap).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [__file__, "--child", str(model_dir), arm, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{(r.stdout + r.stderr)[-4000:]}")
    return [json.loads(Path(f"{out}.rank{i}.json").read_text()) for i in range(2)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", type=int, default=300, help="model size in millions of parameters")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "ARM", "OUT"))
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    from benchmarks.results import machine, write_section

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, n = save_model(Path(tmp) / "model", shape_for(a.params))
        full = 4 * n
        rows = []
        for arm in ARMS:
            got = measure(model_dir, arm, Path(tmp))
            for g in got:
                line = (
                    f"{arm} rank {g['rank']}: peak host memory above baseline {g['delta'] / 2**20:,.0f} MiB "
                    f"= {g['delta'] / full:.2f}x the fp32 model ({full / 2**20:,.0f} MiB; "
                    f"baseline {g['base'] / 2**20:,.0f} MiB)"
                )
                print(line, flush=True)
                rows.append((arm, g))
    label = {
        "zero3": "DeepSpeed ZeRO-3, zero.Init (load)",
        "full": "full fp32 copy per rank (ZeRO-2 load, reference)",
        "fsdp": "FSDP2: all meta, shard, each rank reads its shard from the files",
        "fsdp_rank0": "FSDP2 fallback: rank 0 loads, others meta, shard + broadcast",
    }
    table = "\n".join(
        f"| {label[arm]} | {g['rank']} | {g['delta'] / 2**20:,.0f} | **{g['delta'] / full:.2f}x** |" for arm, g in rows
    )
    write_section(
        "host_memory",
        f"""## host memory per rank while loading (`python benchmarks/host_memory.py`)

Machine: {machine()}. A {n / 1e6:.0f}M-parameter Llama saved in bf16, trained in fp32
({full / 2**20:,.0f} MiB), loaded by 2 ranks (torchrun, gloo) through `minima.train.model_init.load_pretrained`
(+ the strategy's setup for FSDP). Peak private memory (`RssAnon`, sampled every 2 ms) of each rank above
its level before the load; the mapped checkpoint file's pages are shared page cache and not counted.
With W ranks per node a ZeRO-3 rank holds 1/W of the model plus the largest module being gathered (here
the two 32000 x 1024 embedding tables); under FSDP every rank reads only its own rows of each tensor from
the safetensors file, so no rank holds more than its shard; in FSDP's fallback (`.bin` checkpoints, models
changed after loading) rank 0 holds the loaded model until its shards are sent.

| arm | rank | peak MiB above baseline | x fp32 model size |
|---|---|---|---|
{table}
""",
    )


if __name__ == "__main__":
    main()
