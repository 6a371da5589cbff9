"""TunnelSession: two sessions over an in-memory websocket pair, and over real websockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tunnel import (
    SUBPROTOCOL,
    DrainingError,
    ErrorCode,
    Frame,
    FrameType,
    Limits,
    Role,
    StreamClosedError,
    StreamResetError,
    TunnelClosedError,
    TunnelProtocol,
    TunnelSession,
    TunnelStream,
    VersionMismatch,
    negotiate,
)
from tunnel.frames import decode_close, parse_frame
from tunnel.session import SEND_EARLY
from tunnel.ws import DirectClientConnection, DirectServerConnection

from tunnel_helpers import ROLES, DirectMemoryWebSocket, MemoryWebSocket, memory_pair

MiB = 1 << 20
# Every test both ways: the session's writer task sends, or (tunnel.ws) the end of each turn.
pytestmark = pytest.mark.usefixtures("websocket_kind")
Handler = Callable[[TunnelStream], Awaitable[None]]


async def echo(stream: TunnelStream) -> None:
    assert stream.request is not None
    await stream.send_response(200, "OK", [(b"Content-Type", b"application/octet-stream")])
    while chunk := await stream.read():
        await stream.write(chunk)
    await stream.end()


async def read_all(stream: TunnelStream) -> bytes:
    body = bytearray()
    while chunk := await stream.read():
        body += chunk
    return bytes(body)


async def write_in_chunks(stream: TunnelStream, payload: bytes, size: int = 100_000) -> None:
    for offset in range(0, len(payload), size):
        await stream.write(payload[offset : offset + size])
    await stream.end()


async def exchange(gateway: TunnelSession, target: str, payload: bytes) -> bytes:
    stream = await gateway.open_stream("POST", target, [(b"Content-Length", str(len(payload)).encode())])
    _, body = await asyncio.gather(write_in_chunks(stream, payload), _response_body(stream))
    return body


async def _response_body(stream: TunnelStream) -> bytes:
    response = await stream.response()
    assert response.status == 200
    return await read_all(stream)


class Pair:
    def __init__(self, gateway: TunnelSession, connector: TunnelSession, tasks: list[asyncio.Task[None]]) -> None:
        self.gateway, self.connector, self.tasks = gateway, connector, tasks


@contextlib.asynccontextmanager
async def session_pair(
    on_request: Handler = echo, limits: Limits = Limits(), inbox: int = 64, **session_kwargs: float
) -> AsyncIterator[Pair]:
    gateway_ws, connector_ws = memory_pair(inbox)
    gateway = TunnelSession(TunnelProtocol(Role.GATEWAY, limits), gateway_ws, name="gw", **session_kwargs)
    connector = TunnelSession(
        TunnelProtocol(Role.CONNECTOR, limits), connector_ws, on_request=on_request, name="cp", **session_kwargs
    )
    tasks = [asyncio.create_task(gateway.run()), asyncio.create_task(connector.run())]
    connector.send_hello("ABC", "cp1.contoso.local", ROLES)
    hello = await gateway.wait_hello()
    assert hello.site_code == "ABC" and hello.roles == ROLES
    gateway.send_welcome("instance-0")
    await asyncio.wait_for(asyncio.gather(gateway.wait_handshake(), connector.wait_handshake()), 5)
    assert connector.welcome is not None and connector.welcome.instance == "instance-0"
    try:
        yield Pair(gateway, connector, tasks)
    finally:
        await gateway.close()
        await connector.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)  # run() never raises


async def test_request_response_round_trip() -> None:
    async with session_pair() as pair:
        assert await exchange(pair.gateway, "/echo", b"hello tunnel") == b"hello tunnel"
        assert await exchange(pair.gateway, "/echo", b"") == b""
        assert pair.gateway.open_streams == 0
        assert pair.connector.open_streams == 0


async def test_64_concurrent_streams_echo_1mib_each() -> None:
    payload = os.urandom(MiB)
    async with session_pair() as pair:

        async def one(i: int) -> None:
            mine = payload[i:] + payload[:i]
            assert await exchange(pair.gateway, f"/echo/{i}", mine) == mine

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 60)
        assert pair.gateway.open_streams == pair.connector.open_streams == 0


async def test_a_websocket_that_takes_little_ahead_keeps_every_byte_in_order(websocket_kind: str) -> None:
    """Each end's websocket holds at most 2 messages the peer has not read. Over send_now
    (tunnel.ws) that often declines a message: it and everything after it go through the
    writer task's send(), which waits; nothing is lost, duplicated or reordered."""
    payload = os.urandom(256 * 1024)
    async with session_pair(inbox=2) as pair:
        ws = pair.gateway.websocket
        calls = {"declined": 0, "sent later": 0}
        if websocket_kind == "send-now":
            assert isinstance(ws, DirectMemoryWebSocket)
            send_now, send = ws.send_now, ws.send

            def counting_send_now(message: bytes) -> bool:
                taken = send_now(message)
                calls["declined"] += not taken
                return taken

            async def counting_send(message: bytes) -> None:
                calls["sent later"] += 1
                await send(message)

            # The session looked send_now up when it started: patch the class's view of it.
            pair.gateway._send_now = counting_send_now
            ws.send = counting_send  # type: ignore[method-assign]

        async def one(i: int) -> None:
            mine = payload[i:] + payload[:i]
            assert await exchange(pair.gateway, f"/echo/{i}", mine) == mine

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), 60)
        if websocket_kind == "send-now":
            assert calls["declined"] > 0 and calls["sent later"] > 0


