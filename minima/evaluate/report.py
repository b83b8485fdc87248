"""results.json -> report.md tables, and ``minima evaluate compare A B``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from minima.core.errors import InputError

PERCENT = (
    "acc",
    "acc_norm",
    "exact_match",
    "exact_match_strict",
    "exact_match_flexible",
    "em",
    "f1",
    "pass@",
    "win_rate",
)
CATEGORY_TASKS = {
    "mmlu": "MMLU categories (mean over questions)",
    "ceval": "C-Eval categories (mean of subjects)",
    "cmmlu": "CMMLU categories (mean of subjects)",
}


def _is_pct(metric: str) -> bool:
    return any(metric == p or metric.startswith(p) for p in PERCENT) and "perplexity" not in metric


def fmt(metric: str, value: Optional[float], err: Optional[float] = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if _is_pct(metric):
        s = f"{100 * value:.2f}"
        if err is not None and not (isinstance(err, float) and math.isnan(err)):
            s += f" ± {100 * err:.2f}"
        return s
    if err is not None and not (isinstance(err, float) and math.isnan(err)):  # e.g. a chat task's mean grade
        return f"{value:.4g} ± {err:.2g}"
    return f"{value:.4g}"


def task_metrics(res: dict) -> list[str]:
    """The headline metrics of a task result (numbers that are not stderrs; a chat task's score even when None)."""
    chat = res.get("info", {}).get("kind") == "chat"
    return [
        k
        for k, v in res.items()
        if (isinstance(v, (int, float)) and not isinstance(v, bool) or (chat and v is None))
        and not k.endswith("_stderr")
    ]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_report(results: dict) -> str:
    """report.md: one column per model, rows per task/metric, then the category tables."""
    models: dict[str, dict] = results["models"]
    names = list(models)
    out = ["# Evaluation report", ""]
    meta = results.get("meta", {})
    out.append("Models: " + ", ".join(f"`{n}` ({models[n].get('path', '')})" for n in names))
    if meta:
        out.append("")
        out.append(", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))))
    out += [
        "",
        "Multiple choice *loglikelihood* mode is lm-eval's (acc: highest summed log-probability; acc_norm: "
        "divided by the choice's length in characters); *letter* mode compares the next-token log-probabilities of "
        "A/B/C/D (hendrycks/test). Percentages ± standard error.",
        "",
        "## Scores",
        "",
    ]
    first = models[names[0]]["tasks"]
    all_tasks = list(dict.fromkeys(t for n in names for t in models[n]["tasks"]))
    rows = []
    for t in all_tasks:
        ref = next(models[n]["tasks"][t] for n in names if t in models[n]["tasks"])
        info = ref.get("info", {})
        for m in task_metrics(ref):
            row = [t, m, info.get("mode", ""), info.get("shots", ""), info.get("n", "")]
            for n in names:
                r = models[n]["tasks"].get(t, {})
                row.append(fmt(m, r.get(m), r.get(f"{m}_stderr")))
            rows.append(row)
    out.append(_table(["task", "metric", "mode", "shots", "n", *names], rows))
    for t, title in CATEGORY_TASKS.items():
        if not any("categories" in models[n]["tasks"].get(t, {}) for n in names):
            continue
        out += ["", f"## {title}", ""]
        cats = list(dict.fromkeys(c for n in names for c in models[n]["tasks"].get(t, {}).get("categories", {})))
        rows = []
        for c in cats:
            row = [
                c,
                next(
                    models[n]["tasks"][t]["categories"][c]["n_subjects"]
                    for n in names
                    if c in models[n]["tasks"].get(t, {}).get("categories", {})
                ),
            ]
            for n in names:
                d = models[n]["tasks"].get(t, {}).get("categories", {}).get(c, {})
                row.append(fmt("acc", d.get("acc"), d.get("acc_stderr")))
            rows.append(row)
        out.append(_table(["category", "subjects", *names], rows))
    out += _chat_sections(models, names, all_tasks)
    for t in ("mmlu", "ceval", "cmmlu", "bbh"):
        subs = list(dict.fromkeys(s for n in names for s in models[n]["tasks"].get(t, {}).get("subjects", {})))
        if not subs:
            continue
        m = "acc" if t != "bbh" else "exact_match"
        rows = [
            [s, models[names[0]]["tasks"].get(t, {}).get("subjects", {}).get(s, {}).get("n", "")]
            + [fmt(m, models[n]["tasks"].get(t, {}).get("subjects", {}).get(s, {}).get(m)) for n in names]
            for s in subs
        ]
        out += [
            "",
            f"<details><summary>{t}: {len(subs)} subjects ({m})</summary>",
            "",
            _table(["subject", "n", *names], rows),
            "",
            "</details>",
        ]
    del first
    return "\n".join(out) + "\n"


def _chat_sections(models: dict, names: list[str], all_tasks: list[str]) -> list[str]:
    """Per-category tables of the LLM-judged chat tasks (mean grade or win rate, unparseable counts)."""
    out: list[str] = []
    for t in all_tasks:
        ref = next((models[n]["tasks"][t] for n in names if t in models[n]["tasks"]), {})
        info = ref.get("info", {})
        if info.get("kind") != "chat":
            continue
        single = "score" in ref
        how = (
            "mean grade 1-10 per judgment; unparseable judgments left out"
            if single
            else "win rate against the baseline, each pair judged in both orders; "
            "ties and order-dependent verdicts count "
            "half, unparseable pairs left out"
        )
        out += [
            "",
            f"## {t}: judged by `{info.get('judge')}` ({how})",
            "",
            f"Answers and judgments: `{info.get('dir')}/`.",
        ]
        cats = list(dict.fromkeys(c for n in names for c in models[n]["tasks"].get(t, {}).get("per_category", {})))
        rows = []
        for c in [c for c in cats if c != "all"] + (["all"] if "all" in cats else []):
            row = [f"**{c}**" if c == "all" else c]
            for n in names:
                e = models[n]["tasks"].get(t, {}).get("per_category", {}).get(c)
                if e is None:
                    row.append("–")
                    continue
                value = e.get("mean") if single else e.get("win_rate")
                bad = e.get("unparseable") if single else e.get("error")
                row.append(
                    f"{fmt('score' if single else 'win_rate', value)} "
                    f"(n {e.get('judged') if single else e.get('pairs')}, "
                    f"unparseable {bad})"
                )
            rows.append(row)
        out += ["", _table(["category", *names], rows)]
    return out


def load_results(path: str | Path) -> dict:
    """results.json of an evaluate artifact (a dir or the file itself)."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise InputError(f"no results.json at {p}", fix="pass an evaluate artifact directory (or its results.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"corrupt results.json: {e}", where=str(f)) from None


def compare(a: str | Path, b: str | Path) -> str:
    """A markdown table of two evaluate runs side by side, with B - A for every shared task/metric."""
    ra, rb = load_results(a), load_results(b)
    cols: list[tuple[str, dict]] = []
    for label, r in (("A", ra), ("B", rb)):
        for n, m in r["models"].items():
            cols.append((label if len(r["models"]) == 1 else f"{label}:{n}", m["tasks"]))
    tasks = list(dict.fromkeys(t for _, ts in cols for t in ts))
    rows = []
    for t in tasks:
        metrics = list(dict.fromkeys(m for _, ts in cols if t in ts for m in task_metrics(ts[t])))
        for m in metrics:
            vals = [ts.get(t, {}).get(m) for _, ts in cols]
            row = [t, m] + [fmt(m, v, ts.get(t, {}).get(f"{m}_stderr")) for v, (_, ts) in zip(vals, cols)]
            if len(cols) == 2 and None not in vals:
                d = vals[1] - vals[0]
                row.append(f"{100 * d:+.2f}" if _is_pct(m) else f"{d:+.4g}")
            rows.append(row)
        for c in list(dict.fromkeys(c for _, ts in cols for c in ts.get(t, {}).get("categories", {}))):
            vals = [ts.get(t, {}).get("categories", {}).get(c, {}).get("acc") for _, ts in cols]
            row = [t, f"  {c}"] + [fmt("acc", v) for v in vals]
            if len(cols) == 2 and None not in vals:
                row.append(f"{100 * (vals[1] - vals[0]):+.2f}")
            rows.append(row)
    headers = ["task", "metric", *[c for c, _ in cols]] + (["B - A"] if len(cols) == 2 else [])
    return f"A: {a}\nB: {b}\n\n" + _table(headers, rows) + "\n"


def compare_main(argv: list[str]) -> int:
    """``minima evaluate compare A B [--out FILE]``."""
    import argparse

    p = argparse.ArgumentParser(prog="minima evaluate compare", description="Two evaluate runs side by side.")
    p.add_argument("a", help="evaluate artifact dir (or results.json) A")
    p.add_argument("b", help="evaluate artifact dir (or results.json) B")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    text = compare(args.a, args.b)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
