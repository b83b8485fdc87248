"""The task interface: a benchmark is its data, its prompt and its metric, as in lm-evaluation-harness.

A :class:`Task` loads its docs (eval split and few-shot pool), builds each doc's context with k solved
examples, turns the context into model :class:`Request` s, scores a doc's outputs into per-item metrics,
and aggregates the items into the task's scores. The runner (``core.py``) only sends the requests to the
model. Kinds: ``multiple_choice`` (a loglikelihood per choice), ``generate_until`` (a generation per doc),
``loglikelihood_rolling`` (a rolling loglikelihood per text) and ``chat`` (LLM-judged, run by the stage).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from minima.core.errors import InputError
from minima.core.logs import get_logger
from minima.evaluate import metrics as M
from minima.evaluate.tasks.loading import Doc, Schema, TaskData, load_task, parse_rows, task_root

log = get_logger("minima.evaluate")

KINDS = ("multiple_choice", "generate_until", "loglikelihood_rolling", "chat")
# What a request asks of the model (the runner's LM calls): its args, and what comes back per request.
#   loglikelihood          (context, continuation)      -> (loglikelihood, is_greedy)
#   next_token             (context, candidate strings) -> logprob of each candidate's last token
#   generate_until         (context,)                   -> list of generations (task.generation_kwargs)
#   loglikelihood_rolling  (text, window, stride)       -> (nll, tokens), or None under 2 tokens
REQUEST_TYPES = ("loglikelihood", "next_token", "generate_until", "loglikelihood_rolling")


@dataclass(frozen=True)
class Request:
    """One model call of a doc: ``type`` is one of ``REQUEST_TYPES``, ``args`` its arguments."""

    type: str
    args: tuple


def _plain(text: str) -> str:
    return text


@dataclass
class Settings:
    """How one task runs: shots, items, scoring mode, prompt rendering, generation limits and seeds.

    ``spec`` is the task's own overrides (``tasks.<name>.*``); ``render`` wraps a finished context
    (the chat template, or nothing); ``max_length`` is the model's context length.
    """

    shots: int = 0
    limit: Optional[int] = None
    mode: str = "loglikelihood"
    chat_template: bool = False
    max_new_tokens: int = 256
    fewshot_seed: int = 1234
    seed: int = 0
    max_length: int = 2048
    spec: dict = field(default_factory=dict)
    render: Callable[[str], str] = _plain


@dataclass
class Instance:
    """A doc ready for the model: its subject, the doc and its requests."""

    subject: str
    doc: Doc
    requests: list[Request]


@dataclass
class Scored:
    """A scored doc: per-item ``metrics`` and the extra ``record`` fields written to samples.jsonl."""

    subject: str
    doc: Doc
    metrics: dict[str, float]
    record: dict


# --------------------------------------------------------------------------------- few-shot
class FewshotSampler:
    """lm-eval's samplers: ``first_n`` in file order, or ``random.Random(seed).sample`` per doc in order.

    When the pool is the eval split itself, the doc being asked is never its own example: ``first_n``
    skips it, and ``random`` draws n+1 docs and removes it, exactly as lm-eval does, so the same seed
    gives the same prompts. When the pool holds fewer than n other docs, every one of them is used and
    ``short`` records the largest shortfall (the task warns once).
    """

    def __init__(self, pool: list[Doc], kind: str, seed: int, same_split: bool):
        self.pool, self.kind, self.same_split = pool, kind, same_split
        self.rnd = random.Random(seed)
        self.short: Optional[tuple[int, int]] = None  # (asked, used) of the worst shortfall

    def sample(self, n: int, doc: Doc) -> list[Doc]:
        if n == 0:
            return []
        others = [x for x in self.pool if x.raw != doc.raw] if self.same_split else self.pool
        if n > len(others):
            if self.short is None or len(others) < self.short[1]:
                self.short = (n, len(others))
            n = len(others)
            if n == 0:
                return []
        if self.kind == "first_n":
            return others[:n]
        if not self.same_split:
            return self.rnd.sample(self.pool, n)
        picked = [x for x in self.rnd.sample(self.pool, min(n + 1, len(self.pool))) if x.raw != doc.raw][:n]
        if len(picked) < n:
            picked = self.rnd.sample(others, n)
        return picked


# ------------------------------------------------------------------------------------- task
class Task:
    """A benchmark: its files, its prompt, its requests, its per-item scoring and its aggregation.

    Subclasses set the class attributes and ``schemas`` (or override ``detect``/``parse``), and
    implement ``requests`` and ``process_results``; :class:`MultipleChoiceTask` and
    :class:`GenerateUntilTask` do so for their kinds.
    """

    name: str = ""
    kind: str = "multiple_choice"
    default_shots: int = 0
    sampler: str = "random"  # random (lm-eval's seeded default) | first_n
    has_subjects: bool = False
    folders: tuple[str, ...] = ()  # looked up under data_dir
    in_shared_data: bool = True  # False: a missing folder's fix says ../shared/data does not hold it
    schemas: tuple[Schema, ...] = ()
    fewshot_delimiter: str = " "  # between a solved example's question and its answer
    category_weighting: str = "questions"  # a category's score: over its questions, or the mean of its subjects

    # -- data
    @property
    def formats(self) -> dict[str, str]:
        """Format name -> one-line description, for ``format=`` and error messages."""
        return {s.name: s.describe for s in self.schemas}

    def detect(self, path: Path, row) -> Optional[str]:
        """The format of a file whose first record is ``row``, or None if it is not this task's."""
        return next((s.name for s in self.schemas if s.matches(row)), None)

    def parse(self, path: Path, fmt: str) -> list[Doc]:
        """All docs of a file in format ``fmt``."""
        docs = parse_rows(path, next(s for s in self.schemas if s.name == fmt))
        if self.has_subjects:
            for d in docs:
                d.subject = d.subject or self.subject_of(path)
        return docs

    def subject_of(self, path: Path) -> str:
        return ""

    def accept_file(self, path: Path) -> bool:
        return True

    def load(self, data_dir: Optional[Path], settings: Settings) -> TaskData:
        """Eval docs and few-shot pool from ``tasks.<name>.path`` or ``data_dir/<folder>`` (split, subjects)."""
        spec = settings.spec
        root = task_root(self, data_dir, spec.get("path"))
        return load_task(
            self,
            root,
            split=spec.get("split"),
            fmt=spec.get("format"),
            limit=settings.limit,
            subjects=spec.get("subjects"),
        )

    def data_info(self, data: TaskData) -> dict:
        return data.info()

    # -- prompt
    def description(self, subject: str) -> str:
        return ""

    def fewshot_target(self, doc: Doc) -> str:
        """A solved example's answer text."""
        return str(doc.target)

    def fewshot_text(self, doc: Doc) -> str:
        """A doc as a solved example (without the blank line that follows it)."""
        return doc.query + self.fewshot_delimiter + self.fewshot_target(doc)

    def build_context(self, doc: Doc, shots: list[Doc], subject: str) -> Union[str, list[str]]:
        """lm-eval's plain-text prompt: description, solved shots joined by blank lines, then the question."""
        return self.description(subject) + "".join(self.fewshot_text(s) + "\n\n" for s in shots) + doc.query

    def fewshot_sampler(
        self, data: TaskData, subject: str, docs: list[Doc], settings: Settings
    ) -> tuple[FewshotSampler, list[Doc]]:
        """The sampler of a subject's shots, and the docs to score."""
        pool = data.fewshot.get(subject) or data.fewshot.get("", [])
        same = data.fewshot_split is None
        return FewshotSampler(pool, self.sampler, settings.fewshot_seed, same_split=same), docs

    # -- requests
    def check(self, settings: Settings) -> None:
        """Reject settings this task cannot run (before any data loads)."""

    def instances(self, data: TaskData, settings: Settings) -> list[Instance]:
        """Every eval doc with its requests, subject by subject."""
        out, short = [], {}
        for subject, docs in data.eval.items():
            sampler, docs = self.fewshot_sampler(data, subject, docs, settings)
            for doc in docs:
                ctx = self.build_context(doc, sampler.sample(settings.shots, doc), subject)
                ctx = [settings.render(c) for c in ctx] if isinstance(ctx, list) else settings.render(ctx)
                out.append(Instance(subject, doc, self.requests(doc, ctx, settings)))
            if sampler.short:
                short[subject] = sampler.short[1]
        data.fewshot_short = short
        if short:
            self.warn_short(data, settings.shots, short)
        return out

    def warn_short(self, data: TaskData, shots: int, short: dict[str, int]) -> None:
        """One warning for every subject whose few-shot pool held fewer than ``shots`` examples."""
        where = (
            f"the {data.fewshot_split} split" if data.fewshot_split else f"the {data.eval_split} split less the item"
        )
        names = [f"{self.name}/{s}" if s else self.name for s in short]
        shown = ", ".join(f"{n} ({k})" for n, k in list(zip(names, short.values()))[:5])
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        log.warning(
            f"{self.name}: {shots} few-shot examples asked but {where} holds fewer; "
            f"using all there are (shots used): {shown}{more}"
        )

    def requests(self, doc: Doc, context, settings: Settings) -> list[Request]:
        raise NotImplementedError

    def generation_kwargs(self, settings: Settings) -> dict:
        """Arguments of the model's ``generate_until`` shared by all of this task's requests."""
        return {}

    # -- scoring
    def process_results(self, doc: Doc, outputs: list, settings: Settings) -> tuple[dict[str, float], dict]:
        """A doc's per-item metrics and its samples.jsonl record from the outputs of its requests."""
        raise NotImplementedError

    def score(self, instances: list[Instance], outputs: list[list], settings: Settings) -> list[Scored]:
        return [
            Scored(inst.subject, inst.doc, *self.process_results(inst.doc, out, settings))
            for inst, out in zip(instances, outputs)
        ]

    def metric_names(self, settings: Settings) -> tuple[str, ...]:
        raise NotImplementedError

    def categories(self, subject: str) -> list[str]:
        """The categories a subject counts in."""
        return []

    def aggregate(self, scored: list[Scored], settings: Settings) -> dict:
        """Task metrics with stderr; with subjects also per subject and per category."""
        by_subject: dict[str, list[dict]] = {}
        for s in scored:
            by_subject.setdefault(s.subject, []).append(s.metrics)
        return aggregate_subjects(
            by_subject,
            self.metric_names(settings),
            self.categories if self.has_subjects else None,
            self.category_weighting == "questions",
        )

    def info(self, scored: list[Scored], settings: Settings) -> dict:
        """What results.json records about the run besides the data."""
        return {"n": len(scored), "shots": settings.shots}

    def sample(self, s: Scored) -> dict:
        """The samples.jsonl line of a scored doc."""
        return {
            "task": self.name,
            **({"subject": s.subject} if s.subject else {}),
            "where": s.doc.where,
            **s.record,
            **s.metrics,
        }


