"""BITS uploads to /CCM_Incoming: the protocol, streaming, refusals and rollbacks."""

from __future__ import annotations

import gc
import hashlib
import os

import psutil

from mock_site.bits import BITS_PROTOCOL

NAME = "{5F8D3A1C-0B2E-4C6D-8E9F-A1B2C3D4E5F6}"


async def bits(http, site, packet, *, name=NAME, session=None, data=None, headers=None):
    h = {"BITS-Packet-Type": packet, **(headers or {})}
    if session:
        h["BITS-Session-Id"] = session
    if data is None:
        h["Content-Length"] = "0"
    async with http.request("BITS_POST", site.url("mp") + f"/CCM_Incoming/{name}", data=data, headers=h) as r:
        await r.read()
        return r.status, r.headers


async def create(http, site, name=NAME):
    status, headers = await bits(http, site, "Create-Session", name=name,
                                 headers={"BITS-Supported-Protocols": BITS_PROTOCOL})
    assert status == 200 and headers["BITS-Packet-Type"] == "Ack"
    assert headers["BITS-Protocol"] == BITS_PROTOCOL
    return headers["BITS-Session-Id"]


async def fragment(http, site, sid, data, first, total, name=NAME, content_length=None):
    last = first + (content_length if content_length is not None else len(data)) - 1
    headers = {"Content-Range": f"bytes {first}-{last}/{total}"}
    return await bits(http, site, "Fragment", name=name, session=sid, data=data, headers=headers)


async def upload_info(http, site, name=NAME):
    async with http.get(site.url("mp") + f"/_mock/uploads/{name}") as r:
        return r.status, (await r.json() if r.status == 200 else None)


async def test_ping_create_fragments_close(site, http):
    status, headers = await bits(http, site, "Ping")
    assert status == 200 and headers["BITS-Packet-Type"] == "Ack"
    sid = await create(http, site)
    payload = os.urandom(300_000)
    ident = {"X-CMG-Client-Certificate-Thumbprint": "AB" * 20, "X-CMG-Client-Certificate-Subject": "CN=CLIENT01"}
    for first in range(0, len(payload), 100_000):
        status, headers = await bits(http, site, "Fragment", session=sid, data=payload[first:first + 100_000],
                                     headers={"Content-Range": f"bytes {first}-{first + 99_999}/{len(payload)}", **ident})
        assert status == 200
        assert headers["BITS-Received-Content-Range"] == str(first + 100_000)
        assert headers["BITS-Session-Id"] == sid
    status, headers = await bits(http, site, "Close-Session", session=sid)
    assert status == 200 and headers["BITS-Session-Id"] == sid
    status, info = await upload_info(http, site)
    assert info["complete"] is True and info["size"] == len(payload)
    assert info["sha256"] == hashlib.sha256(payload).hexdigest()
    assert info["identity"] == ident
    stored = site.ctx.config.data_dir / "incoming" / NAME
    assert stored.read_bytes() == payload
    async with http.get(site.url("mp") + "/_mock/uploads") as r:
        assert [u["name"] for u in await r.json()] == [NAME]
    assert "committed" in (site.ctx.config.logs_dir / "MP_Relay.log").read_text()


async def test_100_mib_fragment_is_streamed_not_buffered(site, http):
    size = 100 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    expected = hashlib.sha256()
    for _ in range(100):
        expected.update(block)

    async def body():
        for _ in range(100):
            yield block

    sid = await create(http, site)
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    status, headers = await bits(http, site, "Fragment", session=sid, data=body(),
                                 headers={"Content-Range": f"bytes 0-{size - 1}/{size}", "Content-Length": str(size)})
    rss_after = psutil.Process().memory_info().rss
    assert status == 200 and headers["BITS-Received-Content-Range"] == str(size)
    assert rss_after - rss_before < 40 * 1024 * 1024, f"RSS grew by {(rss_after - rss_before) >> 20} MiB"
    status, _ = await bits(http, site, "Close-Session", session=sid)
    assert status == 200
    _, info = await upload_info(http, site)
    assert info == {**info, "complete": True, "size": size, "sha256": expected.hexdigest()}
    assert (site.ctx.config.data_dir / "incoming" / NAME).stat().st_size == size


