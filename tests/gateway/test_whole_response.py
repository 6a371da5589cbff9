"""WholeResponse writes the head aiohttp's web.Response writes for the same answer."""

import asyncio
import logging

import pytest
from aiohttp import web

from gateway.http_server import GatewayServer
from gateway.proxy import WholeResponse

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


async def _raw_answer(handler: web.RequestHandler, request: bytes) -> tuple[list[bytes], bytes]:
    server = GatewayServer(handler, header_timeout=15.0, log=logging.getLogger("test.gateway"), access_log=None)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
    finally:
        writer.close()
        listener.close()
        await server.shutdown(1.0)
        await listener.wait_closed()
    # Date is the clock's (unless relayed): compare that there is one, not its value.
    relayed = b"Date: " + RELAYED_DATE
    return [b"Date: *" if line.startswith(b"Date: ") and line != relayed else line for line in lines], body


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("answer", list(ANSWERS))
async def test_the_head_and_body_are_web_responses(case: str, answer: str) -> None:
    status, reason, headers, body = ANSWERS[answer]

    async def whole(request: web.BaseRequest) -> web.StreamResponse:
        return WholeResponse(status, reason, list(headers), body)  # type: ignore[return-value]

    async def aiohttps(request: web.BaseRequest) -> web.StreamResponse:
        relayed = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        return web.Response(status=status, reason=reason, headers=relayed, body=body)  # type: ignore[arg-type]

    ours, our_body = await _raw_answer(whole, CASES[case])
    theirs, their_body = await _raw_answer(aiohttps, CASES[case])
    assert our_body == their_body == body
    assert ours[0] == theirs[0]  # the status line
    assert sorted(ours[1:]) == sorted(theirs[1:])
    # relayed headers keep their order
    relayed = [k for k, _ in headers]
    assert [line.split(b":")[0] for line in ours[1:] if line.split(b":")[0] in relayed] == relayed
