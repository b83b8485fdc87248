"""``evaluate_model``: run tasks on an in-memory model and return scores (no files written).

Used by the evaluate stage (``run``), the pipeline's report, and the training engine's callback
(:class:`EvalCallback`). Scores follow lm-eval's definitions; see ``tasks.py`` for prompts and
``lm.py`` for how requests are batched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from minima.core.errors import InputError
from minima.core.logs import get_logger, progress
from minima.evaluate import metrics as M
from minima.evaluate.lm import LM
from minima.evaluate.subjects import categories
from minima.evaluate.tasks import (
    Doc,
    FewshotSampler,
    Task,
    TaskData,
    build_context,
    chat_wrap,
    get_task,
    load_task,
    task_root,
)

log = get_logger("minima.evaluate")

# lm-eval's metric names per kind of task, for reports
MC_METRICS = ("acc", "acc_norm")


def default_data_dir() -> Optional[Path]:
    """``../shared/data/eval`` next to the working directory or to this checkout, when it exists."""
    here = Path(__file__).resolve().parents[2]
    for cand in (Path.cwd().parent / "shared" / "data" / "eval", here.parent / "shared" / "data" / "eval"):
        if cand.is_dir():
            return cand
    return None


def _spec(tasks, name) -> dict:
    if isinstance(tasks, Mapping):
        s = tasks[name]
        if s is None:
            return {}
        return s.model_dump() if hasattr(s, "model_dump") else dict(s)
    return {}


def task_names(tasks) -> list[str]:
    return list(tasks) if isinstance(tasks, Mapping) else list(tasks)


def _bar(desc: str, total: int):
    bar = progress(None, desc=desc, total=total, unit="req")
    return bar


class _Ctx:
    """What every task runner needs."""

    def __init__(self, lm: LM, tokenizer, chat_template: bool, max_new_tokens: int, fewshot_seed: int, seed: int):
        self.lm, self.tok, self.chat, self.max_new_tokens = lm, tokenizer, chat_template, max_new_tokens
        self.fewshot_seed, self.seed = fewshot_seed, seed


def evaluate_model(
    model,
    tokenizer,
    tasks: Union[list[str], Mapping[str, Any]],
    data_dir: Optional[str | Path] = None,
    shots: Optional[int] = None,
    limit: Optional[int] = None,
    batch_size: int = 16,
    mode: str = "loglikelihood",
    chat_template: bool = False,
    max_new_tokens: int = 256,
    fewshot_seed: int = 1234,
    seed: int = 0,
    distributed: bool = False,
    samples: Optional[list] = None,
    max_length: Optional[int] = None,
) -> dict[str, dict]:
    """Evaluate ``model`` on ``tasks`` and return ``{task: scores}``.

    Args:
        model: a causal LM (``*ForCausalLM``); put on its device by the caller.
        tokenizer: its tokenizer.
        tasks: task names, or ``{name: TaskSpec | dict}`` with per-task ``path``/``shots``/``limit``/``mode``/...
        data_dir: benchmark root with one folder per task (default ``../shared/data/eval`` if present).
        shots: few-shot count for every task (default: each task's standard count).
        limit: items per task (per subject for mmlu/ceval/cmmlu).
        batch_size: contexts per forward pass.
        mode: default scoring of mmlu/ceval/cmmlu: ``loglikelihood`` (lm-eval) or ``letter`` (hendrycks).
        chat_template: wrap each prompt in the tokenizer's chat template (one user turn).
        max_new_tokens: generation limit for gsm8k/bbh/drop/humaneval.
        fewshot_seed: seed of the random few-shot sampler (lm-eval's 1234 by default).
        seed: sampling seed (humaneval with num_samples > 1).
        distributed: split requests over ``torch.distributed`` ranks (every rank must call this).
        samples: if a list is given, one dict per evaluated item is appended to it.
        max_length: override the model's context length.

    Returns:
        ``{task: {"acc": .., "acc_stderr": .., ..., "info": {...}, "subjects": {...}, "categories": {...}}}``.
    """
    for name in task_names(tasks):
        if get_task(name).kind == "chat":
            raise InputError(
                f"{name} is an LLM-judged chat task: it needs a judge endpoint and runs in the evaluate stage only",
                fix=f"run `minima evaluate model=DIR tasks=[{name}] judge_model=NAME ...`, or drop it here",
            )
    lm = LM(model, tokenizer, batch_size=batch_size, distributed=distributed, max_length=max_length)
    data_root = Path(data_dir) if data_dir else default_data_dir()
    ctx = _Ctx(lm, tokenizer, chat_template, max_new_tokens, fewshot_seed, seed)
    out: dict[str, dict] = {}
    for name in task_names(tasks):
        task = get_task(name)
        spec = _spec(tasks, name)
        t0, calls0 = time.time(), lm.forward_calls
        n_shots = (
            spec.get("shots") if spec.get("shots") is not None else (shots if shots is not None else task.default_shots)
        )
        n_limit = spec.get("limit") or limit
        if task.kind == "ppl":
            res = _run_perplexity(ctx, task, spec, data_root, n_limit, samples)
        else:
            root = task_root(task, data_root, spec.get("path"))
            td = load_task(
                task,
                root,
                split=spec.get("split"),
                fmt=spec.get("format"),
                limit=n_limit,
                subjects=spec.get("subjects"),
            )
            if task.kind == "mc":
                res = _run_mc(ctx, task, td, n_shots, spec.get("mode") or mode, samples)
            else:
                res = _run_gen(ctx, task, td, n_shots, spec, samples)
            res["info"].update(
                split=td.eval_split, fewshot_split=td.fewshot_split, format=td.format, files=len(td.files)
            )
        dt = time.time() - t0
        n = res["info"].get("n", 0)
        res["info"].update(
            seconds=round(dt, 3),
            items_per_s=round(n / dt, 2) if dt > 0 else None,
            forward_calls=lm.forward_calls - calls0,
        )
        main = next((k for k in res if not isinstance(res[k], dict) and not k.endswith("_stderr")), None)
        log.info(
            f"{name}: {main} {res[main]:.4f} on {n} items in {dt:.1f}s"
            if main and res[main] is not None
            else f"{name}: done"
        )
        out[name] = res
    return out


# ------------------------------------------------------------------------------ multiple choice
def _prompt(ctx: _Ctx, text: str) -> str:
    return chat_wrap(ctx.tok, text) if ctx.chat else text


def _run_mc(ctx: _Ctx, task: Task, td: TaskData, shots: int, mode: str, samples) -> dict:
    if mode == "letter" and not task.supports_letter_mode:
        raise InputError(f"{task.name}: mode=letter is only for mmlu, ceval and cmmlu", where=f"tasks.{task.name}.mode")
    delim = "" if ctx.chat else " "  # lm-eval drops the target delimiter under a chat template
    per_doc: list[tuple[str, Doc, Any]] = []  # (subject, doc, contexts)
    for subject, docs in td.eval.items():
        pool = td.fewshot.get(subject) or td.fewshot.get("", [])
        if shots and not pool:
            raise InputError(
                f"{task.name}/{subject}: {shots} shots asked but there is no few-shot pool",
                fix="add a dev split or set shots=0",
            )
        sampler = FewshotSampler(pool, task.sampler, ctx.fewshot_seed, same_split=td.fewshot_split is None)
        for doc in docs:
            c = build_context(task, doc, sampler.sample(shots, doc), subject)
            per_doc.append((subject, doc, [_prompt(ctx, x) for x in c] if isinstance(c, list) else _prompt(ctx, c)))
    scores: dict[str, list[dict]] = {}
    if mode == "letter":
        letter_ids = [ctx.tok.encode(l, add_special_tokens=False)[-1] for l in "ABCD"]
        lps = ctx.lm.next_token_logprobs([c for _, _, c in per_doc], letter_ids)
        for (subject, doc, _), lp in zip(per_doc, lps):
            pred = M.argmax(lp)
            item = {"acc": float(pred == doc.gold)}
            scores.setdefault(subject, []).append(item)
            _sample(samples, task, subject, doc, gold=doc.gold, pred=pred, logprobs=lp, **item)
        metric_names = ("acc",)
    else:
        requests, spans = [], []
        for _, doc, c in per_doc:
            start = len(requests)
            if doc.multi_context:
                requests += [(x, delim + doc.target) for x in c]
            else:
                requests += [(c, delim + ch) for ch in doc.choices]
            spans.append((start, len(requests)))
        bar = _bar(task.name, len(requests))
        lls = ctx.lm.loglikelihood(requests, progress=bar.update)
        bar.close()
        for (subject, doc, _), (a, b) in zip(per_doc, spans):
            ll = [x for x, _ in lls[a:b]]
            lens = [float(len(ch)) for ch in doc.choices]
            pred, pred_norm = M.argmax(ll), M.argmax([x / n for x, n in zip(ll, lens)])
            item = {"acc": float(pred == doc.gold), "acc_norm": float(pred_norm == doc.gold)}
            scores.setdefault(subject, []).append(item)
            _sample(
                samples,
                task,
                subject,
                doc,
                gold=doc.gold,
                pred=pred,
                pred_norm=pred_norm,
                loglikelihoods=ll,
                is_greedy=[g for _, g in lls[a:b]],
                **item,
            )
        metric_names = MC_METRICS
    res = _aggregate(task, scores, metric_names)
    res["info"] = {"n": sum(len(v) for v in scores.values()), "shots": shots, "mode": mode, "chat_template": ctx.chat}
    return res


def _sample(samples, task, subject, doc, **kw):
    if samples is None:
        return
    samples.append(
        {
            "task": task.name,
            **({"subject": subject} if subject else {}),
            "where": doc.where,
            **{k: v for k, v in kw.items()},
        }
    )


def _aggregate(task: Task, scores: dict[str, list[dict]], metric_names) -> dict:
    """Task metrics with stderr; for subject tasks also per subject and per category."""
    res: dict[str, Any] = {}
    flat = [it for items in scores.values() for it in items]
    for m in metric_names:
        vals = [it[m] for it in flat]
        res[m], res[f"{m}_stderr"] = M.mean(vals), M.stderr(vals)
    if task.has_subjects and any(scores):
        subs = {}
        for s, items in scores.items():
            d = {"n": len(items)}
            for m in metric_names:
                vals = [it[m] for it in items]
                d[m], d[f"{m}_stderr"] = M.mean(vals), M.stderr(vals)
            subs[s] = d
        res["subjects"] = subs
        cats: dict[str, list[str]] = {}
        for s in subs:
            for c in categories(task.name, s):
                cats.setdefault(c, []).append(s)
        if cats:
            weighted = task.name == "mmlu"  # hendrycks/lm-eval: over questions; C-Eval/CMMLU: mean of subjects
            res["categories"] = {
                c: _group(subs, members, metric_names, weighted) for c, members in sorted(cats.items())
            }
            if not weighted:  # the official C-Eval/CMMLU average is the mean over subjects
                g = _group(subs, list(subs), metric_names, False)
                for m in metric_names:
                    res[f"{m}_subject_mean"] = g[m]
    return res


def _group(subs: dict, members: list[str], metric_names, weighted: bool) -> dict:
    d: dict[str, Any] = {"n_subjects": len(members), "n": sum(subs[s]["n"] for s in members)}
    for m in metric_names:
        if weighted:
            sizes = [subs[s]["n"] for s in members]
            d[m] = sum(subs[s][m] * n for s, n in zip(members, sizes)) / sum(sizes)
            d[f"{m}_stderr"] = M.pooled_stderr([subs[s][f"{m}_stderr"] for s in members], sizes)
        else:
            d[m] = M.mean([subs[s][m] for s in members])
            d[f"{m}_stderr"] = M.unweighted_stderr([subs[s][f"{m}_stderr"] for s in members])
    d["weighting"] = "questions" if weighted else "subjects"
    return d


# ----------------------------------------------------------------------------------- generation
def _run_gen(ctx: _Ctx, task: Task, td: TaskData, shots: int, spec: dict, samples) -> dict:
    per_doc: list[tuple[str, Doc, str]] = []
    for subject, docs in td.eval.items():
        pool = td.fewshot.get(subject) or td.fewshot.get("", [])
        if task.name == "bbh" and td.fewshot_split is None:
            # BBH files have one split: the first `shots` items are the examples and are not scored.
            pool, docs = docs[:shots], docs[shots:]
            sampler = FewshotSampler(pool, "first_n", ctx.fewshot_seed, same_split=False)
        else:
            sampler = FewshotSampler(pool, task.sampler, ctx.fewshot_seed, same_split=td.fewshot_split is None)
        for doc in docs:
            shots_docs = sampler.sample(shots, doc) if shots else []
            delim = "" if task.name == "drop" else " "
            prefix = task.description(subject) + "".join(
                s.query + delim + _target_text(task, s) + "\n\n" for s in shots_docs
            )
            per_doc.append((subject, doc, _prompt(ctx, prefix + doc.query)))
    n_samples = int(spec.get("num_samples") or 1) if task.name == "humaneval" else 1
    temperature = spec.get("temperature") if spec.get("temperature") is not None else 0.8
    bar = _bar(task.name, len(per_doc))
    gens = ctx.lm.generate_until(
        [c for _, _, c in per_doc],
        until=task.stop,
        max_new_tokens=ctx.max_new_tokens,
        do_sample=n_samples > 1,
        temperature=temperature,
        num_samples=n_samples,
        seed=ctx.seed,
        progress=bar.update,
    )
    bar.close()
    scores: dict[str, list[dict]] = {}
    if task.name == "humaneval":
        from minima.evaluate.sandbox import check_programs

        programs: list[str] = []
        for (_, doc, _), outs in zip(per_doc, gens):
            programs += [humaneval_program(doc.query, g, doc.target, doc.gold) for g in outs]
        results = check_programs(programs, timeout_s=float(spec.get("timeout_s") or 10.0))
        ks = [k for k in (1, 10, 100) if k <= n_samples]
        i = 0
        for (subject, doc, _), outs in zip(per_doc, gens):
            rs = results[i : i + len(outs)]
            i += len(outs)
            c = sum(r.passed for r in rs)
            item = {f"pass@{k}": M.pass_at_k(len(outs), c, k) for k in ks}
            scores.setdefault(subject, []).append(item)
            _sample(
                samples,
                task,
                subject,
                doc,
                task_id=doc.raw.get("task_id"),
                completions=outs,
                status=[r.status for r in rs],
                detail=[r.detail for r in rs][:1],
                isolation=rs[0].isolation if rs else None,
                **item,
            )
        metric_names = tuple(f"pass@{k}" for k in ks)
    else:
        for (subject, doc, _), outs in zip(per_doc, gens):
            g = outs[0]
            if task.name == "gsm8k":
                ext = M.gsm8k_extract(g)
                item = {
                    "exact_match_strict": M.exact_match(
                        ext["strict-match"], doc.target, M.GSM8K_IGNORE, ignore_case=True
                    ),
                    "exact_match_flexible": M.exact_match(
                        ext["flexible-extract"], doc.target, M.GSM8K_IGNORE, ignore_case=True
                    ),
                }
                extra = {"extracted": ext, "gold": doc.gold}
            elif task.name == "drop":
                item, extra = M.drop_score(g, doc.gold), {"gold": [list(a) for a in doc.gold]}
            else:  # bbh: exact match after trimming whitespace
                item, extra = {"exact_match": float(g.strip() == str(doc.gold).strip())}, {"gold": doc.gold}
            scores.setdefault(subject, []).append(item)
            _sample(samples, task, subject, doc, generation=g, **extra, **item)
        metric_names = tuple(scores[next(iter(scores))][0]) if scores else ()
    res = _aggregate(task, scores, metric_names)
    res["info"] = {
        "n": sum(len(v) for v in scores.values()),
        "shots": shots,
        "mode": "generate",
        "max_new_tokens": ctx.max_new_tokens,
        "chat_template": ctx.chat,
    }
    if task.name == "humaneval":
        res["info"]["num_samples"] = n_samples
    return res


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs: the prompt, the model's completion, the tests, and the check call."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n"


def _target_text(task: Task, doc: Doc) -> str:
    if task.name == "drop":
        return ",".join(doc.gold[0]) if doc.gold else ""
    return str(doc.target)


# ----------------------------------------------------------------------------------- perplexity
def perplexity_texts(spec: dict, data_root: Optional[Path], limit: Optional[int]) -> list[tuple[str, str]]:
    """(name, text) pairs: the task path (files, a folder or a glob), data_dir/perplexity, else the demo corpus."""
    from minima.evaluate.data import list_files, read_rows

    root = Path(spec["path"]).expanduser() if spec.get("path") else None
    if root is None and data_root is not None:
        root = next((data_root / f for f in ("perplexity",) if (data_root / f).exists()), None)
    if root is None:
        from minima.data.demo import generate

        c = generate()
        n = limit or 200
        return [
            ("demo/pretrain_en", "\n".join(c.pretrain_en[:n]) + "\n"),
            ("demo/pretrain_zh", "\n".join(c.pretrain_zh[:n]) + "\n"),
        ]
    if spec.get("path") and not root.exists() and not any(ch in str(root) for ch in "*?["):
        raise InputError(f"perplexity: path {root} does not exist", where="tasks.perplexity.path")
    files = list_files(root, suffixes=(".txt", ".jsonl", ".json"))
    if not files:
        raise InputError(
            f"perplexity: no .txt/.jsonl files under {root}",
            where="tasks.perplexity.path",
            fix="point it at text files (or JSONL rows with a 'text' field)",
        )
    out = []
    for f in files:
        if f.suffix == ".txt":
            with open(f, encoding="utf-8") as fh:
                lines = [line for _, line in zip(range(limit) if limit else iter(int, 1), fh)]
            text = "".join(lines)
        else:
            rows = []
            for line, row in read_rows(f):
                if "text" not in row:
                    raise InputError("row has no 'text' field", where=f"{f}:{line}")
                rows.append(str(row["text"]))
                if limit and len(rows) >= limit:
                    break
            text = "\n\n".join(rows)
        out.append((str(f), text))
    return out


def _run_perplexity(ctx: _Ctx, task: Task, spec: dict, data_root: Optional[Path], limit, samples) -> dict:
    texts = perplexity_texts(spec, data_root, limit)
    window = spec.get("max_length") or ctx.lm.max_length
    stride = spec.get("stride") or max(1, window // 2)
    total_nll, total_tok, total_bytes = 0.0, 0, 0
    files = {}
    for name, text in texts:
        toks = ctx.lm.tok_encode(text)
        if len(toks) < 2:
            continue
        nll, n = ctx.lm.rolling_nll(toks, window=window, stride=stride)
        b = len(text.encode("utf-8"))
        files[name] = {"token_perplexity": math.exp(nll / n), "bits_per_byte": nll / b / math.log(2), "tokens": n}
        total_nll, total_tok, total_bytes = total_nll + nll, total_tok + n, total_bytes + b
        if samples is not None:
            samples.append({"task": "perplexity", "file": name, "nll": nll, **files[name]})
    if not total_tok:
        raise InputError("perplexity: the texts are empty", where="tasks.perplexity.path")
    return {
        "token_perplexity": math.exp(total_nll / total_tok),
        "bits_per_byte": total_nll / total_bytes / math.log(2),
        "files": files,
        "info": {"n": len(files), "tokens": total_tok, "window": window, "stride": stride, "mode": "rolling"},
    }
