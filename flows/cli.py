"""``minima run`` and ``minima demo``: the CLI side of the Prefect flows (kept out of minima/)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def run_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="minima run",
        description="Run the pipeline flow (vocab -> records -> adapt -> prune -> distill -> sft -> evaluate).",
    )
    p.add_argument(
        "--config", help="pipeline YAML (fields of PipelineConfig: vocab, records_lm, records_chat, adapt, ...)"
    )
    p.add_argument("--preset", help="tiny, minima-3b or minichat-3b")
    p.add_argument("--from-stage", help="rerun this stage and everything after it")
    p.add_argument("--only-stage", help="rerun just this stage on the existing upstream artifacts")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. distill.loss.temperature=2"
    )
    a = p.parse_intermixed_args(argv)
    from flows.pipeline import pipeline

    results = pipeline(
        config=a.config,
        preset=a.preset,
        overrides=a.overrides,
        from_stage=a.from_stage,
        only_stage=a.only_stage,
        force=a.force,
    )
    for k, r in results.items():
        print(f"{k:<13} {r['state']:<10} {r['path']}")
    return 0


def demo_config(root: Path) -> dict:
    """Pipeline overrides that point the tiny preset at the built-in demo data under ``root``."""
    data = root / "data"
    return {
        "run_dir": str(root),
        "vocab": {
            "base_tokenizer": str(data / "tokenizers/base_en.model"),
            "extra_sp_model": str(data / "tokenizers/extra_zh.model"),
            "base_model": str(root / "00_base"),
        },
        "records_lm": {
            "inputs": [
                {"name": "en", "path": str(data / "text/pretrain_en.txt")},
                {"name": "zh", "path": str(data / "text/pretrain_zh.txt")},
            ]
        },
        "records_chat": {"inputs": [{"name": "chat", "path": str(data / "chat/demo_chat.json")}]},
        # preference pairs about the chat-train facts: the dpo stage after sft
        "records_pref": {"inputs": [{"name": "pref", "path": str(data / "preference/train.jsonl")}]},
        # one CPU process per run: ZeRO partitions nothing there, and its bookkeeping costs a fifth of a step
        **{stage: {"zero_stage": 0} for stage in ("adapt", "distill", "sft")},
        "dpo": {"enabled": True, "zero_stage": 0},
        "evaluate": {
            "tasks": {
                "demo_mc": {"path": str(data / "eval/demo_mc")},
                "demo_qa": {"path": str(data / "eval/demo_qa")},
                # the held-out text no stage trains on, in windows of the trained context
                "perplexity": {"path": str(data / "heldout"), "max_length": 128},
                # pairs about the held-out facts: does the model prefer the right answer?
                "preference": {"path": str(data / "preference/held_out.jsonl")},
            }
        },
    }


def prepare_demo(root: Path, seed: int = 0) -> None:
    """Built-in data, its two SentencePiece models and a tiny random 'big' base model (idempotent)."""
    from minima.data import demo as demo_data
    from minima.data.demo_preference import write_preference_pairs
    from minima.data.tokenizers import save_sp_tokenizer
    from minima.testing import save_tiny_model

    data = root / "data"
    if not (data / "tokenizers/extra_zh.model").is_file():
        demo_data.write(data, seed=seed)
    if not (data / "preference/held_out.jsonl").is_file():
        write_preference_pairs(data, seed=seed)
    base = root / "00_base"
    if not (base / "config.json").is_file():
        tok = save_sp_tokenizer(data / "tokenizers/base_en.model", root / ".base_tokenizer")
        save_tiny_model(base, tok, seed=seed)


def demo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="minima demo", description="The whole DAG on the tiny preset with built-in bilingual data (CPU, minutes)."
    )
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--force", action="store_true", help="rebuild every stage")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_intermixed_args(argv)
    # One thread per process unless the caller says otherwise: the two distillation arms then share 2 cores,
    # and the numbers do not depend on how many cores the machine has.
    for var in ("OMP_NUM_THREADS", "MINIMA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import torch

    torch.set_num_threads(int(os.environ["MINIMA_NUM_THREADS"]))
    from minima.stages.report import cpu_seconds, write_report

    root = Path(a.run_dir)
    t0, cpu0 = time.time(), cpu_seconds()
    print(f"[demo] preparing built-in data and a tiny base model under {root}", flush=True)
    prepare_demo(root)
    from flows.pipeline import pipeline

    results = pipeline(config=demo_config(root), preset="tiny", overrides=a.overrides, force=a.force)
    wall, cpu = time.time() - t0, cpu_seconds() - cpu0
    timing = [{"what": "minima demo (data, all stages, evaluation)", "wall_s": wall, "cpu_s": cpu}]
    report = write_report(root, results, timing=timing)
    print(f"[demo] finished in {wall:.0f}s wall, {cpu:.0f}s CPU", flush=True)
    print_results(results)
    chat_dir = results.get("sft", {}).get("path")
    if chat_dir:
        items = held_out_questions(root)
        print_answers(chat_dir, items, demo_answers(chat_dir, [it["question"] for it in items]))
    print(f"[demo] report: {Path(report['html']).resolve()}")
    return 0


def print_results(results: dict) -> None:
    """The evaluation table of the report (one column per model)."""
    from minima.stages.report import eval_rows, md_table

    ev = results.get("evaluate", {}).get("path")
    headers, rows = eval_rows(Path(ev)) if ev else ([], [])
    if rows:
        print("[demo] evaluation (perplexity on held-out text; demo_mc and demo_qa on held-out facts):")
        print(md_table(headers, rows))


def held_out_questions(root: Path, per_lang: int = 5) -> list[dict]:
    """``per_lang`` demo_qa test questions per language, one kind after another (never asked in training)."""
    from minima.stages.report import pick_examples

    rows = [json.loads(line) for line in (root / "data/eval/demo_qa/test.jsonl").read_text().splitlines()]
    return pick_examples(rows, per_lang)


def demo_answers(chat_dir: str, questions: list[str], max_new_tokens: int = 32) -> list[str]:
    """The chat model's greedy answer to each question (one user turn each), decoded as one batch."""
    from minima.infer.chat import generate_replies

    conversations = [[{"role": "user", "content": q}] for q in questions]
    return generate_replies(chat_dir, conversations, max_new_tokens=max_new_tokens)


def print_answers(chat_dir: str, items: list[dict], answers: list[str]) -> None:
    """Each held-out question, the chat model's answer and ✓/✗ by demo_qa's exact match."""
    from minima.evaluate.tasks.demo_qa import is_correct

    print(f"[demo] the chat model {chat_dir} on held-out questions it never saw in training:")
    right = 0
    for item, answer in zip(items, answers):
        ok = is_correct(item["question"], item["answer"], answer)
        right += ok
        print(f"  {'✓' if ok else '✗'} User: {item['question']}\n    Assistant: {answer}   (gold: {item['answer']})")
    print(f"[demo] {right}/{len(items)} right")
