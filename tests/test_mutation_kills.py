"""Small hand-computed checks of the number-computing helpers that the mutation benchmark found unguarded."""

from __future__ import annotations

import math

from minima.evaluate import metrics


def test_metric_helpers_equal_hand_computations():
    assert metrics.mean([1.0, 2.0, 6.0]) == 3.0
    assert math.isclose(metrics.token_perplexity(2 * math.log(3), 2), 3.0)
    assert math.isclose(metrics.bits_per_byte(math.log(2) * 8, 4), 2.0)
