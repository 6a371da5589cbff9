"""Bodies stream through the CMG: many at once, 100 MiB each way, memory bounded."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import uuid

import aiohttp
import psutil
import pytest

from mock_site.content import content_sha256, content_size

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BIG = 100 * MiB
# What a 100 MiB transfer may add to a gateway or connection point process at its peak.
# Windows are 1 MiB per stream and 8 MiB per tunnel; everything above that is buffering
# the design forbids.
RSS_GROWTH_BOUND = 48 * MiB


class PeakRSS:
    """Samples the RSS of the stack's gateway and connector processes in a thread."""

    def __init__(self, dep, kinds=("gateway", "connector")) -> None:
        self.procs = {p.name: psutil.Process(p.pid) for p in dep.stack.processes if p.kind in kinds}
        self.base = {n: p.memory_info().rss for n, p in self.procs.items()}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for n, p in self.procs.items():
                self.peak[n] = max(self.peak[n], p.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self) -> dict[str, int]:
        return {n: self.peak[n] - self.base[n] for n in self.procs}


async def test_64_concurrent_requests_over_one_tunnel(single):
    dp = single.role("DP")["role_id"]
    size = 256 * 1024
    expected = content_sha256("Content_0001.1", f"payload-{size}.bin")

    async def one(s: aiohttp.ClientSession, i: int) -> str:
        path = f"/CCM_Proxy_MutualAuth/{dp}/SMS_DP_SMSPKG$/Content_0001.1/payload-{size}.bin"
        async with await single.request(s, "GET", path) as r:
            assert r.status == 200, (i, r.status, r.reason)
            return hashlib.sha256(await r.read()).hexdigest()

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        hashes = await asyncio.gather(*(one(s, i) for i in range(64)))
    assert hashes == [expected] * 64
    # one tunnel carried them all
    assert len(single.data["processes"]) == 3


async def test_100_mib_download_is_byte_identical_and_memory_bounded(single):
    dp = single.role("DP")["role_id"]
    name = f"payload-{BIG}.bin"
    assert content_size("Content_0002.1", name) == BIG
    digest = hashlib.sha256()
    got = 0
    with PeakRSS(single) as rss:
        async with aiohttp.ClientSession() as s:
            async with await single.request(
                    s, "GET", f"/CCM_Proxy_MutualAuth/{dp}/SMS_DP_SMSPKG$/Content_0002.1/{name}") as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                    got += len(chunk)
    assert got == BIG
    assert digest.hexdigest() == content_sha256("Content_0002.1", name)
    for proc, growth in rss.growth().items():
        assert growth < RSS_GROWTH_BOUND, f"{proc} grew by {growth / MiB:.1f} MiB"


async def test_100_mib_upload_arrives_byte_identical_and_memory_bounded(single):
    mp = single.role("MP")
    job = "{" + str(uuid.uuid4()).upper() + "}"
    path = single.mp_path(f"CCM_Incoming/{job}")
    block = os.urandom(MiB)
    sent = hashlib.sha256()

    async def body():
        for i in range(BIG // MiB):
            chunk = block[i % 7:] + block[:i % 7]
            sent.update(chunk)
            yield chunk

    bits = {"BITS-Supported-Protocols": "{7df0354d-249b-430f-820d-3d2a9bef4931}"}
    with PeakRSS(single) as rss:
        async with aiohttp.ClientSession() as s:
            async with await single.request(s, "BITS_POST", path, headers={
                    **bits, "BITS-Packet-Type": "Create-Session"}) as r:
                assert r.status == 200, await r.text()
                session_id = r.headers["BITS-Session-Id"]
            async with await single.request(s, "BITS_POST", path, data=body(), headers={
                    "BITS-Packet-Type": "Fragment", "BITS-Session-Id": session_id,
                    "Content-Range": f"bytes 0-{BIG - 1}/{BIG}", "Content-Length": str(BIG)}) as r:
                assert r.status == 200, await r.text()
            async with await single.request(s, "BITS_POST", path, headers={
                    "BITS-Packet-Type": "Close-Session", "BITS-Session-Id": session_id}) as r:
                assert r.status == 200, await r.text()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{mp['internal_url']}/_mock/uploads/{job}") as r:
            report = await r.json()
    assert report["size"] == BIG and report["complete"] is True
    assert report["sha256"] == sent.hexdigest()
    for proc, growth in rss.growth().items():
        assert growth < RSS_GROWTH_BOUND, f"{proc} grew by {growth / MiB:.1f} MiB"
