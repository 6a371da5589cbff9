"""The gateway's response heads are the ones aiohttp's web.Response and web.StreamResponse
write for the same answer (the gateway served through aiohttp until its own HTTP/1.1
layer, gateway/http1.py, replaced it)."""

import asyncio
import logging

import pytest
from aiohttp import web

from gateway.http1 import GatewayServer, StreamedResponse, WholeResponse

RELAYED_DATE = b"Sat, 28 Nov 2026 04:00:00 GMT"
CASES = {
    "1.1 keep-alive": b"GET /x HTTP/1.1\r\nHost: cmg\r\n\r\n",
    "1.1 close": b"GET /x HTTP/1.1\r\nHost: cmg\r\nConnection: close\r\n\r\n",
    "1.0": b"GET /x HTTP/1.0\r\nHost: cmg\r\n\r\n",
    "1.0 keep-alive": b"GET /x HTTP/1.0\r\nHost: cmg\r\nConnection: keep-alive\r\n\r\n",
}
ANSWERS = {
    "plain": (200, "OK", [(b"X-Answer", b"42")], b"hello"),
    "typed, own server and date": (
        201, "Created",
        [(b"content-type", b"text/xml"), (b"Server", b"Microsoft-IIS/10.0"),
         (b"Date", RELAYED_DATE), (b"X-Two", b"a"), (b"X-Two", b"b")],
        b"<a/>"),
    "empty": (200, "OK", [], b""),
    "odd reason": (404, "Not Found Here", [(b"X-Empty", b"")], b"nope"),
}


async def _raw_answer(factory: object, request: bytes) -> tuple[list[bytes], bytes]:
    """The head's lines (a clock Date as ``Date: *``) and everything after the head."""
    listener = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head[:-4].split(b"\r\n")
        length = [int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")]
        if request.startswith(b"HEAD") or lines[0].split()[1] in (b"204", b"304"):
            rest = b""
        elif length:
            rest = await asyncio.wait_for(reader.readexactly(length[0]), 5)
        elif any(line.lower() == b"transfer-encoding: chunked" for line in lines):
            rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        else:  # to the close (aiohttp 3.14 keeps an HTTP/1.0 connection open after such a body: 2 s)
            rest = b""
            try:
                while piece := await asyncio.wait_for(reader.read(65536), 2):
                    rest += piece
            except TimeoutError:
                pass
    finally:
        writer.close()
        listener.close()
        shutdown = getattr(factory, "shutdown")
        await shutdown(1.0)
        await listener.wait_closed()
    relayed = b"Date: " + RELAYED_DATE
    return [b"Date: *" if line.startswith(b"Date: ") and line != relayed else line for line in lines], rest


def _ours(handler: object) -> GatewayServer:
    return GatewayServer(handler, log=logging.getLogger("test.gateway"))  # type: ignore[arg-type]


def _theirs(handler: object) -> web.Server:
    return web.Server(handler, access_log=None)  # type: ignore[arg-type]


def _same(ours: list[bytes], theirs: list[bytes], relayed: list[tuple[bytes, bytes]]) -> None:
    assert ours[0] == theirs[0]  # the status line
    assert sorted(ours[1:]) == sorted(theirs[1:])
    names = [k for k, _ in relayed]
    assert [line.split(b":")[0] for line in ours[1:] if line.split(b":")[0] in names] == names  # in order


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("answer", list(ANSWERS))
async def test_a_whole_response_is_what_web_response_writes(case: str, answer: str) -> None:
    status, reason, headers, body = ANSWERS[answer]

    async def whole(request: object) -> WholeResponse:
        return WholeResponse(status, reason, list(headers), body)

    async def aiohttps(request: web.BaseRequest) -> web.StreamResponse:
        relayed = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        return web.Response(status=status, reason=reason, headers=relayed, body=body)  # type: ignore[arg-type]

    ours, our_body = await _raw_answer(_ours(whole), CASES[case])
    theirs, their_body = await _raw_answer(_theirs(aiohttps), CASES[case])
    assert our_body == their_body == body
    _same(ours, theirs, headers)


STREAMED = {
    "with a length": (200, "OK", [(b"Content-Type", b"application/octet-stream"), (b"Content-Length", b"10")]),
    "without a length": (200, "OK", [(b"X-Answer", b"42")]),
    "no content": (204, "No Content", [(b"X-Answer", b"42")]),
    "not modified": (304, "Not Modified", [(b"ETag", b'"abc"')]),
}
PIECES = [b"01234", b"56789"]


@pytest.mark.parametrize("case", [*CASES, "HEAD 1.1"])
@pytest.mark.parametrize("answer", list(STREAMED))
async def test_a_streamed_response_is_what_web_streamresponse_writes(case: str, answer: str) -> None:
    status, reason, headers = STREAMED[answer]
    request = b"HEAD /x HTTP/1.1\r\nHost: cmg\r\n\r\n" if case == "HEAD 1.1" else CASES[case]
    body_allowed = status not in (204, 304) and case != "HEAD 1.1"

    async def streamed(request: object) -> StreamedResponse:
        resp = StreamedResponse(status, reason, list(headers))
        await resp.prepare(request)  # type: ignore[arg-type]
        if body_allowed:
            for piece in PIECES:
                await resp.write(piece)
        await resp.write_eof()
        return resp

    async def aiohttps(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, reason=reason)
        for k, v in headers:
            resp.headers.add(k.decode("latin-1"), v.decode("latin-1"))
        await resp.prepare(request)
        if body_allowed:
            for piece in PIECES:
                await resp.write(piece)
        await resp.write_eof()
        return resp

    ours, our_rest = await _raw_answer(_ours(streamed), request)
    theirs, their_rest = await _raw_answer(_theirs(aiohttps), request)
    assert our_rest == their_rest
    if body_allowed:
        assert our_rest.replace(b"5\r\n", b"").replace(b"\r\n", b"").rstrip(b"0") == b"0123456789"
    _same(ours, theirs, headers)


@pytest.mark.parametrize("pieces", [[b"0123456789", b"x"], [b"01234"]], ids=["longer", "shorter"])
async def test_a_streamed_body_longer_or_shorter_than_its_length_is_cut_off(pieces: list[bytes]) -> None:
    """Never passed on as complete: the connection is cut, with no byte past the length."""
    async def streamed(request: object) -> StreamedResponse:
        resp = StreamedResponse(200, "OK", [(b"Content-Length", b"10")])
        await resp.prepare(request)  # type: ignore[arg-type]
        for piece in pieces:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    server = _ours(streamed)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
    try:
        writer.write(CASES["1.1 keep-alive"])
        answer = await asyncio.wait_for(reader.read(), 5)  # to the cut
    finally:
        writer.close()
        listener.close()
        await server.shutdown(1.0)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body == b"".join(pieces)[:10] and len(body) <= 10
