"""The pipeline report: runs/<id>/report.md and report.html from the stage artifacts' manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from minima.core.artifacts import atomic_write_text, is_complete, read_manifest


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _scalar_metrics(m: dict, keys: list[str]) -> list[list[Any]]:
    return [[k, m[k]] for k in keys if k in m and not isinstance(m[k], (dict, list))]


def eval_rows(evaluate_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the evaluate artifact's scores: one row per task/metric, one column per model."""
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
    return ["task", "metric", *names], [[t, m, *[vals.get(n, "") for n in names]] for (t, m), vals in rows.items()]


def write_report(run_dir: Path, results: dict[str, dict]) -> dict[str, str]:
    """Write report.md and report.html under run_dir; returns their paths."""
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
    md += [_table(["step", "prefect state", "artifact", "build time (s)", "path"], rows), ""]

    def manifest(key: str) -> dict:
        p = results.get(key, {}).get("path")
        return read_manifest(p) if p and is_complete(p) else {}

    vocab = manifest("vocab").get("metrics", {})
    if vocab:
        md += [
            "## Tokenizer",
            "",
            _table(
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
                _table(
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
            _table(
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
            _table(["round", "params before", "params after", "distill tokens", "dev loss"], rows),
            "",
        ]
    curves = []
    for key in ("adapt", "distill", "sft"):
        p = results.get(key, {}).get("path")
        if not p:
            continue
        m = manifest(key).get("metrics", {})
        md_rows = _scalar_metrics(
            m, ["final_loss", "dev_loss", "dev_ppl", "best_dev_loss", "steps", "tokens", "tokens_per_s", "mfu"]
        )
        if md_rows:
            md += [f"## Training: {key}", "", _table(["metric", "value"], md_rows), ""]
        for png in sorted(Path(p).glob("*.png")):
            dest = run_dir / "report_files" / f"{key}_{png.name}"
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(png, dest)
            curves.append((key, dest.relative_to(run_dir)))
    if curves:
        md += ["## Loss curves", ""] + [f"![{k}]({rel.as_posix()})" for k, rel in curves] + [""]
    ev = results.get("evaluate", {}).get("path")
    if ev:
        headers, rows = eval_rows(Path(ev))
        if rows:
            md += ["## Evaluation (teacher vs pruned vs distilled vs chat)", "", _table(headers, rows), ""]
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
