"""bench.stats: percentiles, medians, ratios."""

from __future__ import annotations

import pytest

from bench.stats import median, percentile, ratio


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 25) == pytest.approx(1.75)


def test_percentile_does_not_depend_on_order() -> None:
    values = list(range(1, 1001))
    shuffled = values[::-1]
    assert percentile(values, 99) == percentile(shuffled, 99) == pytest.approx(990.01)
    assert percentile(values, 99.9) == pytest.approx(999.001)


def test_percentile_of_one_value_and_errors() -> None:
    assert percentile([7.0], 99.9) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_median_skips_missing_values() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([None, 5.0]) == 5.0
    assert median([None, None]) is None
    assert median([]) is None


def test_ratio() -> None:
    assert ratio(50.0, 100.0) == 0.5
    assert ratio(None, 100.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
