"""bench.minimal_hop's forwarder relays GETs over TLS to a keep-alive backend, in order."""

from __future__ import annotations

import asyncio
import ssl

import trustme

from bench import minimal_hop


async def test_the_minimal_hop_relays_keep_alive_gets() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    seen: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            seen.append(head.split(b" ")[1])
            body = b"answer to " + head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    upstream = await asyncio.start_server(backend, "127.0.0.1", 0)
    backend_port = upstream.sockets[0].getsockname()[1]
    with cert.cert_chain_pems[0].tempfile() as cert_file, cert.private_key_pem.tempfile() as key_file:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        server = await asyncio.get_running_loop().create_server(
            lambda: minimal_hop._Client(backend_port), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context,
                                                   server_hostname="127.0.0.1")
    try:
        for path in (b"/one", b"/two", b"/three"):
            writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(len(b"answer to " + path)) == b"answer to " + path
        assert seen == [b"/one", b"/two", b"/three"]
        assert len(minimal_hop.IDLE) == 1  # one upstream connection, kept alive and reused
    finally:
        writer.close()
        server.close()
        upstream.close()
        for idle in minimal_hop.IDLE:
            if idle.transport is not None:
                idle.transport.close()
        minimal_hop.IDLE.clear()
