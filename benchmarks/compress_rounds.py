"""Richer distillation and iterative compression at tiny scale, on real text (tinyshakespeare, else the demo corpus).

A tiny teacher (4 layers, width 128) is trained here; then, through the real prune and distill stages:

- **hidden KD**: the teacher pruned to 3 layers / width 96, distilled with logits only (forward KL) and with
  logits + hidden states (``loss.hidden_weight``, a learned 96 -> 128 projection), same steps and tokens;
- **rounds**: to 2 layers / width 64 (about 30% of the teacher's non-embedding parameters), one shot
  (prune, distill 2N steps) against two rounds built by the pipeline's ``compress.rounds`` wiring
  (prune to 3 / 96, distill N steps; prune that student to 2 / 64, distill N steps): same total tokens.

Reported: the students' dev CE (the records' dev split) and held-out perplexity.
Usage: ``python benchmarks/compress_rounds.py [--steps N]`` (CPU, a few minutes).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ = 64
MID = {"num_layers": 3, "hidden_size": 96, "num_heads": 3, "num_key_value_heads": 3, "intermediate_size": 192}
SMALL = {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "num_key_value_heads": 2, "intermediate_size": 128}


def main(argv=None) -> int:
    import os

    os.environ.setdefault("MINIMA_INPROCESS", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60, help="distill steps of one round (one shot takes twice as many)")
    p.add_argument("--hidden-weight", type=float, nargs="+", default=[1.0], help="one arm per weight")
    p.add_argument("--hidden-kind", default="mse", choices=["mse", "cosine"])
    p.add_argument("--skip-rounds", action="store_true", help="the hidden-KD comparison only")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.core.config import DistillConfig, PipelineConfig, PruneConfig, RecordsConfig
    from minima.core.registry import step_config
    from minima.data.demo import train_sentencepiece, write
    from minima.data.tokenizers import save_sp_tokenizer
    from minima.stages.distill import run as distill
    from minima.stages.prune import run as prune
    from minima.stages.records import run as build_records
    from minima.testing import lm_blocks, perplexity, train_tiny_lm

    d = Path(a.out or tempfile.mkdtemp(prefix="compress_rounds_"))
    d.mkdir(parents=True, exist_ok=True)
    shakespeare = Path(__file__).resolve().parents[1] / "../shared/data/text/tinyshakespeare.txt"
    if shakespeare.is_file():
        docs = [" ".join(x.split("\n")) for x in shakespeare.read_text().split("\n\n") if x.strip()]
    else:
        write(d / "demo")
        docs = [ln for ln in (d / "demo/text/pretrain_en.txt").read_text().splitlines() if ln.strip()]
    rng = random.Random(0)
    rng.shuffle(docs)
    held, train_docs = docs[: len(docs) // 20], docs[len(docs) // 20 :]
    sp = train_sentencepiece(train_docs, d / "sp.model", vocab_size=512, model_type="bpe", byte_fallback=False)
    tok_dir = save_sp_tokenizer(sp, d / "tok")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))

    def stream(texts):
        out = []
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            out += [tok.bos_token_id] + ids
        return out

    held_blocks = lm_blocks(stream(held), SEQ)[:64]
    teacher = train_tiny_lm(lm_blocks(stream(train_docs), SEQ), len(tok), steps=300, batch_size=16, lr=3e-3, seed=0)
    teacher.save_pretrained(str(d / "teacher"))
    tok.save_pretrained(str(d / "teacher"))
    (d / "transfer.txt").write_text("\n".join(train_docs[:3000]) + "\n")
    rec = build_records(
        RecordsConfig(
            inputs=str(d / "transfer.txt"),
            tokenizer=str(tok_dir),
            format="lm",
            max_length=SEQ,
            dev_fraction=0.03,
            out_dir=str(d / "records"),
        )
    ).path
    train = dict(micro_batch_size=8, lr=3e-3, precision="fp32", zero_stage=0, eval_steps=0, log_steps=10, seed=0)
    calib = dict(num_samples=32, max_length=SEQ, batch_size=8, importance="activation")

    def ppl(path):
        return perplexity(AutoModelForCausalLM.from_pretrained(str(path)).eval(), held_blocks)

    res = {"teacher_ppl": perplexity(teacher, held_blocks)}
    # --- hidden KD: logits only vs logits + hidden states, same tokens
    mid = prune(PruneConfig(teacher=str(d / "teacher"), records=str(rec), out_dir=str(d / "mid"), **calib, **MID)).path
    arms = [("logits", {"alpha": 0.0})] + [
        (f"logits+hidden({a.hidden_kind}, w={w:g})", {"alpha": 0.0, "hidden_weight": w, "hidden_kind": a.hidden_kind})
        for w in a.hidden_weight
    ]
    for name, loss in arms:
        art = distill(
            DistillConfig(
                teacher=str(d / "teacher"),
                student=str(mid),
                records=str(rec),
                max_steps=2 * a.steps,
                loss=loss,
                out_dir=str(d / f"hid_{len(res)}"),
                **train,
            )
        )
        res[f"hidden_kd/{name}"] = {"dev_ce": art.metrics["dev_loss"], "held_ppl": ppl(art.path)}
        if "hidden" in name:
            rows = [json.loads(x) for x in (art.path / "metrics.jsonl").read_text().splitlines()]
            hid = [r["hidden"] for r in rows if r.get("split") == "train" and "hidden" in r]
            res[f"hidden_kd/{name}"]["hidden_first_last"] = [hid[0], hid[-1]]
    if a.skip_rounds:
        print(json.dumps(res, indent=1))
        return 0
    # --- one shot vs two rounds to the small shape, same total distill tokens
    small = prune(
        PruneConfig(teacher=str(d / "teacher"), records=str(rec), out_dir=str(d / "small"), **calib, **SMALL)
    ).path
    art = distill(
        DistillConfig(
            teacher=str(d / "teacher"),
            student=str(small),
            records=str(rec),
            max_steps=2 * a.steps,
            loss={"alpha": 0.0},
            out_dir=str(d / "oneshot"),
            **train,
        )
    )
    res["one_shot"] = {"dev_ce": art.metrics["dev_loss"], "held_ppl": ppl(art.path), "steps": 2 * a.steps}
    tokens = a.steps * train["micro_batch_size"] * SEQ
    pipe = PipelineConfig.model_validate(
        {
            "run_dir": str(d / "rounds"),
            "records_lm": {"max_length": SEQ},
            "prune": calib,
            "distill": dict(train, loss={"alpha": 0.0}),
            "compress": {"rounds": [{"tokens": tokens, "prune": MID}, {"tokens": tokens, "prune": SMALL}]},
        }
    )
    up = {"adapt": str(d / "teacher"), "records_lm": str(rec)}
    up["prune_r1"] = str(prune(step_config(pipe, "prune_r1", up)).path)
    up["distill_r1"] = str(distill(step_config(pipe, "distill_r1", up)).path)
    up["prune"] = str(prune(step_config(pipe, "prune", up)).path)
    art = distill(step_config(pipe, "distill", up))
    res["two_rounds"] = {
        "dev_ce": art.metrics["dev_loss"],
        "held_ppl": ppl(art.path),
        "steps": [step_config(pipe, "distill_r1", up).max_steps, step_config(pipe, "distill", up).max_steps],
    }
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
