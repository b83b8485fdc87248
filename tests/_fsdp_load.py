"""One rank of the FSDP loading check (run under torchrun by test_fsdp_load.py).

``python tests/_fsdp_load.py MODEL_DIR OUT``: the rank sets the model up for FSDP twice, as training does
(``load_pretrained`` + ``FSDPStrategy.setup``): once reading its own shards from the safetensors files and
once receiving rank 0's broadcast (``rank0_copy``), and writes ``OUT.rank<r>.json``: whether the file read
started from an all-meta model on this rank, and whether every local shard is bitwise the broadcast's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(model_dir: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from minima.train.model_init import load_pretrained, source_of
    from minima.train.recipe import TrainContext
    from minima.train.strategies.fsdp import FSDPStrategy
    from minima.train.synthetic import SyntheticConfig
    from minima.train.worker import init_distributed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_distributed(300, "fsdp")
    work = Path(out).parent
    ctx = TrainContext(rank, world, rank, torch.device("cpu"), torch.float32, work, work, 0)
    cfg = SyntheticConfig(model=model_dir, strategy="fsdp", precision="fp32")
    shards, meta, tagged = {}, {}, {}
    for mode in ("files", "rank0"):
        model = load_pretrained(model_dir, cfg, ctx, dtype=torch.float32, rank0_copy=mode == "rank0")
        meta[mode] = all(p.is_meta for p in model.parameters())
        tagged[mode] = all(source_of(p) is not None for p in model.parameters())
        strategy = FSDPStrategy()
        strategy.setup(model, list(model.parameters()), cfg, 10, ctx)
        shards[mode] = {n: p.to_local().detach().clone() for n, p in strategy.module.named_parameters()}
    a, b = shards["files"], shards["rank0"]
    res = {
        "rank": rank,
        "all_meta": meta,
        "tagged": tagged,
        "names_equal": sorted(a) == sorted(b),
        "bitwise": all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a if n in b),
        "shapes": {n: list(t.shape) for n, t in a.items()},
        "sums": {n: float(t.double().sum()) for n, t in a.items()},
    }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
