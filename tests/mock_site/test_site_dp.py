"""The distribution point: the generated content catalog and Range handling."""

from __future__ import annotations

import hashlib
import time

import pytest

from mock_site.content import (MAX_CONTENT_SIZE, content_bytes, content_sha256, content_size, iter_content,
                               parse_range)

CID, FILE, SIZE = "PS100001.1", "payload-3000000.bin", 3_000_000


def test_catalog_sizes_and_names():
    assert content_size(CID, FILE) == SIZE
    assert content_size(CID, f"payload-{MAX_CONTENT_SIZE}.bin") == MAX_CONTENT_SIZE
    assert content_size(CID, f"payload-{MAX_CONTENT_SIZE + 1}.bin") is None
    assert content_size(CID, "other.bin") is None
    assert content_size("../etc", FILE) is None
    assert content_size(CID, "payload-0.bin") == 0


def test_content_is_deterministic_and_consistent():
    whole = content_bytes(CID, FILE, 0, SIZE)
    assert len(whole) == SIZE
    assert hashlib.sha256(whole).hexdigest() == content_sha256(CID, FILE)
    assert content_bytes(CID, FILE, 12345, 2_500_000) == whole[12345:2_500_000]
    assert b"".join(iter_content(CID, FILE, 7, 1_000_007, chunk_size=1000)) == whole[7:1_000_007]
    assert content_sha256(CID, FILE, 100, 200) == hashlib.sha256(whole[100:200]).hexdigest()
    assert content_bytes(CID, "payload-3000001.bin", 0, 1000) != whole[:1000]  # per-file offset
    with pytest.raises(ValueError):
        content_bytes(CID, FILE, 0, SIZE + 1)


def test_generating_100_mib_is_fast():
    t0 = time.perf_counter()
    n = sum(len(c) for c in iter_content(CID, "payload-104857600.bin", 0, 104857600))
    assert n == 104857600
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("header,expected", [
    ("bytes=0-99", (0, 100)),
    ("bytes=100-", (100, 1000)),
    ("bytes=-10", (990, 1000)),
    ("bytes=-5000", (0, 1000)),
    ("bytes=990-5000", (990, 1000)),
    ("bytes=1000-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=0-1,5-6", None),
    ("bytes=5-2", None),
    ("items=0-1", None),
    ("bytes=a-b", None),
])
def test_parse_range(header, expected):
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("range_header,status,start,end", [
    (None, 200, 0, SIZE),
    ("bytes=0-99", 206, 0, 100),
    ("bytes=2999000-", 206, 2_999_000, SIZE),
    ("bytes=-4096", 206, SIZE - 4096, SIZE),
    ("bytes=1-1", 206, 1, 2),
    ("bytes=0-99999999", 206, 0, SIZE),
    ("bytes=0-9,20-29", 200, 0, SIZE),
    ("bytes=junk", 200, 0, SIZE),
])
async def test_range_matrix(site, http, range_header, status, start, end):
    headers = {"Range": range_header} if range_header else {}
    async with http.get(site.url("dp") + f"/SMS_DP_SMSPKG$/{CID}/{FILE}", headers=headers) as r:
        body = await r.read()
        assert r.status == status
        assert r.headers["Accept-Ranges"] == "bytes"
        if status == 206:
            assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
        else:
            assert "Content-Range" not in r.headers
        assert int(r.headers["Content-Length"]) == end - start
    assert body == content_bytes(CID, FILE, start, end)


async def test_unsatisfiable_head_404_and_case(site, http):
    async with http.get(site.url("dp") + f"/SMS_DP_SMSPKG$/{CID}/{FILE}", headers={"Range": f"bytes={SIZE}-"}) as r:
        assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{SIZE}"
    async with http.head(site.url("dp") + f"/sms_dp_smspkg%24/{CID}/{FILE}", headers={"Range": "bytes=0-9"}) as r:
        assert r.status == 206 and r.headers["Content-Length"] == "10"
        assert await r.read() == b""
    async with http.get(site.url("dp") + f"/SMS_DP_SMSPKG$/{CID}/nothing.bin") as r:
        assert r.status == 404
    async with http.get(site.url("dp") + f"/SMS_DP_SMSPKG$/{CID}") as r:
        assert r.status == 404
    async with http.post(site.url("dp") + f"/SMS_DP_SMSPKG$/{CID}/{FILE}") as r:
        assert r.status == 405


async def test_large_download_streams(site, http):
    file = "payload-67108864.bin"
    h = hashlib.sha256()
    async with http.get(site.url("dp") + f"/SMS_DP_SMSPKG$/{CID}/{file}") as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == content_sha256(CID, file)
