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


ARMS = {
    "logits": "hand-picked 04_prune shape, logits only (= 05_distill)",
    "search_distill": "searched shape, logits only",
    "hidden_0.1": "hand-picked, logits + hidden mse w=0.1",
    "hidden_1": "hand-picked, logits + hidden mse w=1.0",
    "rounds": "two rounds (mid shape, then hand-picked shape)",
}


def main(argv=None) -> int:
    os.environ.setdefault("MINIMA_INPROCESS", "1")
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path, help="a finished demo run dir")
    p.add_argument("--out", type=Path, default=Path("/tmp/compress_demo"))
    p.add_argument("--arms", nargs="+", default=["search", "hidden", "rounds"], choices=["search", "hidden", "rounds"])
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--retrain-steps", type=int, default=20)
    p.add_argument("--hidden-weight", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--mid", default="4,112,4,4,224", help="the first round's shape: layers,hidden,heads,kv_heads,ffn")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every prune and distill, one run each")
    p.add_argument("--write", action="store_true", help="write the section compress_demo of benchmarks/RESULTS.md")
    p.add_argument("--tables-only", action="store_true", help="print (and --write) the tables of OUT/results.json")
    a = p.parse_args(argv)
    if a.tables_only:
        runs = {int(k): v for k, v in json.loads((a.out / "results.json").read_text()).items()}
    else:
        runs = {seed: run_one(a, seed, a.out.resolve() / f"seed{seed}") for seed in a.seeds}
        (a.out / "results.json").write_text(json.dumps(runs, indent=1))
    md = markdown(runs, a)
    print(md)
    if a.write:
        from benchmarks.results import write_section

        write_section("compress_demo", md)
    return 0


def run_one(a, seed: int, out: Path) -> dict:
    """Every arm for one seed: the distilled students' dev loss and the evaluation of every model."""
    from transformers import AutoConfig

    from minima.core.config import DistillConfig, EvaluateConfig, PruneConfig
    from minima.models.counts import count_params
    from minima.stages.distill import run as distill
    from minima.stages.evaluate import run as evaluate
    from minima.stages.prune import run as prune

    rd = a.run_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher, hand = rd / "03_adapt", rd / "04_prune"
    prune_cfg = {k: v for k, v in _config(hand).items() if k not in ("out_dir", "run_dir")}
    distill_cfg = {k: v for k, v in _config(rd / "05_distill").items() if k not in ("out_dir", "run_dir", "model")}
    prune_cfg["seed"] = distill_cfg["seed"] = seed
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
        cfg = {**prune_cfg, "teacher": str(src), "out_dir": str(out / name), **over}
        return prune(PruneConfig.model_validate(cfg)).path

    students: dict[str, str] = {"teacher": str(teacher), "hand-picked pruned": str(hand)}
    if "search" in a.arms:
        target = count_params(AutoConfig.from_pretrained(str(hand)))
        search = {**prune_cfg["search"], "top_k": a.top_k, "retrain_steps": a.retrain_steps}
        art = run_prune(teacher, "search_prune", target_params=target, search=search, **dict.fromkeys(PRUNE_DIMS))
        res["search"] = {"target_params": target, **json.loads((art / "search.json").read_text())}
        res["search_distill"] = run_distill(art, "search_distill")
        students["searched pruned (+retrain)"] = str(art)
    res["logits"] = run_distill(hand, "logits")
    if "hidden" in a.arms:
        for w in a.hidden_weight:
            res[f"hidden_{w:g}"] = run_distill(hand, f"hidden_{w:g}", hidden_weight=w, hidden_kind="mse")
    if "rounds" in a.arms:
        layers, hidden, heads, kv, ffn = (int(x) for x in a.mid.split(","))
        mid = dict(num_layers=layers, hidden_size=hidden, num_heads=heads, num_key_value_heads=kv)
        r1 = run_prune(teacher, "rounds_prune1", intermediate_size=ffn, **mid)
        res["rounds_mid"] = {
            **mid,
            "intermediate_size": ffn,
            "params": count_params(AutoConfig.from_pretrained(str(r1))),
        }
        d1 = run_distill(r1, "rounds_distill1", max_steps=steps // 2)
        r2 = run_prune(Path(d1["path"]), "rounds_prune2", **{k: prune_cfg[k] for k in PRUNE_DIMS})
        d2 = run_distill(r2, "rounds_distill2", max_steps=steps - steps // 2)
        res["rounds"] = {**d2, "train_tokens": d1["train_tokens"] + d2["train_tokens"]}
        res["rounds_r1"] = d1
    students.update({k: res[k]["path"] for k in (*ARMS, "rounds_r1") if k in res})
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
    return res


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def markdown(runs: dict, a) -> str:
    """The search table of the first seed and, per model, dev loss / held-out perplexity / demo_qa per seed."""
    from benchmarks.results import machine

    first = runs[next(iter(runs))]
    d = first["distill"]
    lines = [
        f"## compression on the demo (`python benchmarks/compress_demo.py RUN_DIR --seeds {' '.join(map(str, runs))}`)",
        "",
        f"{machine()}. Teacher `03_adapt`, records `02_records_lm`; every distill uses `05_distill`'s config "
        f"(micro batch {d['micro_batch_size']} x 128 tokens, {d['max_steps']} steps, lr {d['lr']}, forward KL, "
        "alpha 0), so every distilled student saw the same tokens. Held-out token perplexity on `data/heldout` "
        "(max_length 128); demo_qa exact match (68 items, 3 shots, stderr about 4-5 points).",
        "",
    ]
    if "search" in first:
        s = first["search"]
        lines += [
            f"**Search** (seed {next(iter(runs))}; `target_params={int(s['target_params'])}`, the hand-picked "
            f"student's count; `search.top_k={a.top_k} search.retrain_steps={a.retrain_steps}`, other keys as "
            "`04_prune`). Loss = next-token cross entropy on the held-out calibration sequences, right after "
            "pruning and after the short retraining (forward-KL distill steps against the teacher):",
            "",
            "| chosen | layers | heads | kv | hidden | ffn | params | loss pruned | loss retrained |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in s["candidates"]:
            before, after = (_fmt(c.get(k)) for k in ("loss_pruned", "loss_retrained"))
            lines.append(
                f"| {'*' if c.get('chosen') else ''} | {c['num_layers']} | {c['num_heads']} "
                f"| {c['num_key_value_heads']} | {c['hidden_size']} | {c['intermediate_size']} | {c['params']} "
                f"| {before} | {after} |"
            )
        ch = s["chosen"]
        lines += [
            "",
            f"Winner: {ch['num_layers']} layers / {ch['num_heads']} heads / hidden {ch['hidden_size']} / ffn "
            f"{ch['intermediate_size']} ({ch['params']} params), saved after its retraining (`search.keep=retrained`: "
            "the `searched pruned (+retrain)` row); the retraining steps are not counted in the distill tokens.",
            "",
        ]
    if "rounds_mid" in first:
        m = first["rounds_mid"]
        lines += [
            f"**Rounds**: round 1 prunes the teacher to {m['num_layers']} layers / hidden {m['hidden_size']} / "
            f"{m['num_heads']} heads / ffn {m['intermediate_size']} ({m['params']} params) and distills "
            f"{d['max_steps'] // 2} steps; round 2 prunes that student to the hand-picked shape and distills the "
            "remaining steps. One shot = the `logits` row.",
            "",
        ]
    seeds = list(runs)
    head = " | ".join(f"seed {s}: dev CE / ppl / QA" for s in seeds)
    lines += [
        f"| model | distill tokens | {head} | mean ppl | mean QA |",
        "|---|---|" + "---|" * (len(seeds) + 2),
    ]
    names = list(first["eval"])
    for name in names:
        r = first.get(name, {})
        cells = []
        for s in seeds:
            rr, e = runs[s].get(name, {}), runs[s]["eval"].get(name)
            dev = f"{rr['dev_loss']:.4f}" if "dev_loss" in rr else "-"
            cells.append("-" if e is None else f"{dev} / {e['held_ppl']:.3f} / {100 * e['demo_qa']:.1f}")
        evs = [runs[s]["eval"][name] for s in seeds if name in runs[s]["eval"]]
        ppl = sum(e["held_ppl"] for e in evs) / len(evs)
        qa = 100 * sum(e["demo_qa"] for e in evs) / len(evs)
        label = ARMS.get(name, "after round 1 (half the tokens)" if name == "rounds_r1" else name)
        lines.append(f"| {label} | {r.get('train_tokens', '')} | {' | '.join(cells)} | {ppl:.3f} | {qa:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
