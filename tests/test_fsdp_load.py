"""FSDP on 2 ranks (torchrun, gloo): every rank reads only its own shard of each parameter from the
safetensors checkpoint (no rank ever holds the whole model), bitwise equal to rank 0's broadcast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.mark.slow
def test_fsdp_ranks_read_their_shards_from_the_files(tmp_path):
    import torch
    from safetensors.torch import load_file

    from minima.testing import tiny_llama

    # bf16 on disk, fp32 in training; an odd vocab, so the embedding and head rows split unevenly (501 / 500)
    model = tiny_llama(1001, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "model"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "load"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    proc = subprocess.run(
        cmd + [str(TESTS / "_fsdp_load.py"), str(tmp_path / "model"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert got["all_meta"] == {"files": True, "rank0": got["rank"] != 0}  # rank 0 loads only for the broadcast
        assert got["tagged"] == {"files": True, "rank0": False}
        assert got["names_equal"] and got["bitwise"]
    emb = "model.embed_tokens.weight"
    assert [r["shapes"][emb] for r in ranks] == [[501, 64], [500, 64]]
    # and the shards are the checkpoint's: the two halves sum to the file's tensor
    ref = {k: v.double() for k, v in load_file(str(tmp_path / "model" / "model.safetensors")).items()}
    for name, t in ref.items():
        assert abs(ranks[0]["sums"][name] + ranks[1]["sums"][name] - float(t.sum())) < 1e-6 * max(1, t.abs().sum())
