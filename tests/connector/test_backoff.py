from itertools import islice

from connector.backoff import backoff


def test_random_start_then_exponential_capped_with_jitter():
    delays = list(islice(backoff(0.5, 30.0, rand=lambda: 1.0), 10))
    assert delays[0] == 0.5
    assert delays[1:5] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == 30.0 and delays[-1] == 30.0


def test_jitter_keeps_delays_within_half_to_full():
    delays = list(islice(backoff(1.0, 8.0, rand=lambda: 0.0), 6))
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