async def test_nothing_overtakes_a_message_send_now_declined(websocket_kind: str) -> None:
    """Once send_now declined a message, it and what follows belong to the writer task:
    frames queued before the writer ran go after it, never through send_now ahead of it."""
    if websocket_kind != "send-now":
        pytest.skip("only the send_now path hands a backlog to the writer")
    async with session_pair() as pair:
        gateway = pair.gateway
        order: list[str] = []
        ws = gateway.websocket
        assert isinstance(ws, DirectMemoryWebSocket)
        send = ws.send
        declined = [False]

        def send_now(message: bytes) -> bool:
            if not declined[0]:
                declined[0] = True
                return False  # the transport paused
            order.append("send_now")
            return ws.send_now(message)

        async def writer_send(message: bytes) -> None:
            order.append("writer")
            await send(message)

        gateway._send_now = send_now
        ws.send = writer_send  # type: ignore[method-assign]
        gateway.protocol.ping()
        gateway._send_queued()  # declined: the ping is the writer's backlog
        gateway.protocol.ping()
        gateway._send_queued()  # before the writer task ran: must not go ahead of it
        for _ in range(100):
            if len(order) >= 2:
                break
            await asyncio.sleep(0.01)
        assert order[:2] == ["writer", "writer"]


async def test_an_ended_stream_alone_in_flight_is_sent_before_the_handler_goes_on(websocket_kind: str) -> None:
    """Over send_now, a response that ends a stream with no other stream in flight is
    handed to the websocket before send_response() returns (the handler's bookkeeping
    after it is then off the request's path); with another stream in flight it waits
    for the end of the turn, to be coalesced. Through the writer task, never at once."""
    at_once: dict[str, bool] = {}
    release = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        assert stream.request is not None
        target = stream.request.target
        if target == "/held":  # stays in flight until released
            await release.wait()
        ws = stream._session.websocket
        assert isinstance(ws, MemoryWebSocket)
        before = ws.sent_messages
        await stream.send_response(200, "OK", [], end_stream=True, body=b"answer")
        at_once[target] = ws.sent_messages > before

    async with session_pair(handler) as pair:
        first = await pair.gateway.open_stream("GET", "/alone", [], end_stream=True)
        assert (await asyncio.wait_for(first.response(), 5)).status == 200
        held = await pair.gateway.open_stream("GET", "/held", [], end_stream=True)
        await asyncio.sleep(0.05)
        second = await pair.gateway.open_stream("GET", "/with-another", [], end_stream=True)
        assert (await asyncio.wait_for(second.response(), 5)).status == 200
        release.set()
        assert (await asyncio.wait_for(held.response(), 5)).status == 200
    direct = websocket_kind == "send-now"
    assert at_once == {"/alone": direct, "/with-another": False, "/held": direct}


