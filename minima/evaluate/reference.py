"""lm-evaluation-harness on the same local files, for parity tests and the benchmark (dev dependency).

``write_lmeval_tasks`` writes task YAMLs (``dataset_path: json``/``csv`` with ``data_files``) that
mirror lm-eval's own MMLU / ARC / HellaSwag / Winogrande / demo_mc configs but read the files that
minima reads; HellaSwag uses lm-eval's own ``process_docs``. ``run_lmeval`` runs them offline with
an ``HFLM`` around an in-memory model and returns per-item results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

_UTILS = """
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # lm-eval's own preprocessing


def keep(x):
    return x


def wg_text(doc):
    return int(doc["gold"])


def wg_choice(doc):
    return list(doc["context_options"])


def wg_target(doc):
    return doc["continuation"].strip()
"""

_MC_METRICS = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _q(s: str) -> str:
    import json

    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def write_lmeval_tasks(
    out_dir: str | Path,
    data_dir: str | Path,
    mmlu_subjects: list[str] = (),
    mmlu_split: str = "val",
    arc: Optional[str] = "arc_easy",
    hellaswag: bool = True,
    winogrande: bool = True,
    demo_mc: Optional[str | Path] = None,
    prefix: str = "ref",
) -> list[str]:
    """Write lm-eval task YAMLs under ``out_dir``; returns the task names.

    Args:
        out_dir: folder for the YAMLs (pass it as ``TaskManager(include_path=out_dir)``).
        data_dir: benchmark root laid out like ../shared/data/eval.
        mmlu_subjects: one task per subject (``<prefix>_mmlu_<subject>``), few-shot from dev in order.
        arc: ``arc_easy`` / ``arc_challenge`` (llm-foundry JSONL; shots drawn from the same split).
        demo_mc: the demo corpus's ``eval/demo_mc`` folder.
    """
    out, data = Path(out_dir), Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text(_UTILS)
    names = []

    def put(name: str, body: str) -> None:
        (out / f"{name}.yaml").write_text(f"task: {name}\n" + body)
        names.append(name)

    for s in mmlu_subjects:
        cols = ["question", "A", "B", "C", "D", "answer"]
        conv = "".join(f"      {c}: !function utils.keep\n" for c in cols)
        desc = _q(f"The following are multiple choice questions (with answers) about {' '.join(s.split('_'))}.\n\n")
        put(
            f"{prefix}_mmlu_{s}",
            f"""dataset_path: csv
dataset_kwargs:
  data_files:
    test: {_q(str(data / "mmlu" / mmlu_split / f"{s}_{mmlu_split}.csv"))}
    dev: {_q(str(data / "mmlu" / "dev" / f"{s}_dev.csv"))}
  column_names: {cols}
  keep_default_na: false
  na_filter: false
  converters:
{conv}test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: {desc}
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
{_MC_METRICS}""",
        )
    if arc:
        f = data / "arc" / f"{arc}_llmfoundry_500.jsonl"
        put(
            f"{prefix}_{arc}",
            f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(str(f))}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
{_MC_METRICS}""",
        )
    if hellaswag:
        f = data / "hellaswag" / "hellaswag_val_500.jsonl"
        put(
            f"{prefix}_hellaswag",
            f"""dataset_path: json
dataset_kwargs:
  data_files:
    validation: {_q(str(f))}
validation_split: validation
output_type: multiple_choice
process_docs: !function utils.hellaswag_process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
{_MC_METRICS}""",
        )
    if winogrande:
        f = data / "winogrande" / "winogrande_llmfoundry_500.jsonl"
        put(
            f"{prefix}_winogrande",
            f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(str(f))}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: !function utils.wg_text
doc_to_target: !function utils.wg_target
doc_to_choice: !function utils.wg_choice
{_MC_METRICS}""",
        )
    if demo_mc:
        d = Path(demo_mc)
        put(
            f"{prefix}_demo_mc",
            f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(str(d / "test.jsonl"))}
    dev: {_q(str(d / "dev.jsonl"))}
test_split: test
fewshot_split: dev
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:{{% if prefix %}} {{{{prefix}}}}{{% endif %}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
{_MC_METRICS}""",
        )
    return names


def run_lmeval(
    model,
    tokenizer,
    task_dir: str | Path,
    tasks: list[str],
    shots: dict[str, int],
    limit: Optional[int | dict[str, int]],
    batch_size: int = 16,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` offline on the YAMLs in ``task_dir``.

    Returns ``{task: {"metrics": {...}, "items": [{"doc_id", "lls", "acc", "acc_norm"}, ...]}}``.
    """
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out: dict[str, Any] = {}
    runs: dict[tuple, list[str]] = {}  # one simple_evaluate per (shots, limit)
    for t in tasks:
        lim = limit.get(t) if isinstance(limit, dict) else limit
        runs.setdefault((shots.get(t, 0), lim), []).append(t)
    for (n, lim), group in runs.items():
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=group,
            num_fewshot=n,
            limit=lim,
            task_manager=tm,
            log_samples=True,
            bootstrap_iters=100,
            verbosity="ERROR",
        )  # mean: closed-form stderr
        for t in group:
            items = []
            for s in sorted(res["samples"][t], key=lambda x: x["doc_id"]):
                lls = [float(r[0]) for r in s["filtered_resps"]]
                items.append({"doc_id": s["doc_id"], "lls": lls, "acc": s.get("acc"), "acc_norm": s.get("acc_norm")})
            m = res["results"][t]
            out[t] = {
                "metrics": {k.split(",")[0]: v for k, v in m.items() if isinstance(v, (int, float)) and "," in k},
                "items": items,
            }
    return out