async def test_short_fragment_is_refused_and_not_committed(site, http):
    sid = await create(http, site)
    # The range says 1000 bytes, the body has 600 (Content-Length says so up front).
    status, headers = await fragment(http, site, sid, b"x" * 600, 0, 1000, content_length=1000)
    assert status == 400 and headers["BITS-Error-Code"] == "0x80070026"
    assert headers["BITS-Received-Content-Range"] == "0"
    # A chunked body that ends early is refused and rolled back too.
    async def short():
        yield b"y" * 600
    status, headers = await fragment(http, site, sid, short(), 0, 1000, content_length=1000)
    assert status == 400 and headers["BITS-Error-Code"] == "0x80070026"
    status, headers = await bits(http, site, "Close-Session", session=sid)
    assert status == 400 and headers["BITS-Error-Code"] == "0x8007139F"
    _, info = await upload_info(http, site)
    assert info["complete"] is False and info["size"] == 0
    assert not (site.ctx.config.data_dir / "incoming" / NAME).exists()


async def test_gap_is_refused_with_resume_point_and_retransmission_is_accepted(site, http):
    sid = await create(http, site)
    payload = os.urandom(3000)
    assert (await fragment(http, site, sid, payload[:1000], 0, 3000))[0] == 200
    status, headers = await fragment(http, site, sid, payload[2000:], 2000, 3000)  # gap: 1000-1999 missing
    assert status == 416 and headers["BITS-Received-Content-Range"] == "1000"
    assert "BITS-Error-Code" in headers
    # overlapping retransmission (500-1999): the known bytes are skipped
    status, headers = await fragment(http, site, sid, payload[500:2000], 500, 3000)
    assert status == 200 and headers["BITS-Received-Content-Range"] == "2000"
    # a fragment wholly received already is acknowledged as is
    status, headers = await fragment(http, site, sid, payload[:1000], 0, 3000)
    assert status == 200 and headers["BITS-Received-Content-Range"] == "2000"
    assert (await fragment(http, site, sid, payload[2000:], 2000, 3000))[0] == 200
    assert (await bits(http, site, "Close-Session", session=sid))[0] == 200
    _, info = await upload_info(http, site)
    assert info["complete"] and info["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_longer_body_and_bad_ranges_are_refused(site, http):
    sid = await create(http, site)
    status, headers = await fragment(http, site, sid, b"z" * 20, 0, 100, content_length=10)
    assert status == 400 and headers["BITS-Error-Code"] == "0x80070057"
    status, _ = await bits(http, site, "Fragment", session=sid, data=b"abc", headers={"Content-Range": "bytes 5-2/10"})
    assert status == 400
    status, _ = await bits(http, site, "Fragment", session=sid, data=b"abc")
    assert status == 400
    assert (await fragment(http, site, sid, b"abc", 0, 10))[0] == 200
    status, headers = await fragment(http, site, sid, b"abc", 3, 11)  # total changed
    assert status == 400 and headers["BITS-Error-Code"] == "0x80070057"


async def test_cancel_unknown_session_bad_name_and_protocol(site, http):
    sid = await create(http, site)
    assert (await fragment(http, site, sid, b"abc", 0, 10))[0] == 200
    status, _ = await bits(http, site, "Cancel-Session", session=sid)
    assert status == 200
    assert (await upload_info(http, site))[0] == 404
    status, headers = await bits(http, site, "Fragment", session=sid, data=b"abc",
                                 headers={"Content-Range": "bytes 0-2/10"})
    assert status == 400 and headers["BITS-Error-Code"] == "0x80070490"
    status, _ = await bits(http, site, "Create-Session", name="..evil", headers={"BITS-Supported-Protocols": BITS_PROTOCOL})
    assert status == 400
    status, headers = await bits(http, site, "Create-Session", headers={"BITS-Supported-Protocols": "{00000000-0000-0000-0000-000000000000}"})
    assert status == 400 and "BITS-Error-Code" in headers
    status, _ = await bits(http, site, "Bogus")
    assert status == 400
    assert not list((site.ctx.config.data_dir / "incoming").glob("*.part"))
