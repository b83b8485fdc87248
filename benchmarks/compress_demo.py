"""Compression on a finished demo run: shape search, logits-only vs + hidden KD, one shot vs two rounds.

Given a demo run dir (``bash scripts/demo.sh``: its ``03_adapt`` teacher, ``02_records_lm`` records, the
hand-picked ``04_prune`` student and ``05_distill``), every arm is distilled with ``05_distill``'s own config
(same micro batch, steps, lr, schedule), so all arms see the same distill tokens:

- **search**: ``prune target_params=<params of 04_prune>`` with the search options given here (other prune
  keys as ``04_prune``'s); every candidate's shape, params and calibration loss before and after retraining;
  the winner is distilled like ``05_distill`` and compared with it;
- **hidden**: ``04_prune`` distilled with logits only and with ``loss.hidden_weight`` in ``--hidden-weight``
  (``loss.hidden_kind`` mse);
- **rounds**: one shot (``04_prune`` -> distill N steps) against two rounds (teacher -> ``--mid`` shape ->
  distill N/2 steps -> ``04_prune``'s shape -> distill N/2 steps).

Every student is evaluated on the demo's held-out text (token perplexity, max_length 128) and ``demo_qa``
(exact match, 3 shots). Usage: ``python benchmarks/compress_demo.py RUN_DIR [--out DIR] [--arms ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRUNE_DIMS = ("num_layers", "num_heads", "num_key_value_heads", "intermediate_size", "hidden_size")


def _config(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())["config"]


def main(argv=None) -> int:
    os.environ.setdefault("MINIMA_INPROCESS", "1")
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path, help="a finished demo run dir")
    p.add_argument("--out", type=Path, default=Path("/tmp/compress_demo"))
    p.add_argument("--arms", nargs="+", default=["search", "hidden", "rounds"], choices=["search", "hidden", "rounds"])
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--retrain-steps", type=int, default=20)
    p.add_argument("--hidden-weight", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument(
        "--mid",
        default="4,112,4,4,224",
        help="the first round's shape: layers,hidden,heads,kv_heads,ffn",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of every prune and distill (default: the demo's)")
    p.add_argument("--reuse-distill", action="store_true", help="take 05_distill as the logits-only/one-shot arm")
    a = p.parse_args(argv)

    from transformers import AutoConfig

    from minima.core.config import DistillConfig, EvaluateConfig, PruneConfig
    from minima.models.counts import count_params
    from minima.stages.distill import run as distill
    from minima.stages.evaluate import run as evaluate
    from minima.stages.prune import run as prune

    rd, out = a.run_dir.resolve(), a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher, hand = rd / "03_adapt", rd / "04_prune"
    prune_cfg = {k: v for k, v in _config(hand).items() if k not in ("out_dir", "run_dir")}
    distill_cfg = {k: v for k, v in _config(rd / "05_distill").items() if k not in ("out_dir", "run_dir", "model")}
    if a.seed is not None:
        prune_cfg["seed"] = distill_cfg["seed"] = a.seed
    steps = distill_cfg["max_steps"]
    res: dict = {
        "distill": {k: distill_cfg[k] for k in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "lr")}
    }

    def run_distill(student: Path, name: str, max_steps: int = steps, **loss) -> dict:
        cfg = {**distill_cfg, "student": str(student), "max_steps": max_steps, "out_dir": str(out / name)}
        cfg["loss"] = {**distill_cfg["loss"], **loss}
        art = distill(DistillConfig.model_validate(cfg))
        m = art.metrics
        return {"path": str(art.path), "dev_loss": m["dev_loss"], "train_tokens": m["train_tokens"]}

    def run_prune(src: Path, name: str, **over) -> Path:
        return prune(
            PruneConfig.model_validate({**prune_cfg, "teacher": str(src), "out_dir": str(out / name), **over})
        ).path

    students: dict[str, str] = {"teacher": str(teacher), "hand-picked pruned": str(hand)}
    if a.reuse_distill:
        m = json.loads((rd / "05_distill/train_result.json").read_text())
        res["logits"] = {"path": str(rd / "05_distill"), "dev_loss": m["dev_loss"], "train_tokens": m["train_tokens"]}
    if "search" in a.arms:
        target = count_params(AutoConfig.from_pretrained(str(hand)))
        search = {**prune_cfg["search"], "top_k": a.top_k, "retrain_steps": a.retrain_steps}
        art = run_prune(teacher, "search_prune", target_params=target, search=search, **dict.fromkeys(PRUNE_DIMS))
        res["search"] = {"target_params": target, **json.loads((art / "search.json").read_text())}
        res["search_distill"] = run_distill(art, "search_distill")
        students["searched pruned"] = str(art)
    if ("hidden" in a.arms or "rounds" in a.arms) and "logits" not in res:
        res["logits"] = run_distill(hand, "logits")
    if "hidden" in a.arms:
        for w in a.hidden_weight:
            res[f"hidden_{w:g}"] = run_distill(hand, f"hidden_{w:g}", hidden_weight=w, hidden_kind="mse")
    if "rounds" in a.arms:
        layers, hidden, heads, kv, ffn = (int(x) for x in a.mid.split(","))
        mid = dict(
            num_layers=layers, hidden_size=hidden, num_heads=heads, num_key_value_heads=kv, intermediate_size=ffn
        )
        r1 = run_prune(teacher, "rounds_prune1", **mid)
        res["rounds_mid"] = {**mid, "params": count_params(AutoConfig.from_pretrained(str(r1)))}
        d1 = run_distill(r1, "rounds_distill1", max_steps=steps // 2)
        r2 = run_prune(Path(d1["path"]), "rounds_prune2", **{k: prune_cfg[k] for k in PRUNE_DIMS})
        d2 = run_distill(r2, "rounds_distill2", max_steps=steps - steps // 2)
        res["rounds"] = {**d2, "train_tokens": d1["train_tokens"] + d2["train_tokens"], "round1": d1}
    for key in ("logits", "search_distill", "rounds"):
        if key in res:
            students[key] = res[key]["path"]
    for w in a.hidden_weight:
        if f"hidden_{w:g}" in res:
            students[f"hidden_{w:g}"] = res[f"hidden_{w:g}"]["path"]
    ev = evaluate(
        EvaluateConfig(
            models=students,
            tasks={
                "perplexity": {"path": str(rd / "data/heldout"), "max_length": 128},
                "demo_qa": {"path": str(rd / "data/eval/demo_qa")},
            },
            out_dir=str(out / "evaluate"),
        )
    )
    scores = json.loads((ev.path / "results.json").read_text())["models"]
    res["eval"] = {
        n: {"held_ppl": s["tasks"]["perplexity"]["token_perplexity"], "demo_qa": s["tasks"]["demo_qa"]["exact_match"]}
        for n, s in scores.items()
    }
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print_tables(res)
    return 0


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_tables(res: dict) -> None:
    """Markdown tables of the search candidates and of every distilled student."""
    ev = res["eval"]
    if "search" in res:
        s = res["search"]
        print(f"search: target_params={s['target_params']}, chosen {s['chosen']}")
        print("| chosen | layers | heads | kv | hidden | ffn | params | loss pruned | loss retrained |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c in s["candidates"]:
            before, after = (_fmt(c.get(k)) for k in ("loss_pruned", "loss_retrained"))
            print(
                f"| {'*' if c.get('chosen') else ''} | {c['num_layers']} | {c['num_heads']} "
                f"| {c['num_key_value_heads']} | {c['hidden_size']} | {c['intermediate_size']} | {c['params']} "
                f"| {before} | {after} |"
            )
    print("\n| model | distill tokens | dev loss | held-out ppl | demo_qa EM |")
    print("|---|---|---|---|---|")
    for name, e in ev.items():
        r = res.get(name, {})
        tok = r.get("train_tokens", "")
        dev = f"{r['dev_loss']:.4f}" if "dev_loss" in r else ""
        print(f"| {name} | {tok} | {dev} | {e['held_ppl']:.3f} | {100 * e['demo_qa']:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
