"""Prune stage benchmark: calibration throughput (tokens/s, and its cost over a plain forward pass),
peak memory against the teacher's size, and that the memory does not grow with the calibration set.
Writes its section of benchmarks/RESULTS.md.

    python benchmarks/prune.py [--quick]                      # CPU: a small random LLaMA
    python benchmarks/prune.py --shape 1b --device cuda       # GPU: a 1.1B LLaMA in bf16 (issue 7)

The teacher is randomly initialised (throughput and memory do not depend on the weights' values).
Each ratio is measured side by side in one run, interleaved, best of ``--repeats``, so load from other
processes on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MINIMA_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import machine, write_section  # noqa: E402

SHAPES = {
    # hidden, layers, heads, ffn, vocab
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
        vocab_size=8000,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
    ),  # TinyLlama-1.1B
    "3b": dict(
        hidden_size=3072,
        num_hidden_layers=26,
        num_attention_heads=24,
        num_key_value_heads=24,
        intermediate_size=8192,
        vocab_size=49216,
    ),
}


def peak_memory(fn, device) -> int:
    """Peak bytes of tensors alive at once during ``fn()``, above what was allocated before it.

    CUDA: the allocator's peak. CPU: replayed from the profiler's allocation/free events (exact for
    torch tensors, unlike sampled RSS, which the malloc cache blurs).
    """
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def build_teacher(shape: dict, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def batches(n: int, batch: int, seq: int, vocab: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g).to(device)} for _ in range(n)]


def timed(fn, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def _passes(teacher, data, torch):
    from minima.compress.importance import calibrate

    def forward_only():
        with torch.no_grad():
            for b in data:
                teacher(**b, use_cache=False)

    return {
        "forward (no hooks)": forward_only,
        "activation": lambda: calibrate(teacher, data, "activation", block_influence=True),
        "gradient": lambda: calibrate(teacher, data, "gradient", block_influence=True),
    }


def main(argv=None) -> int:
    import torch

    from minima.compress.importance import calibrate
    from minima.compress.prune import prune_model
    from minima.models.counts import count_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (256 CPU, 2048 GPU)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=None, help="calibration batches (6 CPU, 16 GPU)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: a shared box thrashes with more)")
    ap.add_argument("--quick", action="store_true", help="fewer batches and one repeat (smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if gpu else torch.float32
    seq = args.seq or (2048 if gpu else 256)
    nb = args.batches or (16 if gpu else 6)
    if args.quick:
        nb, args.repeats = max(2, nb // 3), 1
    shape = SHAPES[args.shape]
    teacher = build_teacher(shape, device, dtype)
    nparams = count_params(teacher.config)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    data = batches(nb, args.batch, seq, shape["vocab_size"], device)
    tokens = nb * args.batch * seq

    runs = _passes(teacher, data, torch)
    forward_only = runs["forward (no hooks)"]
    secs = {k: float("inf") for k in runs}
    timed(forward_only, device)  # warm-up (allocator, kernels)
    for _ in range(args.repeats):
        for name, fn in runs.items():  # interleaved: contention hits every side alike
            secs[name] = min(secs[name], timed(fn, device)[0])
    peaks = {name: peak_memory(fn, device) for name, fn in runs.items()}
    # streaming: 4x the calibration batches must not raise the peak (only running sums are kept)
    peak_more = (
        peak_memory(lambda: calibrate(teacher, data * 4, "activation", block_influence=True), device),
        peaks["activation"],
    )

    target = dict(
        hidden_size=shape["hidden_size"] * 3 // 4,
        num_layers=shape["num_hidden_layers"] * 3 // 4,
        intermediate_size=shape["intermediate_size"] * 3 // 4,
        num_heads=shape["num_attention_heads"]
        * 3
        // 4
        // (shape["num_attention_heads"] // shape["num_key_value_heads"])
        * (shape["num_attention_heads"] // shape["num_key_value_heads"]),
    )
    t_prune, (student, report) = timed(lambda: prune_model(teacher, data, target, importance="activation"), device)

    gb = lambda b: b / 2**30
    lines = [
        "## prune",
        "",
        f"`python benchmarks/prune.py{' --quick' if args.quick else ''}"
        f"{'' if args.shape == 'small' else ' --shape ' + args.shape}`"
        f" — {machine()}" + ("" if gpu else f", torch threads {args.threads}"),
        "",
        f"Teacher: random LLaMA `{args.shape}` ("
        f"{nparams / 1e6:.1f}M params, {gb(teacher_bytes):.3f} GiB in {str(dtype).split('.')[-1]}), "
        f"{nb} calibration batches of {args.batch} x {seq} tokens ({tokens} tokens), best of {args.repeats}.",
        "",
        "| pass | tokens/s | time vs plain forward | peak memory above the loaded teacher | peak / teacher size |",
        "|---|---|---|---|---|",
    ]
    for name in runs:
        lines.append(
            f"| {name} | {tokens / secs[name]:,.0f} | {secs[name] / secs['forward (no hooks)']:.2f}x | "
            f"{gb(peaks[name]):.3f} GiB | {peaks[name] / teacher_bytes:.2f} |"
        )
    lines += [
        "",
        f"- Streaming: activation calibration over {4 * nb} batches peaks at {gb(peak_more[0]):.3f} GiB "
        "above the teacher vs "
        f"{gb(peak_more[1]):.3f} GiB over {nb} (running sums only; no activation is kept).",
        "- Peak memory: tensors alive at once during the pass, above the loaded teacher and data ("
        + ("CUDA allocator peak)." if gpu else "replayed from the torch profiler's allocation events)."),
        f"- Whole `prune_model` (calibration + plan + slicing) to {report.target_shape.describe()}: {t_prune:.1f} s, "
        f"{report.params_before / 1e6:.1f}M -> {report.params_after / 1e6:.1f}M params.",
        "- `gradient` runs a backward pass "
        "(activation gradients only: the weights are frozen, no weight grads are allocated).",
    ]
    if not gpu:
        lines.append(
            "- CPU run on a machine shared with other engineers' jobs: absolute tokens/s are noisy, "
            "the ratios less so. "
            "No GPU was available to this run; on one, `--shape 1b --device cuda` measures a 1-3B teacher."
        )
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        write_section("prune", md)
    del student
    return 0


if __name__ == "__main__":
    sys.exit(main())
