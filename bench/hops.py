"""Where one request's latency goes, hop by hop, from loopback packet timestamps.

At one keep-alive connection a request through the CMG is a chain of six TCP segments
with data on loopback, each sent when the previous hop is done with it:

    client -> gateway -> (tunnel) -> connection point -> backend -> connection point
           -> (tunnel) -> gateway -> client

The time between two consecutive segments is the work (and wake-up) of the process that
received the first and sent the second: ``gw in`` (the gateway, from the client's request
to its tunnel message), ``cp in`` (the connection point, to the backend request),
``backend``, ``cp out``, ``gw out`` (to the client's response) and ``client`` (the load
generator, from a response to its next request). ``tcpdump`` timestamps each segment in
the kernel, so no process's own clock or sampling is involved.

:func:`parse` and :func:`summarise` are pure (tcpdump's text in, medians out);
:class:`Capture` runs tcpdump.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HOPS = ("gw in", "cp in", "backend", "cp out", "gw out")
#: The segments of one request, by direction: to/from the gateway's client port, to/from
#: the backend's port, and anything else (the tunnel).
_CYCLE = ("request", "tunnel", "backend request", "backend response", "tunnel", "response")
#: Only segments that carry data (no bare ACKs): IP total length minus both headers.
DATA_FILTER = "tcp and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)"


def _port(address: str) -> str:
    return address.rstrip(":").rsplit(".", 1)[1]


def parse(lines: Iterable[str], client_port: int, backend_port: int) -> dict[str, list[float]]:
    """Microseconds per hop for every complete request cycle in ``tcpdump -nn -tt -q``
    output; cycles broken by anything else (a ping on the tunnel, a lost capture) are
    skipped. ``client`` is the generator's time between a response and the next request."""
    gw, be = str(client_port), str(backend_port)
    seen: list[tuple[float, str]] = []
    for line in lines:
        parts = line.split()
        if len(parts) < 5 or parts[1] != "IP":
            continue
        src, dst = _port(parts[2]), _port(parts[4])
        kind = ("request" if dst == gw else "response" if src == gw else
                "backend request" if dst == be else "backend response" if src == be else "tunnel")
        seen.append((float(parts[0]), kind))
    hops: dict[str, list[float]] = {name: [] for name in (*HOPS, "client", "total")}
    last_response: float | None = None
    i = 0
    while i + len(_CYCLE) <= len(seen):
        window = seen[i:i + len(_CYCLE)]
        if tuple(kind for _, kind in window) != _CYCLE:
            i += 1
            last_response = None
            continue
        times = [t for t, _ in window]
        for name, a, b in zip(HOPS, times, times[1:]):
            hops[name].append((b - a) * 1e6)
        if last_response is not None:
            hops["client"].append((times[0] - last_response) * 1e6)
        hops["total"].append((times[-1] - times[0]) * 1e6)
        last_response = times[-1]
        i += len(_CYCLE)
    return hops


def summarise(hops: dict[str, list[float]]) -> str:
    """One line per hop: median and 90th percentile in microseconds."""
    cycles = len(hops.get("total", []))
    out = [f"{cycles} request cycles"]
    for name, values in hops.items():
        if values:
            ordered = sorted(values)
            p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
            out.append(f"  {name:8s} median {statistics.median(values):6.0f} us   p90 {p90:6.0f} us")
    return "\n".join(out)


def medians(hops: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(statistics.median(values), 1) for name, values in hops.items() if values}


@dataclass
class Capture:
    """``tcpdump`` on loopback, data segments only, up to ``packets`` of them."""

    tcpdump: str
    out: Path
    packets: int = 6000

    def start(self) -> Capture:
        self._file = self.out.open("w")
        self._proc = subprocess.Popen(
            [self.tcpdump, "-i", "lo", "-nn", "-tt", "-q", "-l", "-c", str(self.packets), DATA_FILTER],
            stdout=self._file, stderr=subprocess.DEVNULL, start_new_session=True)
        return self

    def stop(self) -> list[str]:
        if self._proc.poll() is None:
            self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._file.close()
        return self.out.read_text().splitlines()
