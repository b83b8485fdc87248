"""Generic scores and their standard errors: acc, acc_norm, regex extraction, exact match, F1, pass@k, perplexity.

Definitions follow lm-eval 0.4 (stderr of a mean = sample std / sqrt(n); a group's stderr pools its
subtasks' variances) and the unbiased pass@k estimator of Chen et al. 2021. Task-specific answer
parsing lives with its task in ``minima/evaluate/tasks/``; this module imports no task.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Optional


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean with the sample (n-1) variance; nan for fewer than 2 items."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-eval's stderr of a size-weighted group mean from its subtasks' stderrs."""
    pairs = [(s, n) for s, n in zip(stderrs, sizes) if not math.isnan(s)]
    if not pairs or sum(n for _, n in pairs) - len(pairs) <= 0:
        return float("nan")
    var = sum((n - 1) * s * s * n for s, n in pairs) / (sum(n for _, n in pairs) - len(pairs))
    return math.sqrt(var / sum(n for _, n in pairs))


def unweighted_stderr(stderrs: Sequence[float]) -> float:
    """Stderr of the plain mean of k subject means: sqrt(sum se^2) / k."""
    s = [x for x in stderrs if not math.isnan(x)]
    return math.sqrt(sum(x * x for x in s)) / len(s) if s else float("nan")


def argmax(xs: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, which lm-eval uses)."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def choice_predictions(loglikelihoods: Sequence[float], lengths: Sequence[float]) -> tuple[int, int]:
    """lm-eval's multiple-choice predictions: the best loglikelihood (acc), and the best per character (acc_norm)."""
    return argmax(loglikelihoods), argmax([x / n for x, n in zip(loglikelihoods, lengths)])


def acc_scores(pred: int, pred_norm: int, gold: int) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of one multiple-choice item."""
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


# ------------------------------------------------------------------------------ text answers
def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's RegexFilter + take_first: the ``group_select``-th match (first non-empty group), stripped."""
    matches = re.findall(pattern, text if isinstance(text, str) else "")
    if not matches:
        return fallback
    m = matches[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def exact_match(
    pred: str,
    ref: str,
    regexes_to_ignore: Sequence[str] = (),
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
) -> float:
    """HF ``evaluate`` exact_match as lm-eval configures it (regexes removed from both sides first)."""
    for r in regexes_to_ignore:
        pred, ref = re.sub(r, "", pred), re.sub(r, "", ref)
    if ignore_case:
        pred, ref = pred.lower(), ref.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        pred, ref = pred.translate(table), ref.translate(table)
    return float(pred == ref)


def f1(pred: set, gold: set) -> float:
    """F1 of two bags of tokens (1.0 for a side that is empty, as SQuAD/DROP score it)."""
    inter = len(gold & pred)
    p = inter / len(pred) if pred else 1.0
    r = inter / len(gold) if gold else 1.0
    return 0.0 if p == 0 and r == 0 else 2 * p * r / (p + r)


# ------------------------------------------------------------------------------- code
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ------------------------------------------------------------------------------- perplexity
def token_perplexity(nll: float, tokens: int) -> float:
    """exp of the mean negative loglikelihood per token."""
    return math.exp(nll / tokens)


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """The negative loglikelihood (nats) in bits per UTF-8 byte of the text."""
    return nll / n_bytes / math.log(2)


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"value": mean(values), "stderr": stderr(values)}


def safe_float(x: Optional[float]) -> Optional[float]:
    """JSON-friendly: nan/inf become None."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return None
    return float(x)
