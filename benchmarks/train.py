"""Training-engine throughput: tokens/s from 1 to 2 processes on CPU; MFU of a ~1B Llama on a GPU.

Every arm is a real engine run (``minima.train.train_stage`` -> torchrun -> DeepSpeed) on the
synthetic recipe; tokens/s and MFU come from the run's own metrics.jsonl (median over steps after
the first 3, so start-up and warm-up are excluded).

- CPU (default): a small Llama (hidden 256, 4 layers, seq 128), global batch 16, ZeRO-2, fp32:
  1 process x 2 threads, 1 process x 1 thread, 2 processes x 1 thread (gloo), in rounds, best of rounds.
- ``--gpu``: a ~1.1B Llama (TinyLlama shape: hidden 2048, 22 layers, GQA 32/4, vocab 32000), random
  init, seq 2048, bf16, SDPA (flash_attention_2 when installed), ZeRO-2 and ZeRO-3, one process per GPU.
  Target (issue 6): >= 40% MFU on one H100 (llm-foundry: 42-46% at 3B on 8xH100).

Usage: ``python benchmarks/train.py [--gpu] [--rounds N] [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import machine, write_section  # noqa: E402

DRIVER = """import json, sys
from minima.train import train_stage
from minima.train.synthetic import SyntheticConfig
cfg = SyntheticConfig.model_validate(json.loads(open(sys.argv[1]).read()))
train_stage(cfg, {}, "minima.train.synthetic:SyntheticRecipe", force=True)
"""
CPU_SHAPE = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)
GPU_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def _model_dir(root: Path, shape: dict, vocab: int) -> Path:
    from transformers import LlamaConfig

    d = root / "model"
    kw = dict(shape)
    kw.setdefault("vocab_size", vocab)
    LlamaConfig(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kw).save_pretrained(str(d))
    return d


def run_arm(root: Path, name: str, cfg: dict, threads: int) -> dict:
    """One engine run in a subprocess; returns median tokens/s, MFU and the command line."""
    out = root / name
    spec = root / f"{name}.json"
    spec.write_text(json.dumps(cfg))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MINIMA_NUM_THREADS=str(threads),
        PYTHONPATH=str(ROOT),
        MINIMA_NO_PROGRESS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("MINIMA_INPROCESS", None)
    t0 = time.time()
    p = subprocess.run([sys.executable, str(driver), str(spec)], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"arm {name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    cmd = next(
        (ln.split("launch: ", 1)[1] for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("launch: ")), "?"
    )
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if r.get("split") == "train" and r["step"] > 3]
    tok_s = statistics.median(r["tokens"] / r["step_time"] for r in train)
    mfu = statistics.median(r["mfu"] for r in train) if train and "mfu" in train[0] else None
    return {
        "tok_s": tok_s,
        "mfu": mfu,
        "wall": wall,
        "cmd": cmd,
        "step_time": statistics.median(r["step_time"] for r in train),
    }


def base_cfg(model: Path, out: Path, **kw) -> dict:
    cfg = dict(
        model=str(model),
        out_dir=str(out),
        init="random",
        precision="fp32",
        zero_stage=2,
        lr=1e-4,
        warmup_proportion=0.0,
        variable_length=False,
        save_steps=0,
        eval_steps=0,
        keep_last=1,
    )
    cfg.update(kw)
    return cfg


def cpu(rounds: int, steps: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="minima-bench-train-"))
    model = _model_dir(root, CPU_SHAPE, 1000)
    seq, gbs = 128, 16
    arms = {
        "1 process x 2 threads": (dict(micro_batch_size=gbs), 2),
        "1 process x 1 thread": (dict(micro_batch_size=gbs), 1),
        "2 processes x 1 thread (gloo)": (dict(micro_batch_size=gbs // 2, launch={"nproc_per_node": 2}), 1),
    }
    best: dict[str, dict] = {}
    every: dict[str, list[float]] = {name: [] for name in arms}
    load0 = os.getloadavg()[0]
    for r in range(rounds):
        for i, (name, (kw, threads)) in enumerate(arms.items()):
            cfg = base_cfg(model, root / f"arm{i}", seq_len=seq, num_examples=gbs * (steps + 2), max_steps=steps, **kw)
            res = run_arm(root, f"arm{i}", cfg, threads)
            every[name].append(res["tok_s"])
            print(
                f"round {r + 1} {name}: {res['tok_s']:.0f} tok/s "
                f"(median step {res['step_time']:.3f}s, run {res['wall']:.0f}s)",
                flush=True,
            )
            if name not in best or res["tok_s"] > best[name]["tok_s"]:
                best[name] = res
    load1 = os.getloadavg()[0]
    ref = best["1 process x 1 thread"]["tok_s"]
    rows = "\n".join(
        f"| {name} | {res['tok_s']:,.0f} | {res['tok_s'] / ref:.2f}x | {' / '.join(f'{x:,.0f}' for x in every[name])} |"
        for name, res in best.items()
    )
    two = best["2 processes x 1 thread (gloo)"]
    per_round = ", ".join(
        f"{a / b:.2f}x" for a, b in zip(every["2 processes x 1 thread (gloo)"], every["1 process x 1 thread"])
    )
    return (
        "## train (`python benchmarks/train.py`)\n"
        "\n"
        f"Machine: {machine()}; load average {load0:.1f} -> {load1:.1f} "
        "on 2 cores: **shared with other engineers' jobs**, so\n"
        f"absolute numbers are noisy; arms ran in {rounds} interleaved round(s), best of rounds.\n"
        "Engine runs (torchrun + DeepSpeed ZeRO-2, fp32, torch AdamW) of the synthetic recipe: Llama hidden 256,\n"
        f"4 layers, vocab 1000 ({_params(CPU_SHAPE, 1000) / 1e6:.1f}M params), "
        f"seq {seq}, global batch {gbs} sequences, {steps} steps;\n"
        f"tokens/s = median over steps 4..{steps} from metrics.jsonl (start-up excluded).\n"
        "\n"
        "| arm (same global batch) | tokens/s (best) | vs 1 process x 1 thread | each round |\n"
        "|---|---|---|---|\n"
        f"{rows}\n"
        "\n"
        f"Scaling 1 -> 2 processes: **{two['tok_s'] / ref:.2f}x** "
        f"best of rounds (per round: {per_round}); ideal 2x with two\n"
        "free cores (each rank computes half the batch, plus one gloo all-reduce of the gradients per step). The\n"
        "neighbours' load moves single rounds a lot. 2 threads in one process are far slower than 1 on this\n"
        "oversubscribed machine (threads wait for each other at every op); with free cores they help. "
        "Command of the 2-process arm:\n"
        f"`{two['cmd']}`\n"
        "\n"
        "GPU MFU (~1.1B Llama, seq 2048, bf16, ZeRO-2/3; target >= 40% on one H100): not measured here (no GPU in\n"
        "this session). Run `python benchmarks/train.py --gpu` on a GPU machine; it writes its own rows.\n"
    )


def _params(shape: dict, vocab: int) -> int:
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return 2 * vocab * h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def gpu(steps: int) -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        attn = "sdpa"
    root = Path(tempfile.mkdtemp(prefix="minima-bench-train-gpu-"))
    model = _model_dir(root, GPU_SHAPE, 32000)
    n = torch.cuda.device_count()
    seq, mbs = 2048, int(os.environ.get("MINIMA_BENCH_MBS", "8"))
    rows, cmds = [], []
    for stage in (2, 3):
        cfg = base_cfg(
            model,
            root / f"z{stage}",
            precision="bf16",
            zero_stage=stage,
            seq_len=seq,
            micro_batch_size=mbs,
            num_examples=mbs * n * (steps + 2),
            max_steps=steps,
            attn_implementation=attn,
            vocab_size=32000,
            launch={"nproc_per_node": n},
        )
        res = run_arm(root, f"z{stage}", cfg, 4)
        mfu = f"{res['mfu'] * 100:.1f}%" if res["mfu"] is not None else "n/a (unknown device peak)"
        rows.append(f"| ZeRO-{stage} | {mbs} x {seq} | {res['tok_s']:,.0f} | {res['tok_s'] / n:,.0f} | **{mfu}** |")
        cmds.append(res["cmd"])
        print(rows[-1], flush=True)
    return (
        "## train-gpu (`python benchmarks/train.py --gpu`)\n"
        "\n"
        f"Machine: {machine()} x {n}. Llama {_params(GPU_SHAPE, 32000) / 1e9:.2f}B "
        "(hidden 2048, 22 layers, GQA 32/4, vocab 32000),\n"
        f"random init, bf16, {attn}, no activation checkpointing, torch AdamW (foreach); "
        "MFU = (6N + 12*L*d*T) * tokens/s / peak\n"
        f"(N without the input embedding; peak 989 TFLOP/s for H100/H200 bf16 dense), median over steps 4..{steps}.\n"
        "Target: >= 40% MFU on one H100.\n"
        "\n"
        "| ZeRO | micro-batch x seq | tokens/s | tokens/s/GPU | MFU |\n"
        "|---|---|---|---|---|\n"
        f"{chr(10).join(rows)}\n"
        "\n"
        f"Command (ZeRO-3 arm): `{cmds[-1]}`\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="MFU of a ~1.1B Llama on the GPU(s)")
    ap.add_argument("--rounds", type=int, default=2, help="CPU: interleaved rounds (best of)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per arm")
    args = ap.parse_args()
    if args.gpu:
        write_section("train-gpu", gpu(args.steps))
    else:
        write_section("train", cpu(args.rounds, args.steps))
    print(f"wrote {Path(__file__).with_name('RESULTS.md')}")


if __name__ == "__main__":
    main()