def aggregate_subjects(
    scores: dict[str, list[dict]],
    metric_names,
    categories: Optional[Callable[[str], list[str]]],
    weighted: bool,
) -> dict:
    """Mean and stderr of each metric; with ``categories`` also per subject, per category and the subject mean.

    ``weighted``: a category's score is over its questions (MMLU) rather than the mean of its subjects;
    with subject means the task also gets ``<metric>_subject_mean`` (the official C-Eval/CMMLU average).
    """
    res: dict[str, Any] = {}
    flat = [it for items in scores.values() for it in items]
    for m in metric_names:
        vals = [it[m] for it in flat]
        res[m], res[f"{m}_stderr"] = M.mean(vals), M.stderr(vals)
    if categories is not None and any(scores):
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
            for c in categories(s):
                cats.setdefault(c, []).append(s)
        if cats:
            res["categories"] = {
                c: _group(subs, members, metric_names, weighted) for c, members in sorted(cats.items())
            }
            if not weighted:
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


# ------------------------------------------------------------------------------ the two kinds
class MultipleChoiceTask(Task):
    """Each choice scored as the continuation ``" " + choice``: acc (best loglikelihood), acc_norm (per character)."""

    kind = "multiple_choice"
    modes: tuple[str, ...] = ("loglikelihood",)

    def check(self, settings):
        if settings.mode not in self.modes:
            raise InputError(
                f"{self.name}: mode={settings.mode} is not one of this task's modes ({', '.join(self.modes)})",
                where=f"tasks.{self.name}.mode",
            )

    def fewshot_target(self, doc):
        return doc.choices[doc.gold]

    def target_delimiter(self, settings: Settings) -> str:
        """Before each scored continuation; lm-eval leaves it out under a chat template."""
        return "" if settings.chat_template else " "

    def requests(self, doc, context, settings):
        delim = self.target_delimiter(settings)
        return [Request("loglikelihood", (context, delim + ch)) for ch in doc.choices]

    def process_results(self, doc, outputs, settings):
        ll = [x for x, _ in outputs]
        pred, pred_norm = M.choice_predictions(ll, [float(len(ch)) for ch in doc.choices])
        record = dict(
            gold=doc.gold, pred=pred, pred_norm=pred_norm, loglikelihoods=ll, is_greedy=[g for _, g in outputs]
        )
        return M.acc_scores(pred, pred_norm, doc.gold), record

    def metric_names(self, settings):
        return ("acc", "acc_norm")

    def info(self, scored, settings):
        return {**super().info(scored, settings), "mode": settings.mode, "chat_template": settings.chat_template}


class GenerateUntilTask(Task):
    """One generation per doc until a stop string; ``score_generation`` compares it with the doc's answer."""

    kind = "generate_until"
    until: list[str] = []

    def requests(self, doc, context, settings):
        return [Request("generate_until", (context,))]

    def num_samples(self, settings: Settings) -> int:
        return 1

    def generation_kwargs(self, settings):
        n = self.num_samples(settings)
        temperature = settings.spec.get("temperature")
        return dict(
            until=self.until,
            max_new_tokens=settings.max_new_tokens,
            do_sample=n > 1,
            temperature=temperature if temperature is not None else 0.8,
            num_samples=n,
            seed=settings.seed,
        )

    def score_generation(self, doc: Doc, generation: str) -> tuple[dict[str, float], dict]:
        """Metrics of one generation, and the record fields (e.g. the gold answer) beside it."""
        raise NotImplementedError

    def process_results(self, doc, outputs, settings):
        g = outputs[0][0]
        item, extra = self.score_generation(doc, g)
        return item, {"generation": g, **extra}

    def info(self, scored, settings):
        return {
            **super().info(scored, settings),
            "mode": "generate",
            "max_new_tokens": settings.max_new_tokens,
            "chat_template": settings.chat_template,
        }
