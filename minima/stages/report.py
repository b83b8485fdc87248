"""The pipeline report: runs/<id>/report.md and report.html from the stage artifacts' manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from minima.core.artifacts import atomic_write_text, is_complete, read_manifest
from minima.core.registry import MODEL_LABELS

# What a score is, one line per task, under the evaluation table.
TASK_NOTES = {
    "perplexity": "perplexity: token perplexity and bits per byte of the perplexity texts (in the demo, the held-out "
    "text split that no stage trains on); lower is better.",
    "demo_mc": "demo_mc: 4-way multiple choice about held-out facts, each choice scored by loglikelihood after the "
    "answer's stem.",
    "demo_qa": "demo_qa: free answers to held-out questions, greedy, exact match of the gold answer "
    "(base models: a 3-shot QA prompt; chat models: the bare question in their chat template).",
    "preference": "preference: pairs about held-out facts (the right answer against a wrong one of the same kind); "
    "acc is the share where the model gives the right one the higher loglikelihood, margin the mean log-ratio.",
}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished subprocesses (training runs), user + system."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _scalar_metrics(m: dict, keys: list[str]) -> list[list[Any]]:
    return [[k, m[k]] for k in keys if k in m and not isinstance(m[k], (dict, list))]


def eval_rows(evaluate_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the evaluate artifact's scores: one row per task/metric, one column per model
    (named by what it is: pruned+distilled, scratch+distilled, ...)."""
    res_file = evaluate_dir / "results.json"
    if not res_file.is_file():
        return [], []
    res = json.loads(res_file.read_text())
    models = res.get("models") or {"model": res}
    names = list(models)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, r in models.items():
        for task, scores in (r.get("results") or r.get("tasks") or {}).items():
            if not isinstance(scores, dict):
                continue
            for metric, value in scores.items():
                if isinstance(value, (int, float)) and not metric.endswith("stderr") and not isinstance(value, bool):
                    rows.setdefault((task, metric), {})[name] = value
    headers = ["task", "metric", *[MODEL_LABELS.get(n, n) for n in names]]
    return headers, [[t, m, *[vals.get(n, "") for n in names]] for (t, m), vals in rows.items()]


def curve_caption(stage: str, config: dict) -> str:
    """One line saying what each curve of a stage's loss plot is."""
    ce = "left: train CE per optimizer step (thin) and its running mean, dev CE on the records' dev split (dots)"
    if stage == "distill":
        loss = config.get("loss") or {}
        alpha, kd, temp = loss.get("alpha", 0.0), loss.get("kd", "forward_kl"), loss.get("temperature", 1.0)
        objective = "the KD term alone" if alpha == 0 else f"{alpha:g} CE + {1 - alpha:g} T^2 KD"
        return (
            f"{ce}, both against the data's next token; right: the KD term ({kd} between teacher and student at "
            f"T={temp:g}), which falls to ~0 as the student matches the teacher; the objective is {objective}. "
            "Bottom axis: optimizer steps; top: training tokens."
        )
    if stage == "dpo":
        return (
            "left: the preference loss per optimizer step (thin) and its running mean, train and dev; right: the "
            "reward margin (beta x the log-ratio to the reference, chosen minus rejected), train and dev. "
            "Bottom axis: optimizer steps; top: training tokens."
        )
    what = "assistant-reply tokens" if stage == "sft" else "text tokens"
    return f"{ce}, over {what}. Bottom axis: optimizer steps; top: training tokens."


def pick_examples(items: list[dict], per_lang: int = 5) -> list[dict]:
    """``per_lang`` items per language, taking each kind in turn (file order within a kind), so the examples
    show every kind of question rather than the first few of one."""
    out = []
    for lang in sorted({it.get("lang", "") for it in items}):
        kinds: dict[str, list[dict]] = {}
        for it in items:
            if it.get("lang", "") == lang:
                kinds.setdefault(it.get("kind", ""), []).append(it)
        queues, picked = list(kinds.values()), []
        while len(picked) < per_lang and any(queues):
            for q in queues:
                if q and len(picked) < per_lang:
                    picked.append(q.pop(0))
        out += picked
    return out


def qa_examples(evaluate_dir: Path, model: str = "chat", per_lang: int = 5) -> list[dict]:
    """Some demo_qa items of ``model`` from samples.jsonl (question, reply, ok): see :func:`pick_examples`."""
    path = Path(evaluate_dir) / "samples.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pick_examples([s for s in rows if s.get("model") == model and s.get("task") == "demo_qa"], per_lang)


