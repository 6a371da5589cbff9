"""Issue 5: a stream the gateway abandons must be reset, or its answer waits forever.

Over the in-memory websocket pair: the connection point answers with more than one
stream window, so its handler needs the gateway to read (and credit back) the answer.
A stream nobody on the gateway side will ever read must therefore be reset, or the
handler waits for credit forever and the stream stays open on both ends."""

from __future__ import annotations

import asyncio

import pytest
from tunnel_helpers import ROLES, memory_pair

from tunnel import ErrorCode, Limits, Role, StreamResetError, TunnelProtocol, TunnelSession, TunnelStream
from tunnel.session import FLUSH_AHEAD

pytestmark = pytest.mark.usefixtures("websocket_kind")
WINDOW = 64 * 1024
LIMITS = Limits(stream_window=WINDOW, tunnel_window=16 * FLUSH_AHEAD)


async def _pair(handler):
    gateway_ws, connector_ws = memory_pair()
    # The gateway's websocket sends only while ``gate`` is set: a test can hold the
    # session's writer in the middle of a flush (a slow or congested tunnel).
    gate = gateway_ws.gate
    gateway = TunnelSession(TunnelProtocol(Role.GATEWAY, LIMITS), gateway_ws, name="gw")
    connector = TunnelSession(TunnelProtocol(Role.CONNECTOR, LIMITS), connector_ws, on_request=handler, name="cp")
    tasks = [asyncio.create_task(gateway.run()), asyncio.create_task(connector.run())]
    connector.send_hello("ABC", "cp1.contoso.local", ROLES)
    await gateway.wait_hello()
    gateway.send_welcome("instance-0")
    await asyncio.wait_for(asyncio.gather(gateway.wait_handshake(), connector.wait_handshake()), 5)
    return gateway, connector, tasks, gate


async def test_open_stream_cancelled_during_its_flush_resets_the_stream() -> None:
    """open_stream() waits for the writer when more than FLUSH_AHEAD bytes are queued (a
    busy tunnel). Its request head is queued before that wait, so it goes out even when
    the caller is cancelled there (a client that went away). The caller never gets the
    stream; the session must reset it."""
    outcome: list[str] = []

    async def big_answer(stream: TunnelStream) -> None:
        assert stream.request is not None
        if stream.request.target == "/sink":
            while await stream.read():
                pass
            await stream.send_response(204, "No Content", [], end_stream=True)
            return
        try:
            await stream.send_response(200, "OK", [], body=b"x" * (4 * WINDOW))
            await stream.end()
            outcome.append("answered")
        except StreamResetError as exc:
            outcome.append(exc.code.name)
            raise

    gateway, connector, tasks, gate = await _pair(big_answer)
    try:
        gate.clear()  # the writer now holds what it took; the rest stays queued
        sinks = [await gateway.open_stream("POST", "/sink", []) for _ in range(FLUSH_AHEAD // WINDOW + 2)]
        fillers = [asyncio.create_task(sink.write(b"f" * WINDOW)) for sink in sinks]
        await asyncio.sleep(0.05)
        assert gateway.protocol.pending_output >= FLUSH_AHEAD
        opening = asyncio.create_task(gateway.open_stream("GET", "/big", [], end_stream=True))
        await asyncio.sleep(0.05)  # its head is queued; open_stream() waits for the writer
        assert not opening.done()
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        gate.set()  # the head goes out after all
        await asyncio.wait_for(asyncio.gather(*fillers), 5)
        for sink in sinks:
            await sink.end()
        for _ in range(200):
            if outcome and gateway.open_streams == 0 and connector.open_streams == 0:
                break
            await asyncio.sleep(0.01)
        assert outcome == [ErrorCode.CANCEL.name], f"the connection point's handler: {outcome or 'still waiting'}"
        assert gateway.open_streams == 0 and connector.open_streams == 0
        # The tunnel's credit is whole again: a full answer still gets through.
        stream = await gateway.open_stream("GET", "/big", [], end_stream=True)
        await asyncio.wait_for(stream.response(), 5)
        body = bytearray()
        while chunk := await asyncio.wait_for(stream.read(), 5):
            body += chunk
        assert len(body) == 4 * WINDOW
    finally:
        await gateway.close()
        await connector.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
