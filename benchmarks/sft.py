"""LoRA vs full fine-tuning on the same model and data: step time and peak memory.

    python benchmarks/sft.py [--hidden 512 --layers 8 --vocab 2000 --batch 4 --seq 128 --steps 6 --repeats 2]

Each (mode, repeat) runs in its own subprocess so that peak memory is that run's alone: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak RSS (``ru_maxrss``) minus the RSS after the
model was built, i.e. what training adds (gradients, optimizer state, activations), measured in a
separate short run with large allocations served by mmap so that RSS follows the live tensors. A step is the
forward, backward and AdamW update of one batch (the LoRA model is wrapped by ``minima.train.lora`` with
MiniMA's default targets, r=8). The modes alternate (full, lora, full, lora, ...) so background load
hits both; the best median step time of the repeats is kept. Writes the ``sft`` section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> dict:
    import torch

    from minima.core.config import LoraConfig
    from minima.testing import tiny_llama
    from minima.train.lora import apply_lora

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = tiny_llama(
        args.vocab,
        seed=0,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(512, args.seq),
    )
    model.config._attn_implementation = "sdpa"
    model.set_attn_implementation("sdpa")
    if args.mode == "lora":
        model = apply_lora(model, LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0))
    model.to(dev, dtype=dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(dev) for _ in range(args.steps + 2)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2**20
    else:
        base_mem = _rss_mb()
    times = []
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:  # the first steps allocate optimizer state and warm caches
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        added = peak - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        added = peak - base_mem
    return {
        "mode": args.mode,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "step_s": statistics.median(times),
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "peak_mb": peak,
        "train_mb": added,
        "base_mb": base_mem,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu"])
    ap.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = ap.parse_args()
    if args.worker:
        args.mode = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    mems: dict[str, list[dict]] = {"full": [], "lora": []}
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "batch", "seq", "threads", "device")
    ]

    def one(mode: str, steps: int, env: dict) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, f"--worker={mode}", f"--steps={steps}", *passthrough],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads), **env},
        )
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(1)
        return json.loads(line[0][7:])

    # On CPU glibc keeps freed blocks, so RSS over-counts; serving every allocation above 64 KiB by
    # mmap (returned to the OS on free) makes peak RSS track live tensors. That slows allocation, so
    # memory is measured in separate short runs and step time with the default allocator.
    mem_env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for r in range(args.repeats):
        for mode in ("full", "lora"):
            res = one(mode, args.steps, {})
            runs[mode].append(res)
            mem = one(mode, 1, mem_env) if res["device"] == "cpu" else res
            mems[mode].append(mem)
            print(
                f"repeat {r} {mode:4s}: {res['step_s'] * 1000:.0f} ms/step, +{mem['train_mb']:.0f} MB "
                f"(peak {mem['peak_mb']:.0f} MB), trainable {res['trainable']:,}",
                flush=True,
            )
    full = min(runs["full"], key=lambda x: x["step_s"])
    lora = min(runs["lora"], key=lambda x: x["step_s"])
    mem_full = min(x["train_mb"] for x in mems["full"])
    mem_lora = min(x["train_mb"] for x in mems["lora"])
    speedup = full["step_s"] / lora["step_s"]
    mem_ratio = mem_lora / mem_full
    load = os.getloadavg()[0]
    from benchmarks.results import machine, write_section

    on_gpu = full["device"] != "cpu"
    mem_what = (
        "peak allocated CUDA memory"
        if on_gpu
        else "peak RSS added by training (above the RSS after model build; large allocations via mmap)"
    )
    verdict = (
        "Met."
        if speedup >= 1.4 and mem_ratio <= 0.5
        else "Not met on this run"
        + (
            " (CPU: the frozen weights still cost their forward and input-gradient matmuls, so only the "
            "weight-gradient matmuls and the optimizer update are saved)."
            if not on_gpu
            else "."
        )
    )
    md = (
        "## sft: LoRA vs full fine-tuning\n"
        "\n"
        f"`python benchmarks/sft.py --hidden {args.hidden} --layers {args.layers} --vocab {args.vocab} "
        f"--batch {args.batch} --seq {args.seq} --steps {args.steps} "
        f"--repeats {args.repeats} --threads {args.threads}`\n"
        f"on {machine()}; load average {load:.1f} "
        f"when it finished{' (the machine was shared with other jobs)' if load > 1.5 else ''}.\n"
        "\n"
        f"Same LLaMA-shaped model (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{full['total']:,} parameters) and the same\n"
        f"batches ({args.batch} x {args.seq} tokens); a step is forward + backward + AdamW. LoRA: MiniMA's targets\n"
        f"(q, k, v, o, gate, up, down), r=8, {lora['trainable']:,} trainable parameters. "
        f"Best of {args.repeats} alternating runs.\n"
        "\n"
        f"| mode | ms/step | tokens/s | memory: {mem_what} |\n"
        "|---|---:|---:|---:|\n"
        f"| full fine-tuning | {full['step_s'] * 1000:.0f} | {full['tokens_per_s']:.0f} | {mem_full:.0f} MB |\n"
        f"| LoRA r=8 | {lora['step_s'] * 1000:.0f} | {lora['tokens_per_s']:.0f} | {mem_lora:.0f} MB |\n"
        f"| **LoRA / full** | **{speedup:.2f}x faster** | | **{100 * mem_ratio:.0f}% of the memory** |\n"
        "\n"
        f"Target (GPU): LoRA >= 1.4x faster at <= 50% of the memory. {verdict}\n"
    )
    print(md)
    if not args.no_write:
        write_section("sft", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
