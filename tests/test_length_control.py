"""AlpacaEval 2's length-controlled win rate against hand-built cases and a direct likelihood check."""

from __future__ import annotations

import numpy as np
import pytest

from minima.evaluate.length_control import length_controlled_win_rate


def test_equal_lengths_give_the_raw_win_rate():
    prefs = [1, 1, 0, 0.5, 1, 0, 1, 1, 0.5, 1]
    res = length_controlled_win_rate(prefs, [120] * 10, [120] * 10)
    assert res["win_rate"] == pytest.approx(np.mean(prefs))
    assert res["lc_win_rate"] == pytest.approx(np.mean(prefs), abs=1e-9)


def test_a_length_biased_judge_is_pulled_toward_half():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.integers(200, 800, n)
    model = base + rng.normal(300, 250, n).astype(int)  # the model is usually longer
    # The judge prefers the longer answer 85% of the time, whatever the content.
    longer = (model > base).astype(float)
    prefs = np.where(rng.random(n) < 0.85, longer, 1 - longer)
    res = length_controlled_win_rate(prefs, model, base)
    raw, lc = res["win_rate"], res["lc_win_rate"]
    print(f"raw {raw:.3f} lc {lc:.3f} weights {res['weights']}")
    assert raw > 0.7
    assert abs(lc - 0.5) < abs(raw - 0.5) - 0.15
    assert res["weights"]["length"] > 1.0  # longer model answers -> positive length weight


def test_fit_is_the_penalized_maximum_likelihood():
    """The weights zero the gradient of the soft log loss (+ the ridge on the length weight)."""
    rng = np.random.default_rng(1)
    n = 50
    prefs = rng.random(n)
    ml, bl = rng.integers(10, 100, n), rng.integers(10, 100, n)
    diff = rng.normal(size=n)
    res = length_controlled_win_rate(prefs, ml, bl, difficulty=diff)
    delta = ml - bl
    x = np.stack([np.tanh(delta / delta.std(ddof=1)), diff, np.ones(n)], 1)
    w = np.array([res["weights"][k] for k in ("length", "difficulty", "model")])
    p = 1 / (1 + np.exp(-x @ w))
    grad = x.T @ (p - prefs) + np.array([w[0], w[1], 0.0]) / 100.0
    assert np.abs(grad).max() < 1e-8
    x[:, 0] = 0
    assert res["lc_win_rate"] == pytest.approx(float(np.mean(1 / (1 + np.exp(-x @ w)))))