def write_report(run_dir: Path, results: dict[str, dict], timing: Optional[list[dict]] = None) -> dict[str, str]:
    """Write report.md and report.html under run_dir; returns their paths.

    ``timing``: rows ``{"what", "wall_s", "cpu_s"}`` (e.g. the pipeline flow, the whole demo command), shown in
    a Time section with the machine's CPU count.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# minima pipeline report: `{run_dir}`", ""]
    md += ["## Stages", ""]
    rows = []
    for key, r in results.items():
        rows.append(
            [
                key,
                r.get("state", ""),
                "reused" if r.get("skipped") else "built",
                f"{(r.get('wall_time_s') or 0):.1f}",
                f"`{r['path']}`",
            ]
        )
    md += [md_table(["step", "prefect state", "artifact", "build time (s)", "path"], rows), ""]

    def manifest(key: str) -> dict:
        p = results.get(key, {}).get("path")
        return read_manifest(p) if p and is_complete(p) else {}

    vocab = manifest("vocab").get("metrics", {})
    if vocab:
        md += [
            "## Tokenizer",
            "",
            md_table(
                ["metric", "value"],
                _scalar_metrics(
                    vocab,
                    [
                        "base_vocab_size",
                        "vocab_size",
                        "pieces_added",
                        "pad_pieces",
                        "new_token_start",
                        "english_changed_fraction",
                        "zh_tokens_per_char_before",
                        "zh_tokens_per_char_after",
                        "en_tokens_per_char_before",
                        "en_tokens_per_char_after",
                        "zh_token_ratio",
                    ],
                ),
            ),
            "",
        ]
    for key in ("records_lm", "records_chat"):
        m = manifest(key).get("metrics", {})
        if m:
            md += [
                f"## Records ({key})",
                "",
                md_table(
                    ["metric", "value"],
                    _scalar_metrics(m, ["format", "max_length", "num_tokens", "bytes_per_token", "dropped", "skipped"])
                    + [[f"num_records.{k}", v] for k, v in (m.get("num_records") or {}).items()],
                ),
                "",
            ]
    prune = manifest("prune").get("metrics", {})
    if prune:
        md += [
            "## Pruning",
            "",
            md_table(
                ["metric", "value"],
                _scalar_metrics(
                    prune,
                    [
                        "params_before",
                        "params_after",
                        "param_ratio",
                        "importance",
                        "kept_layers",
                        "num_layers",
                        "num_heads",
                        "hidden_size",
                        "intermediate_size",
                    ],
                ),
            ),
            "",
        ]
        if isinstance(prune.get("kept_layers"), list):
            md += [f"Kept layers: {prune['kept_layers']}", ""]
    rounds = sorted(int(k[len("prune_r") :]) for k in results if k.startswith("prune_r") and k[7:].isdigit())
    if rounds:  # iterative compression: one row per round (the last round is the prune and distill steps)
        keys = [(f"prune_r{r}", f"distill_r{r}") for r in rounds] + [("prune", "distill")]
        rows = []
        for i, (pk, dk) in enumerate(keys, 1):
            pm, dm = manifest(pk).get("metrics", {}), manifest(dk).get("metrics", {})
            rows.append(
                [
                    i,
                    pm.get("params_before", ""),
                    pm.get("params_after", ""),
                    dm.get("train_tokens", ""),
                    dm.get("dev_loss", ""),
                ]
            )
        md += [
            "## Compression rounds",
            "",
            md_table(["round", "params before", "params after", "distill tokens", "dev loss"], rows),
            "",
        ]
    curves = []
    for key in ("adapt", "distill", "distill_scratch", "sft", "dpo"):
        p = results.get(key, {}).get("path")
        if not p:
            continue
        man = manifest(key)
        m = man.get("metrics", {})
        md_rows = _scalar_metrics(
            m,
            [
                "final_loss",
                "dev_loss",
                "dev_ppl",
                "best_dev_loss",
                "dev_reward_accuracy_initial",
                "dev_reward_accuracy",
                "steps",
                "tokens",
                "tokens_per_s",
                "mfu",
            ],
        )
        if md_rows:
            md += [f"## Training: {key}", "", md_table(["metric", "value"], md_rows), ""]
        for png in sorted(Path(p).glob("*.png")):
            dest = run_dir / "report_files" / f"{key}_{png.name}"
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(png, dest)
            curves.append((key, dest.relative_to(run_dir), curve_caption(man.get("stage", key), man.get("config", {}))))
    if curves:
        md += ["## Loss curves", ""]
        for k, rel, caption in curves:
            md += [f"**{k}**: {caption}", "", f"![{k}]({rel.as_posix()})", ""]
    ev = results.get("evaluate", {}).get("path")
    if ev:
        headers, rows = eval_rows(Path(ev))
        if rows:
            tasks = dict.fromkeys(r[0] for r in rows)
            md += ["## Evaluation", "", md_table(headers, rows), ""]
            md += [f"- {TASK_NOTES[t]}" for t in tasks if t in TASK_NOTES] + [""]
        examples = qa_examples(Path(ev))
        if examples:
            md += [
                "## Held-out questions (chat model)",
                "",
                md_table(
                    ["", "question", "reply", "gold"],
                    [
                        ["✓" if s["exact_match"] else "✗", s["question"], s["generation"].strip(), s["gold"]]
                        for s in examples
                    ],
                ),
                "",
            ]
    if timing:
        import os

        md += [
            "## Time",
            "",
            md_table(
                ["", "wall (s)", "CPU (s, this process and its finished subprocesses)"],
                [[t["what"], f"{t['wall_s']:.0f}", f"{t['cpu_s']:.0f}"] for t in timing],
            ),
            "",
            f"On {os.cpu_count()} CPU cores; on a loaded machine the wall time grows, the CPU time much less.",
            "",
        ]
    text = "\n".join(md)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, text)
    try:
        import markdown

        body = markdown.markdown(text, extensions=["tables"])
    except ImportError:  # pragma: no cover - markdown ships with tensorboard
        import html

        body = f"<pre>{html.escape(text)}</pre>"
    atomic_write_text(
        html_path,
        f"<!doctype html><meta charset='utf-8'><title>minima report</title>"
        f"<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}table{{border-collapse:collapse}}"
        f"td,th{{border:1px solid #ccc;padding:2px 8px}}</style>{body}",
    )
    return {"markdown": str(md_path), "html": str(html_path)}
