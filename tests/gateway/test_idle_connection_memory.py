"""What an idle keep-alive client connection keeps of the request it last carried."""

import asyncio
import gc
import logging
import weakref

from gateway.http1 import ClientRequest, GatewayServer, WholeResponse


class _Body(bytearray):
    """A body that can be weakly referenced (bytes and bytearray cannot)."""


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: cmg.example\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return await reader.readexactly(length)


async def test_an_idle_keep_alive_connection_keeps_nothing_of_its_last_request() -> None:
    seen: list[weakref.ref[object]] = []
    bodies: list[weakref.ref[object]] = []

    async def handler(request: ClientRequest) -> WholeResponse:
        seen.append(weakref.ref(request))
        body = _Body(b"x" * 4096)
        bodies.append(weakref.ref(body))
        resp = WholeResponse(200, "OK", [(b"X-Answer", request.path.encode())], body)  # type: ignore[arg-type]
        seen.append(weakref.ref(resp))
        return resp

    server = GatewayServer(handler, header_timeout=15.0, log=logging.getLogger("test.gateway"))
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for n in range(2):
            assert await _exchange(reader, writer, f"/r{n}") == b"x" * 4096
            await asyncio.sleep(0.05)  # the connection loop is back waiting for the next request
            gc.collect()
            # The connection is open and idle: the request, the response and its body are gone.
            assert [ref() for ref in seen] == [None] * len(seen)
            assert [ref() for ref in bodies] == [None] * len(bodies)
        assert len(server.connections) == 1
    finally:
        writer.close()
        listener.close()
        await server.shutdown(1.0)
        await listener.wait_closed()