async def test_a_turn_that_queues_much_sends_before_its_end(websocket_kind: str) -> None:
    """Over send_now, what one turn queues goes out as soon as SEND_EARLY bytes are
    waiting, not only at the end of the turn: the peer starts on the first requests while
    this end queues the rest. Through the writer task, everything waits for its turn."""
    async def handler(stream: TunnelStream) -> None:
        await stream.send_response(200, "OK", [], end_stream=True)

    async with session_pair(handler) as pair:
        gateway = pair.gateway
        ws = gateway.websocket
        assert isinstance(ws, MemoryWebSocket)
        padding = [(b"x-padding", b"p" * 900)]
        per_head = len(b"x-padding") + 900
        count = 3 * SEND_EARLY // per_head
        before = ws.sent_messages
        opened = [asyncio.ensure_future(gateway.open_stream("GET", f"/r{i}", padding, end_stream=True))
                  for i in range(count)]
        # One turn runs every open_stream up to its flush; none has been awaited yet.
        await asyncio.sleep(0)
        sent_within_the_turn = ws.sent_messages - before
        streams = await asyncio.gather(*opened)
        for stream in streams:
            assert (await asyncio.wait_for(stream.response(), 5)).status == 200
    if websocket_kind == "send-now":
        # The first head went alone (no other stream in flight yet); then one message
        # per SEND_EARLY bytes, about three.
        assert sent_within_the_turn >= 3
    else:
        assert sent_within_the_turn == 0


async def test_slow_reader_does_not_stall_another_stream() -> None:
    limits = Limits(stream_window=64 * 1024, tunnel_window=256 * 1024, max_frame_size=16 * 1024)
    big = os.urandom(MiB)

    async def handler(stream: TunnelStream) -> None:
        assert stream.request is not None
        if stream.request.target == "/download":
            await stream.send_response(200, "OK", [])
            await stream.write(big)
            await stream.end()
        else:
            await echo(stream)

    async with session_pair(handler, limits) as pair:
        slow = await pair.gateway.open_stream("GET", "/download", [], end_stream=True)
        assert (await slow.response()).status == 200
        first = await slow.read()  # then stop reading: its window fills up
        other = os.urandom(MiB)
        assert await asyncio.wait_for(exchange(pair.gateway, "/echo", other), 20) == other
        assert not slow.done  # still blocked, not failed
        rest = await read_all(slow)
        assert first + rest == big


async def test_write_waits_for_credit_and_never_buffers_unboundedly() -> None:
    limits = Limits(stream_window=32 * 1024, tunnel_window=128 * 1024, max_frame_size=8 * 1024)
    started = asyncio.Event()
    release = asyncio.Event()

    async def stubborn(stream: TunnelStream) -> None:
        await stream.send_response(200, "OK", [])
        started.set()
        await release.wait()  # do not read the request body for a while
        await read_all(stream)
        await stream.end()

    async with session_pair(stubborn, limits) as pair:
        stream = await pair.gateway.open_stream("PUT", "/upload", [])
        write = asyncio.create_task(stream.write(b"x" * 200_000))
        await started.wait()
        await asyncio.sleep(0.1)
        assert not write.done()  # blocked at the stream window
        assert pair.gateway.protocol.available_window(stream.stream_id) == 0
        release.set()
        await asyncio.wait_for(write, 10)
        await stream.end()
        assert await read_all(stream) == b""


async def test_reset_both_ways() -> None:
    gate = asyncio.Event()
    handler_saw: list[BaseException] = []

    async def handler(stream: TunnelStream) -> None:
        assert stream.request is not None
        if stream.request.target == "/fail-upstream":
            stream.reset(ErrorCode.UPSTREAM_ERROR, "MP unreachable")
            return
        if stream.request.target == "/echo":
            await echo(stream)
            return
        await stream.send_response(200, "OK", [])
        gate.set()
        try:
            while True:
                await stream.write(b"z" * 1000)
        except StreamResetError as exc:
            handler_saw.append(exc)
            raise

    async with session_pair(handler) as pair:
        stream = await pair.gateway.open_stream("GET", "/fail-upstream", [], end_stream=True)
        with pytest.raises(StreamResetError) as info:
            await stream.response()
        assert info.value.code is ErrorCode.UPSTREAM_ERROR
        assert stream.reset_code is ErrorCode.UPSTREAM_ERROR and stream.done

        stream = await pair.gateway.open_stream("GET", "/forever", [], end_stream=True)
        await stream.response()
        await gate.wait()
        stream.reset(ErrorCode.CANCEL, "client went away")
        with pytest.raises(StreamResetError):
            await stream.read()
        for _ in range(100):
            if handler_saw:
                break
            await asyncio.sleep(0.01)
        assert isinstance(handler_saw[0], StreamResetError) and handler_saw[0].code is ErrorCode.CANCEL
        # the tunnel is fine afterwards, credit was returned
        assert await exchange(pair.gateway, "/echo", b"x" * 300_000) == b"x" * 300_000


