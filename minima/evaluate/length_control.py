"""AlpacaEval 2's length-controlled (LC) win rate.

A judge that prefers longer answers inflates the raw win rate of a verbose model. AlpacaEval 2
(Dubois et al., 2024, "Length-Controlled AlpacaEval") removes that by regression: a logistic GLM
predicts the judge's preference for the model over the baseline from

- ``tanh(delta_len / std(delta_len))``: the length difference in characters, scaled by its standard
  deviation over the set and squashed (the term to control for);
- the instruction's difficulty, when known (AlpacaEval ships one value per instruction of its set);
- the model's identity: a per-model intercept (the only other term; no global intercept).

Preferences are soft labels in [0, 1] (a tie is 0.5). The LC win rate is the mean predicted
preference with the length term set to zero: what the judge would prefer if both answers had the
same length. With equal lengths everywhere it is the raw win rate.

AlpacaEval fits the GLM with an L1 penalty chosen by 5-fold cross-validation and regularizes the
model's weights toward two length-gamed baselines from its own leaderboard data. Neither is
available for an arbitrary question set, so the fit here is maximum likelihood (Newton's method)
with a weak L2 penalty on the length and difficulty weights only, which keeps them finite when the
lengths separate the preferences perfectly; the model's intercept is not penalized.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from minima.core.errors import DataError

#: inverse strength of the L2 penalty on the length and difficulty weights (AlpacaEval's C is 100 as well)
C = 100.0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Clipped: all-win or all-loss sets push the intercept without bound.
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


def _fit_soft_logistic(x: np.ndarray, y: np.ndarray, penalized: np.ndarray, iters: int = 100) -> np.ndarray:
    """Weights minimizing the soft-label log loss ``-sum(y log p + (1-y) log(1-p))`` + ``|w_pen|^2 / (2C)``."""
    w = np.zeros(x.shape[1])
    ridge = np.diag(penalized.astype(float) / C)
    for _ in range(iters):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + ridge @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def length_controlled_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    difficulty: Optional[Sequence[float]] = None,
) -> dict:
    """The LC win rate of a model against a baseline, and the GLM's weights.

    Args:
        preferences: per comparison, 1 if the judge preferred the model, 0 the baseline, 0.5 a tie.
        model_lengths: characters of the model's answer per comparison.
        baseline_lengths: characters of the baseline's answer.
        difficulty: the instruction's difficulty per comparison (None: the term is left out).

    Returns:
        ``{"lc_win_rate", "win_rate", "weights": {"length", "difficulty"?, "model"}, "n"}`` (rates in [0, 1]).
    """
    y = np.asarray(preferences, dtype=float)
    n = len(y)
    if not n or len(model_lengths) != n or len(baseline_lengths) != n:
        raise DataError(
            f"LC win rate needs one preference and two lengths per comparison: got {n}, "
            f"{len(model_lengths)}, {len(baseline_lengths)}"
        )
    if np.any((y < 0) | (y > 1)):
        raise DataError("preferences must lie in [0, 1] (1: the model wins, 0.5: a tie)")
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    sd = float(delta.std(ddof=1)) if n > 1 else 0.0
    length = np.tanh(delta / sd) if sd > 0 else np.zeros(n)  # all lengths equal: nothing to control
    cols, names = [length], ["length"]
    if difficulty is not None:
        cols.append(np.asarray(difficulty, dtype=float))
        names.append("difficulty")
    cols.append(np.ones(n))
    names.append("model")
    x = np.stack(cols, axis=1)
    w = _fit_soft_logistic(x, y, penalized=np.array([name != "model" for name in names]))
    x0 = x.copy()
    x0[:, 0] = 0.0  # the counterfactual: both answers of the same length
    lc = float(np.mean(_sigmoid(x0 @ w)))
    return {
        "lc_win_rate": lc,
        "win_rate": float(y.mean()),
        "weights": {k: float(v) for k, v in zip(names, w)},
        "n": n,
    }


def preference_of(outcome: str) -> Optional[float]:
    """A pairwise outcome (win, loss, tie, inconsistent, error) as a soft preference for the model."""
    return {"win": 1.0, "loss": 0.0, "tie": 0.5, "inconsistent": 0.5}.get(outcome)
