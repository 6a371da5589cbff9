"""bench.hops: per-hop times from tcpdump's text (pure)."""

from bench.hops import HOPS, medians, parse, summarise

CLIENT, BACKEND = 8443, 8080
GW_TUNNEL, CP_TUNNEL = 9000, 41000


def _line(t: float, src: int, dst: int, size: int = 100) -> str:
    return f"{t:.6f} IP 127.0.0.1.{src} > 127.0.0.1.{dst}: tcp {size}"


def _cycle(t0: float, gaps_us: list[float], wrk: int = 50000, cp_up: int = 42000) -> list[str]:
    """One request: client, gateway -> cp, cp -> backend, backend -> cp, cp -> gateway, gateway -> client."""
    pairs = [(wrk, CLIENT), (GW_TUNNEL, CP_TUNNEL), (cp_up, BACKEND), (BACKEND, cp_up), (CP_TUNNEL, GW_TUNNEL),
             (CLIENT, wrk)]
    lines, t = [], t0
    for i, (src, dst) in enumerate(pairs):
        lines.append(_line(t, src, dst))
        if i < len(gaps_us):
            t += gaps_us[i] / 1e6
    return lines


def test_each_hop_is_the_time_between_consecutive_segments() -> None:
    lines = _cycle(100.0, [200, 180, 50, 120, 210]) + _cycle(100.01, [210, 170, 60, 130, 190])
    hops = parse(lines, CLIENT, BACKEND)
    assert [round(v) for v in hops["gw in"]] == [200, 210]
    assert [round(v) for v in hops["cp in"]] == [180, 170]
    assert [round(v) for v in hops["backend"]] == [50, 60]
    assert [round(v) for v in hops["cp out"]] == [120, 130]
    assert [round(v) for v in hops["gw out"]] == [210, 190]
    assert [round(v) for v in hops["total"]] == [760, 760]
    # from the first response to the second request
    assert [round(v) for v in hops["client"]] == [round((100.01 - 100.0 - 760e-6) * 1e6)]
    assert medians(hops)["gw in"] == 205.0
    assert summarise(hops).startswith("2 request cycles")


def test_broken_cycles_are_skipped_and_the_client_gap_restarts() -> None:
    ping = _line(100.0005, GW_TUNNEL, CP_TUNNEL, 30)  # a tunnel PING inside a request
    broken = _cycle(100.0, [200, 180, 50, 120, 210])
    broken.insert(3, ping)
    whole = _cycle(100.01, [200, 180, 50, 120, 210]) + _cycle(100.02, [200, 180, 50, 120, 210])
    noise = ["tcpdump: verbose output suppressed", "", "1.0 ARP, Request who-has"]
    hops = parse(noise + broken + whole, CLIENT, BACKEND)
    assert len(hops["total"]) == 2
    assert len(hops["client"]) == 1  # only between the two whole cycles
    assert set(HOPS) <= set(hops)


def test_no_cycles_summarises_to_zero() -> None:
    hops = parse([], CLIENT, BACKEND)
    assert summarise(hops) == "0 request cycles"
    assert medians(hops) == {}