async def test_failing_handler_resets_with_internal_error_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(stream: TunnelStream) -> None:
        raise RuntimeError("secret internal detail")

    async with session_pair(broken) as pair:
        with caplog.at_level(logging.ERROR, logger="tunnel.session"):
            stream = await pair.gateway.open_stream("GET", "/", [], end_stream=True)
            with pytest.raises(StreamResetError) as info:
                await stream.response()
        assert info.value.code is ErrorCode.INTERNAL_ERROR
        assert "secret" not in info.value.reason
        assert any(r.exc_info and "secret internal detail" in str(r.exc_info[1]) for r in caplog.records)


async def test_drain_refuses_new_streams_but_finishes_in_flight() -> None:
    release = asyncio.Event()

    async def slow(stream: TunnelStream) -> None:
        await release.wait()
        await echo(stream)

    async with session_pair(slow) as pair:
        in_flight = await pair.gateway.open_stream("POST", "/", [])
        await pair.connector.drain()
        for _ in range(100):
            if pair.gateway.peer_draining:
                break
            await asyncio.sleep(0.01)
        assert pair.gateway.peer_draining and pair.connector.local_draining
        with pytest.raises(DrainingError):
            await pair.gateway.open_stream("GET", "/", [])
        release.set()
        _, body = await asyncio.gather(write_in_chunks(in_flight, b"still here"), _response_body(in_flight))
        assert body == b"still here"


async def test_ping_measures_rtt() -> None:
    async with session_pair(ping_interval=0.02, ping_timeout=5.0) as pair:
        for _ in range(200):
            if pair.gateway.rtt is not None and pair.connector.rtt is not None:
                break
            await asyncio.sleep(0.01)
        assert pair.gateway.rtt is not None and pair.gateway.rtt >= 0
        assert pair.connector.rtt is not None


async def _silent_gateway(ws: MemoryWebSocket) -> None:
    """Answer the HELLO with a WELCOME, then never read or answer anything again."""
    gateway = TunnelProtocol(Role.GATEWAY)
    while gateway.peer_hello is None:
        gateway.receive_data(await ws.recv())
    gateway.send_welcome("silent")
    for chunk in gateway.data_to_send():
        await ws.send(chunk)


async def test_ping_timeout_closes_the_tunnel() -> None:
    gateway_ws, connector_ws = memory_pair()
    connector = TunnelSession(
        TunnelProtocol(Role.CONNECTOR), connector_ws, ping_interval=0.05, ping_timeout=0.3, name="cp"
    )
    connector.send_hello("ABC", "cp1", ROLES)
    run = asyncio.create_task(connector.run())
    await _silent_gateway(gateway_ws)
    await connector.wait_handshake()
    await asyncio.wait_for(run, 5)
    assert connector.closed
    assert connector.close_reason is not None and "ping timeout" in connector.close_reason
    assert connector_ws.closed
    with pytest.raises(TunnelClosedError):
        await connector.open_stream("GET", "/", [])


async def test_handshake_timeout() -> None:
    gateway_ws, _ = memory_pair()
    gateway = TunnelSession(TunnelProtocol(Role.GATEWAY), gateway_ws, ping_timeout=0.2)
    run = asyncio.create_task(gateway.run())
    with pytest.raises(TunnelClosedError):
        await gateway.wait_hello()
    await asyncio.wait_for(run, 5)
    assert gateway.close_reason is not None and "handshake" in gateway.close_reason


async def test_garbage_from_connector_closes_only_that_tunnel(caplog: pytest.LogCaptureFixture) -> None:
    async with session_pair() as healthy:
        bad_gateway_ws, raw_connector_ws = memory_pair()
        victim = TunnelSession(TunnelProtocol(Role.GATEWAY), bad_gateway_ws, name="gw-victim")
        run = asyncio.create_task(victim.run())
        with caplog.at_level(logging.WARNING, logger="tunnel.session"):
            await raw_connector_ws.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(run, 5)
        assert victim.closed
        assert victim.close_reason is not None and "unknown frame type" in victim.close_reason
        assert bad_gateway_ws.close_code == 1002 and bad_gateway_ws.close_reason
        # the peer got a CLOSE frame with the reason before the websocket closed
        close = parse_frame(await raw_connector_ws.recv())
        assert close.type is FrameType.CLOSE
        code, reason = decode_close(close.payload)
        assert code is ErrorCode.PROTOCOL_ERROR and "unknown frame type" in reason
        assert any("broke the tunnel protocol" in r.getMessage() for r in caplog.records)
        with pytest.raises(TunnelClosedError):
            await victim.wait_hello()
        # everything else is fine
        assert await exchange(healthy.gateway, "/echo", b"fine") == b"fine"


