"""Reconnect delays: random start, exponential, capped, with jitter (pure)."""

from __future__ import annotations

import random
from typing import Callable, Iterator


def backoff(minimum: float, maximum: float, factor: float = 2.0,
            rand: Callable[[], float] = random.random) -> Iterator[float]:
    """Delays before each reconnect attempt.

    The first is random in [0, minimum] so that many connection points restarted
    together do not reconnect in step; then minimum·factor^n, capped at maximum, each
    scaled by a random factor in [0.5, 1.0] ("equal jitter"). Never ends.
    """
    yield minimum * rand()
    delay = minimum
    while True:
        yield delay * (0.5 + rand() / 2)
        delay = min(delay * factor, maximum)
