"""One rank of a sharded evaluation (run under torchrun by test_evaluate_sharded.py), and the requests it scores.

``python tests/_sharded_eval.py MODEL_DIR zero3|fsdp OUT``: the rank loads the model as training does
(``load_pretrained`` + the strategy's ``setup``: DeepSpeed ZeRO-3 or FSDP2 over 2 gloo ranks), scores
:func:`requests` through :class:`minima.evaluate.lm.LM` with ``distributed=True`` and writes
``OUT.rank<r>.json``: the results and its model calls per request type.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SHOT = (
    "Question: What colour is the sky on a clear day?\nAnswer: blue\n\n"
    "Question: What colour is grass?\nAnswer: green\n\n"
)


def requests() -> dict:
    """Loglikelihood pairs (7 contexts: an odd count, four sharing a few-shot prefix, one- and multi-token
    continuations), texts to score with rolling windows, and contexts to continue."""
    ll = []
    for q in ("What colour is snow?", "What colour is coal?", "What colour is a lemon?", "What colour is blood?"):
        for c in (" white", " black", " yellow and bright"):
            ll.append((f"{SHOT}Question: {q}\nAnswer:", c))
    ll += [("The cat sat on the", " mat"), ("Once upon a time", " there was a king"), ("Hello", " world, again")]
    texts = [
        "The sky is blue and the grass is green. " * 6,
        "Once upon a time there was a little girl who lived in a village near the forest.",
        "Numbers: one two three four five six seven eight nine ten eleven twelve.",
        "Hello there.",
    ]
    gen = ["The sky is", "Once upon a time", "Question: What colour is grass?\nAnswer:", "Hello", "One two three"]
    return {"ll": ll, "texts": texts, "gen": gen}


def score(lm) -> dict:
    """Every request type through ``lm``; each result with the model calls it took."""
    req = requests()
    out: dict = {}

    def timed(name, fn):
        calls, pads = lm.forward_calls, lm.pad_calls
        out[name] = fn()
        out[f"{name}_calls"], out[f"{name}_pads"] = lm.forward_calls - calls, lm.pad_calls - pads

    timed("ll", lambda: [list(r) for r in lm.loglikelihood(req["ll"])])
    docs = [lm.tok_encode(t) for t in req["texts"]]
    timed("rolling", lambda: [list(r) for r in lm.rolling_nll_many(docs, window=16, stride=8)])
    timed("gen", lambda: lm.generate_until(req["gen"], until=["\n"], max_new_tokens=6))
    return out


def main(model_dir: str, arm: str, out: str) -> None:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from minima.evaluate.lm import LM
    from minima.train.model_init import load_pretrained
    from minima.train.recipe import TrainContext
    from minima.train.strategies import get_strategy
    from minima.train.synthetic import SyntheticConfig
    from minima.train.worker import init_distributed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    strategy = "fsdp" if arm == "fsdp" else "deepspeed"
    init_distributed(300, strategy)
    work = Path(out).parent
    ctx = TrainContext(rank, world, rank, torch.device("cpu"), torch.float32, work, work, 0)
    cfg = SyntheticConfig(
        model=model_dir, strategy=strategy, zero_stage=3 if arm == "zero3" else None, precision="fp32"
    )
    model = load_pretrained(model_dir, cfg, ctx, dtype=torch.float32)
    strat = get_strategy(strategy)
    strat.setup(model, list(model.parameters()), cfg, 10, ctx)
    lm = LM(strat.module, AutoTokenizer.from_pretrained(model_dir), batch_size=2, distributed=True, max_length=64)
    res = score(lm)
    res.update(rank=rank, sharded=lm.sharded, lockstep=lm.lockstep, split_head=lm.split_head)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