async def test_garbage_from_gateway_after_handshake_fails_open_streams() -> None:
    gateway_ws, connector_ws = memory_pair()
    started = asyncio.Event()

    async def waiting(stream: TunnelStream) -> None:
        started.set()
        await stream.read()

    connector = TunnelSession(TunnelProtocol(Role.CONNECTOR), connector_ws, on_request=waiting, name="cp")
    connector.send_hello("ABC", "cp1", ROLES)
    run = asyncio.create_task(connector.run())
    raw = TunnelProtocol(Role.GATEWAY)
    while raw.peer_hello is None:
        raw.receive_data(await gateway_ws.recv())
    raw.send_welcome("raw")
    raw.open_stream("POST", "/", [])
    for chunk in raw.data_to_send():
        await gateway_ws.send(chunk)
    await started.wait()
    stream = next(iter(connector._streams.values()))
    await gateway_ws.send(Frame(FrameType.DATA, 0, 1, b"x" * 10).serialize() + b"\x00" * 10)
    await asyncio.wait_for(run, 5)
    assert connector.close_reason is not None and "protocol error" in connector.close_reason
    with pytest.raises(TunnelClosedError):
        await stream.read()
    assert connector_ws.close_code == 1002


async def test_peer_close_is_reported() -> None:
    async with session_pair() as pair:
        await pair.connector.close(ErrorCode.NO_ERROR, "connection point stopping")
        await asyncio.wait_for(pair.gateway.wait_closed(), 5)
        assert pair.gateway.close_reason is not None
        assert "connection point stopping" in pair.gateway.close_reason
        with pytest.raises(TunnelClosedError):
            await pair.gateway.open_stream("GET", "/", [])


async def _cancel_a_running_session() -> tuple[TunnelSession, MemoryWebSocket]:
    gateway_ws, _ = memory_pair()
    gateway = TunnelSession(TunnelProtocol(Role.GATEWAY), gateway_ws)
    run = asyncio.create_task(gateway.run())
    await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    return gateway, gateway_ws


async def test_cancelling_run_closes_everything() -> None:
    gateway, gateway_ws = await _cancel_a_running_session()
    assert gateway.closed and gateway_ws.closed


async def test_a_cancelled_run_leaves_nothing_behind_for_the_next_session() -> None:
    """Compiled by mypyc, a coroutine that awaited in a ``finally`` clause re-raised, later
    and in another session's ``run()``, the CancelledError of one cancelled before: the
    next tunnel's clean close failed. The driver has no await in a finally clause."""
    for _ in range(3):
        await _cancel_a_running_session()
        async with session_pair() as pair:
            assert await exchange(pair.gateway, "/echo", b"after a cancelled tunnel") == b"after a cancelled tunnel"
        for task in pair.tasks:
            assert task.done() and not task.cancelled() and task.exception() is None


# -- versions ----------------------------------------------------------------------------


def test_negotiate() -> None:
    assert negotiate([SUBPROTOCOL]) == SUBPROTOCOL
    assert negotiate(["cmg-tunnel.v0", SUBPROTOCOL]) == SUBPROTOCOL
    with pytest.raises(VersionMismatch) as info:
        negotiate(["cmg-tunnel.v0"])
    assert info.value.reason == (
        "tunnel protocol version mismatch: the connection point offered cmg-tunnel.v0; "
        "this gateway speaks cmg-tunnel.v1"
    )
    with pytest.raises(VersionMismatch, match="offered none"):
        negotiate([])


# -- real websockets --------------------------------------------------------------------------


def _select_subprotocol(connection: ServerConnection, offered: list[str]) -> str:
    try:
        return negotiate(offered)
    except VersionMismatch as exc:
        raise websockets.exceptions.NegotiationError(exc.reason) from None


