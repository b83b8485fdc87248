"""lm-eval vs minima: the same items, the same tiny model, side by side on CPU.

For each task both evaluators score the same items (lm-eval 0.4 through local task YAMLs and an
``HFLM`` around the in-memory model; minima through ``evaluate_model``), one after the other in this
process, after a warm-up of both. Reported: items/s end to end (request building and scoring, data
files already cached), the speedup, and whether every prediction is identical.

    python benchmarks/evaluate.py [--items 100] [--batch-size 8] [--vocab llama2|demo]

Needs ../shared/data (MMLU/ARC/HellaSwag/Winogrande slices and the LLaMA-2 tokenizer).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MINIMA_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SUBJECTS = ["high_school_psychology", "miscellaneous", "elementary_mathematics", "high_school_biology"]


def build(vocab: str, tmp: Path, data: Path):
    import torch
    from transformers import AutoTokenizer

    from minima.data.tokenizers import save_sp_tokenizer
    from minima.testing import demo_tokenizer_dir, tiny_llama

    if vocab == "llama2":
        tdir = save_sp_tokenizer(data / "tokenizers" / "llama2_tokenizer.model", tmp / "tok")
    else:
        tdir = demo_tokenizer_dir(tmp / "tok", tmp / "demo")
    tok = AutoTokenizer.from_pretrained(str(tdir))
    model = tiny_llama(
        len(tok),
        seed=0,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    return model, tok


def bench(args) -> str:
    import torch

    from minima.evaluate import evaluate_model
    from minima.evaluate.metrics import argmax
    from minima.evaluate.reference import run_lmeval, write_lmeval_tasks

    torch.set_num_threads(args.threads)
    data = ROOT.parent / "shared" / "data"
    if not (data / "eval").is_dir():
        sys.exit(f"needs {data}/eval (../shared/data)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model, tok = build(args.vocab, tmp, data)
    names = write_lmeval_tasks(tmp / "yaml", data / "eval", mmlu_subjects=SUBJECTS, arc="arc_easy")
    per = args.items // len(SUBJECTS)
    plan = [  # (minima task, lm-eval tasks, shots, items per lm-eval task)
        ("mmlu", [n for n in names if "_mmlu_" in n], 5, per),
        ("arc_easy", ["ref_arc_easy"], 0, args.items),
        ("hellaswag", ["ref_hellaswag"], 0, args.items),
        ("winogrande", ["ref_winogrande"], 0, args.items),
    ]

    def minima_spec(task, shots, n):
        spec = {"shots": shots, "limit": n}
        if task == "mmlu":
            spec.update(subjects=SUBJECTS, split="val")
        return {task: spec}

    # warm-up: imports, dataset caches, first-call allocations, for both
    for task, lm_tasks, shots, _n in plan:
        run_lmeval(model, tok, tmp / "yaml", lm_tasks, dict.fromkeys(lm_tasks, shots), 2, batch_size=args.batch_size)
        evaluate_model(model, tok, minima_spec(task, shots, 2), data_dir=data / "eval", batch_size=args.batch_size)

    rows, tot = [], collections.Counter()
    for task, lm_tasks, shots, n in plan:
        t0 = time.perf_counter()
        ref = run_lmeval(
            model, tok, tmp / "yaml", lm_tasks, dict.fromkeys(lm_tasks, shots), n, batch_size=args.batch_size
        )
        t_ref = time.perf_counter() - t0
        samples: list[dict] = []
        t0 = time.perf_counter()
        evaluate_model(
            model, tok, minima_spec(task, shots, n), data_dir=data / "eval", batch_size=args.batch_size, samples=samples
        )
        t_min = time.perf_counter() - t0
        ref_items = [it for t in lm_tasks for it in ref[t]["items"]]
        if task == "mmlu":  # same order as the lm-eval tasks: subject by subject
            samples = [m for t in lm_tasks for m in samples if m["subject"] == t.removeprefix("ref_mmlu_")]
        same = sum(argmax(r["lls"]) == m["pred"] and r["acc_norm"] == m["acc_norm"] for r, m in zip(ref_items, samples))
        worst = max(abs(a - b) for r, m in zip(ref_items, samples) for a, b in zip(r["lls"], m["loglikelihoods"]))
        k = len(samples)
        assert k == len(ref_items), (task, k, len(ref_items))
        rows.append(
            f"| {task} | {shots} | {k} | {k / t_ref:.1f} | {k / t_min:.1f} | **{t_ref / t_min:.2f}x** "
            f"| {same}/{k} | {worst:.1e} |"
        )
        tot.update(items=k, ref=t_ref, mine=t_min, same=same)
        print(rows[-1], flush=True)
    rows.append(
        f"| **all** | | {tot['items']} | {tot['items'] / tot['ref']:.1f} | {tot['items'] / tot['mine']:.1f} | "
        f"**{tot['ref'] / tot['mine']:.2f}x** | {tot['same']}/{tot['items']} | |"
    )
    from results import machine

    load = os.getloadavg()[0]
    vocab = "LLaMA-2 tokenizer (32000)" if args.vocab == "llama2" else "demo tokenizer (1000)"
    head = (
        f"### vocab: {vocab}\n\nTiny random Llama (hidden 64, 2 layers, 2048 positions), {vocab}, batch size "
        f"{args.batch_size} for both, torch threads {args.threads}; {machine()}; load average {load:.1f} on "
        f"{os.cpu_count()} cores (the machine was shared with other jobs; "
        "both sides ran back to back in one process).\n\n"
        "| task | shots | items | lm-eval items/s | minima items/s | speedup "
        "| identical predictions | max abs Δ loglik |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100, help="items per task (MMLU: split over 4 subjects)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", choices=["llama2", "demo", "both"], default="both")
    args = p.parse_args(argv)
    parts = []
    for v in ["llama2", "demo"] if args.vocab == "both" else [args.vocab]:
        args.vocab = v
        parts.append(bench(args))
    from results import write_section

    intro = (
        "## evaluate: lm-eval vs minima (`python benchmarks/evaluate.py`)\n\n"
        "Same items, same model, same prompts; speedup = minima items/s ÷ lm-eval items/s, end to end (prompt "
        "building, tokenization, scoring; data files cached by a warm-up). minima runs each context once and copies "
        "its KV cache to the continuations, runs a few-shot prefix shared by a batch once, and computes logits only "
        "where a continuation is scored. MMLU is 5-shot (its standard), the others 0-shot. The GPU comparison (full "
        "MMLU 5-shot on a 1-3B model) has not been run: no GPU was available to this task.\n\n"
    )
    write_section("evaluate", intro + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
