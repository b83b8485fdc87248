"""``minima run`` and ``minima demo``: the CLI side of the Prefect flows (kept out of minima/)."""

from __future__ import annotations

import argparse
import json
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
        "evaluate": {
            "tasks": {
                "demo_mc": {"path": str(data / "eval/demo_mc")},
                "demo_qa": {"path": str(data / "eval/demo_qa")},
                # the held-out text no stage trains on, in windows of the trained context
                "perplexity": {"path": str(data / "heldout"), "max_length": 128},
            }
        },
    }


def prepare_demo(root: Path, seed: int = 0) -> None:
    """Built-in data, its two SentencePiece models and a tiny random 'big' base model (idempotent)."""
    from minima.data import demo as demo_data
    from minima.data.tokenizers import save_sp_tokenizer
    from minima.testing import save_tiny_model

    data = root / "data"
    if not (data / "tokenizers/extra_zh.model").is_file():
        demo_data.write(data, seed=seed)
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
    root = Path(a.run_dir)
    t0 = time.time()
    print(f"[demo] preparing built-in data and a tiny base model under {root}", flush=True)
    prepare_demo(root)
    from flows.pipeline import pipeline

    results = pipeline(config=demo_config(root), preset="tiny", overrides=a.overrides, force=a.force)
    print(f"[demo] finished in {time.time() - t0:.0f}s; report: {root / 'report.md'} and {root / 'report.html'}")
    chat_dir = results.get("sft", {}).get("path")
    if chat_dir:
        held_out = [json.loads(line) for line in (root / "data/eval/demo_mc/test.jsonl").read_text().splitlines()]
        print(f"[demo] example answers from the chat model {chat_dir} to questions it never saw in sft:")
        for item in [r for r in held_out if r["lang"] == "en"][:2] + [r for r in held_out if r["lang"] == "zh"][:1]:
            print(
                f"  User: {item['question']}\n  Assistant: {chat_once(chat_dir, item['question'])}"
                f"   (gold: {item['choices'][item['gold']]})"
            )
    return 0


def chat_once(model_dir: str, question: str, max_new_tokens: int = 32) -> str:
    from minima.infer.chat import generate_reply

    return generate_reply(model_dir, [{"role": "user", "content": question}], max_new_tokens=max_new_tokens)