async def test_real_websockets_on_loopback(websocket_kind: str) -> None:
    gateway_sessions: list[TunnelSession] = []
    # send-now: the connections of tunnel.ws, as the gateway and connection point use.
    direct = websocket_kind == "send-now"
    server_kw = {"create_connection": DirectServerConnection} if direct else {}
    client_kw = {"create_connection": DirectClientConnection} if direct else {}

    async def tunnel_endpoint(ws: ServerConnection) -> None:
        assert ws.subprotocol == SUBPROTOCOL
        session = TunnelSession(TunnelProtocol(Role.GATEWAY), ws, name="gw")
        gateway_sessions.append(session)
        run = asyncio.create_task(session.run())
        await session.wait_hello()
        session.send_welcome("instance-0")
        await run

    async with serve(
        tunnel_endpoint, "127.0.0.1", 0, subprotocols=[SUBPROTOCOL], select_subprotocol=_select_subprotocol,
        **server_kw,  # type: ignore[arg-type]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        uri = f"ws://127.0.0.1:{port}/"

        # an old connector gets a clear refusal, not garbage
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with connect(uri, subprotocols=["cmg-tunnel.v0"]):  # type: ignore[list-item]
                pass
        assert info.value.response.status_code == 400
        assert b"offered cmg-tunnel.v0" in info.value.response.body

        async with connect(uri, subprotocols=[SUBPROTOCOL], **client_kw) as ws:  # type: ignore[list-item, arg-type]
            assert hasattr(ws, "send_now") is direct
            connector = TunnelSession(TunnelProtocol(Role.CONNECTOR), ws, on_request=echo, name="cp")
            connector.send_hello("ABC", "cp1", ROLES)
            run = asyncio.create_task(connector.run())
            await connector.wait_handshake()
            gateway = gateway_sessions[0]
            await gateway.wait_handshake()
            payload = os.urandom(MiB)

            async def one(i: int) -> None:
                mine = payload[i:] + payload[:i]
                assert await exchange(gateway, f"/echo/{i}", mine) == mine

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 60)
            await gateway.close(ErrorCode.NO_ERROR, "instance stopping")
            await asyncio.wait_for(run, 10)
            assert connector.close_reason is not None and "instance stopping" in connector.close_reason


async def test_buffered_body_is_the_whole_body_once_the_peer_ended_it() -> None:
    limits = Limits(stream_window=64 * 1024, tunnel_window=128 * 1024, max_frame_size=16 * 1024)
    body = os.urandom(60_000)  # within one stream window: the peer can end it unread

    async def handler(stream: TunnelStream) -> None:
        await stream.send_response(200, "OK", [], end_stream=True, body=body)

    async with session_pair(handler, limits) as pair:
        stream = await pair.gateway.open_stream("GET", "/whole", [], end_stream=True)
        assert stream.buffered_body() is None  # nothing yet: the peer has not ended it
        await stream.response()
        for _ in range(100):  # the end may come in a later websocket message than the head
            if (whole := stream.buffered_body()) is not None:
                break
            await asyncio.sleep(0.01)
        assert whole == body
        assert await stream.read() == b""
        # its credit went back: the tunnel window is whole again on the connector's side
        for _ in range(100):
            if pair.connector.protocol._tunnel_send_window == limits.tunnel_window:
                break
            await asyncio.sleep(0.01)
        assert pair.connector.protocol._tunnel_send_window == limits.tunnel_window


