"""Scores and their standard errors: accuracy, GSM8K extraction, exact match, DROP F1, pass@k.

Definitions follow lm-eval 0.4 (stderr of a mean = sample std / sqrt(n); a group's stderr pools its
subtasks' variances) and the reference implementations of DROP (allennlp drop_eval) and HumanEval
(the unbiased pass@k estimator of Chen et al. 2021).
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


# ----------------------------------------------------------------------------------- GSM8K
def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's RegexFilter + take_first: the ``group_select``-th match (first non-empty group), stripped."""
    matches = re.findall(pattern, text if isinstance(text, str) else "")
    if not matches:
        return fallback
    m = matches[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def gsm8k_extract(generation: str) -> dict[str, str]:
    """The strict (``#### N``) and flexible (last number) answers of a GSM8K generation."""
    from minima.evaluate.tasks import GSM8K_FLEXIBLE, GSM8K_STRICT

    return {
        "strict-match": regex_extract(generation, GSM8K_STRICT, 0),
        "flexible-extract": regex_extract(generation, GSM8K_FLEXIBLE, -1),
    }


GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


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


# ------------------------------------------------------------------------------------ DROP
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def drop_parse_answer(answer: dict) -> tuple[str, ...]:
    """A DROP answer dict as a tuple of strings: the number, else the spans, else 'day month year'."""
    if str(answer.get("number", "")) != "":
        return (str(answer["number"]),)
    if answer.get("spans"):
        return tuple(answer["spans"])
    d = answer.get("date") or {}
    return (" ".join([str(d.get("day", "")), str(d.get("month", "")), str(d.get("year", ""))]).strip(),)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _drop_normalize(answer: str) -> str:
    out = []
    for token in re.split(" |-", answer):
        t = token.lower()
        if not _is_number(t):
            t = "".join(ch for ch in t if ch not in string.punctuation)
        if _is_number(t):
            t = str(float(t))
        t = " ".join(_ARTICLES.sub(" ", t).split())
        if t.strip():
            out.append(t)
    return " ".join(out).strip()


def _bags(answer) -> tuple[list[str], list[set[str]]]:
    spans = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    norm = [_drop_normalize(s) for s in spans]
    return norm, [set(n.split()) for n in norm]


def _f1(pred: set, gold: set) -> float:
    inter = len(gold & pred)
    p = inter / len(pred) if pred else 1.0
    r = inter / len(gold) if gold else 1.0
    return 0.0 if p == 0 and r == 0 else 2 * p * r / (p + r)


def _numbers_agree(gold: set, pred: set) -> bool:
    g = {w for w in gold if _is_number(w)}
    return not g or bool(g & {w for w in pred if _is_number(w)})


def _best_alignment(scores: list[list[float]]) -> list[float]:
    """Per gold bag, its score under the 1-1 assignment of gold to predicted bags that maximises the total."""
    rows, cols = len(scores), len(scores[0]) if scores else 0
    best = [0.0] * max(rows, cols)
    if not rows or not cols:
        return best
    try:
        import numpy as np
        from scipy.optimize import linear_sum_assignment

        r_ind, c_ind = linear_sum_assignment(-np.asarray(scores))
        pairs = list(zip(r_ind.tolist(), c_ind.tolist()))
    except ImportError:  # tiny bags: brute force over assignments
        import itertools

        if rows <= cols:
            cands = [list(zip(range(rows), p)) for p in itertools.permutations(range(cols), rows)]
        else:
            cands = [list(zip(p, range(cols))) for p in itertools.permutations(range(rows), cols)]
        pairs = max(cands, key=lambda ps: sum(scores[r][c] for r, c in ps))
    for r, c in pairs:
        best[r] = max(best[r], scores[r][c])
    return best


def drop_metrics(pred, gold) -> tuple[float, float]:
    """(exact match, F1) of a predicted answer (a string or spans) against one gold answer, as drop_eval."""
    p_norm, p_bags = _bags(pred)
    g_norm, g_bags = _bags(gold)
    em = float(set(p_norm) == set(g_norm) and len(p_norm) == len(g_norm))
    scores = [[_f1(p, g) if _numbers_agree(g, p) else 0.0 for p in p_bags] for g in g_bags]
    per = _best_alignment(scores)
    return em, round(sum(per) / len(per), 2)


def drop_score(prediction: str, golds: Sequence[tuple[str, ...]]) -> dict[str, float]:
    """Max EM and F1 of a generation over a question's gold answers (empty golds are skipped)."""
    em = f1 = 0.0
    for g in golds:
        e, f = drop_metrics([prediction], g)
        if g[0].strip():
            em, f1 = max(em, e), max(f1, f)
    return {"em": em, "f1": f1}


# -------------------------------------------------------------------------------- HumanEval
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


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"value": mean(values), "stderr": stderr(values)}


def safe_float(x: Optional[float]) -> Optional[float]:
    """JSON-friendly: nan/inf become None."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return None
    return float(x)