async def test_writers_queue_ahead_but_wait_once_the_websocket_stops_taking_data() -> None:
    from tunnel.session import FLUSH_AHEAD

    async def swallow(stream: TunnelStream) -> None:
        await read_all(stream)
        await stream.send_response(200, "OK", [], end_stream=True)

    async with session_pair(swallow) as pair:
        ws = pair.gateway.websocket
        assert isinstance(ws, MemoryWebSocket)
        gate = ws.gate
        stream = await pair.gateway.open_stream("PUT", "/sink", [])
        # With the websocket taking data, a small write returns without waiting for the writer.
        sent_before = ws.sent_messages
        await stream.write(b"x" * 1000)
        assert ws.sent_messages == sent_before
        # With the websocket stuck, writes queue up to FLUSH_AHEAD, then wait.
        gate.clear()
        await asyncio.sleep(0.05)  # the writer takes the first chunk and blocks in send
        chunk = b"y" * 16384
        writer = asyncio.create_task(write_in_chunks(stream, chunk * ((FLUSH_AHEAD // len(chunk)) + 8), len(chunk)))
        await asyncio.sleep(0.2)
        assert not writer.done()
        assert FLUSH_AHEAD <= pair.gateway.protocol.pending_output < FLUSH_AHEAD + 2 * len(chunk)
        gate.set()
        await asyncio.wait_for(writer, 10)
        assert (await asyncio.wait_for(stream.response(), 10)).status == 200


async def test_open_stream_wait_sent_raises_when_the_head_never_left() -> None:
    async with session_pair() as pair:
        ws = pair.gateway.websocket
        assert isinstance(ws, MemoryWebSocket)
        ws.broken = True
        # Without wait_sent the head is only queued: open_stream() returns a stream...
        queued = await pair.gateway.open_stream("GET", "/a", [], end_stream=True)
        # ... whose answer then fails with the tunnel.
        with pytest.raises(TunnelClosedError):
            await asyncio.wait_for(queued.response(), 5)
        with pytest.raises(TunnelClosedError):
            await asyncio.wait_for(pair.gateway.open_stream("POST", "/b", [], wait_sent=True), 5)


async def test_response_timeout_leaves_the_stream_open() -> None:
    release = asyncio.Event()

    async def slow(stream: TunnelStream) -> None:
        await release.wait()
        await stream.send_response(200, "OK", [], end_stream=True)

    async with session_pair(slow) as pair:
        stream = await pair.gateway.open_stream("GET", "/slow", [], end_stream=True)
        with pytest.raises(TimeoutError):
            await stream.response(0.05)
        assert not stream.done
        release.set()
        assert (await asyncio.wait_for(stream.response(), 5)).status == 200


async def _raw_connector(gateway: TunnelSession, connector_ws: MemoryWebSocket) -> TunnelProtocol:
    raw = TunnelProtocol(Role.CONNECTOR)
    raw.send_hello("ABC", "cp1", ROLES)
    for chunk in raw.data_to_send():
        await connector_ws.send(chunk)
    await gateway.wait_hello()
    gateway.send_welcome("instance-0")
    while not raw.handshake_done:
        raw.receive_data(await connector_ws.recv())
    return raw


@pytest.mark.parametrize("same_message", [True, False], ids=["reset-in-the-same-message", "reset-after"])
async def test_a_complete_response_stays_readable_when_the_peer_then_resets_the_request(same_message: bool) -> None:
    """A connection point that answered in full before the request body arrived ends the
    stream with RESET(NO_ERROR) after END_STREAM (the request body is not wanted). The
    response is complete: the gateway reads all of it, its writes stop, and the tunnel's
    credit stays exact (no byte credited twice: that broke later streams' accounting)."""
    gateway_ws, connector_ws = memory_pair()
    gateway = TunnelSession(TunnelProtocol(Role.GATEWAY), gateway_ws, name="gw")
    run = asyncio.create_task(gateway.run())
    try:
        raw = await _raw_connector(gateway, connector_ws)
        stream = await gateway.open_stream("POST", "/upload", [], wait_sent=True)
        await stream.write(b"part of the body")
        while not raw._streams:
            raw.receive_data(await connector_ws.recv())
        body = os.urandom(5000)
        raw.send_response(stream.stream_id, 200, "OK", [(b"Content-Length", b"5000")])
        raw.send_data(stream.stream_id, body, end_stream=True)
        if same_message:
            raw.reset_stream(stream.stream_id, ErrorCode.NO_ERROR)
            await connector_ws.send(b"".join(raw.data_to_send()))
        else:
            await connector_ws.send(b"".join(raw.data_to_send()))
            await asyncio.wait_for(stream.response(), 5)
            raw.reset_stream(stream.stream_id, ErrorCode.NO_ERROR)
            await connector_ws.send(b"".join(raw.data_to_send()))
        assert (await asyncio.wait_for(stream.response(), 5)).status == 200
        for _ in range(100):  # the RESET has been handled once writes fail
            if gateway.protocol.stream_is_open(stream.stream_id) is False and stream._write_error is not None:
                break
            await asyncio.sleep(0.01)
        assert stream.buffered_body() == body
        assert await stream.read() == b""
        with pytest.raises((StreamResetError, StreamClosedError)):
            await stream.write(b"more of the body")
        assert gateway.protocol._tunnel_outstanding == 0
        # the next stream's bytes are acknowledged without error
        second = await gateway.open_stream("GET", "/next", [], end_stream=True)
        while second.stream_id not in raw._streams:
            raw.receive_data(await connector_ws.recv())
        raw.send_response(second.stream_id, 200, "OK", [])
        raw.send_data(second.stream_id, b"y" * 3000, end_stream=True)
        await connector_ws.send(b"".join(raw.data_to_send()))
        await asyncio.wait_for(second.response(), 5)
        assert await asyncio.wait_for(read_all(second), 5) == b"y" * 3000
        assert gateway.protocol._tunnel_outstanding == 0
    finally:
        await gateway.close()
        await asyncio.wait_for(run, 10)


async def _answered(stream: TunnelStream, timeout: float | None = None) -> bool:
    """when_answered, turned into an awaitable for the test: the timed_out flag."""
    fired: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    stream.when_answered(fired.set_result, timeout)
    return await asyncio.wait_for(fired, 5)


async def test_open_stream_now_and_when_answered_without_a_task() -> None:
    body = b"x" * 3000

    async def handler(stream: TunnelStream) -> None:
        await stream.send_response(200, "OK", [(b"Content-Length", b"3000")], end_stream=True, body=body)

    async with session_pair(handler) as pair:
        stream = pair.gateway.open_stream_now("GET", "/now", [])
        with pytest.raises(RuntimeError):
            stream.response_now()
        assert await _answered(stream, 5) is False
        assert stream.head_sent
        assert stream.response_now().status == 200
        # Called back after the whole message: the body and its end are here with the head.
        assert stream.buffered_body() == body
        # Asked again once answered: called back at once (from the loop).
        assert await _answered(stream) is False
        assert pair.gateway.open_streams == 0


async def test_when_answered_times_out_and_leaves_the_stream_open() -> None:
    release = asyncio.Event()

    async def slow(stream: TunnelStream) -> None:
        await release.wait()
        await stream.send_response(204, "No Content", [], end_stream=True)

    async with session_pair(slow) as pair:
        stream = pair.gateway.open_stream_now("GET", "/slow", [])
        assert await _answered(stream, 0.05) is True
        assert not stream.done
        assert not pair.gateway._deadlines  # the deadline went with the callback
        release.set()
        assert await _answered(stream, 5) is False
        assert stream.response_now().status == 204


async def test_when_answered_reports_a_reset_and_a_closed_tunnel() -> None:
    async def refuse(stream: TunnelStream) -> None:
        stream.reset(ErrorCode.REFUSED_STREAM, "not now")

    async with session_pair(refuse) as pair:
        stream = pair.gateway.open_stream_now("GET", "/refused", [])
        assert await _answered(stream, 5) is False
        with pytest.raises(StreamResetError) as info:
            stream.response_now()
        assert info.value.code is ErrorCode.REFUSED_STREAM

    async with session_pair() as pair:
        ws = pair.gateway.websocket
        assert isinstance(ws, MemoryWebSocket)
        ws.broken = True
        stream = pair.gateway.open_stream_now("GET", "/never-sent", [])
        assert await _answered(stream, 5) is False
        with pytest.raises(TunnelClosedError):
            stream.response_now()
        assert not stream.head_sent  # it went nowhere: another tunnel may take it
        with pytest.raises(TunnelClosedError):
            pair.gateway.open_stream_now("GET", "/after", [])


async def test_when_answered_calls_back_from_the_handling_of_the_answer() -> None:
    """The callback runs as soon as the tunnel message with the answer was handled, not a
    turn of the loop later (here: in the task that handled the message, the session's
    reader); one that raises is logged, and the others and the session go on."""
    release = asyncio.Event()
    arrived = 0

    async def held(stream: TunnelStream) -> None:
        nonlocal arrived
        arrived += 1
        await release.wait()
        await stream.send_response(204, "No Content", [], end_stream=True)

    async with session_pair(held) as pair:
        called_in: list[asyncio.Task[object] | None] = []

        def fails(timed_out: bool) -> None:
            called_in.append(asyncio.current_task())
            raise RuntimeError("a callback that fails")

        first, second = pair.gateway.open_stream_now("GET", "/a", []), pair.gateway.open_stream_now("GET", "/b", [])
        first.when_answered(fails, 5)
        fired = asyncio.get_running_loop().create_future()

        def answered(timed_out: bool) -> None:
            called_in.append(asyncio.current_task())
            fired.set_result(timed_out)

        second.when_answered(answered, 5)
        while arrived < 2:
            await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.wait_for(fired, 5) is False
        assert len(called_in) == 2
        assert all(task is not None and task.get_name() == "gw tunnel reader" for task in called_in)
        assert first.response_now().status == second.response_now().status == 204
        third = pair.gateway.open_stream_now("GET", "/c", [])
        assert await _answered(third, 5) is False  # the session goes on
        assert third.response_now().status == 204
