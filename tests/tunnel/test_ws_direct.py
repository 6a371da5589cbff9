"""tunnel.ws: whole binary messages handed to a receiver as they are parsed, in order."""

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tunnel.ws import EARLY_MESSAGES, DirectClientConnection, DirectServerConnection


async def _pair(handler):  # type: ignore[no-untyped-def]
    server = await serve(handler, "127.0.0.1", 0, create_connection=DirectServerConnection, compression=None)
    port = server.sockets[0].getsockname()[1]
    return server, f"ws://127.0.0.1:{port}"


async def test_messages_parsed_before_the_receiver_is_attached_go_first_in_order() -> None:
    received: list[bytes] = []
    attached = asyncio.Event()
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        assert isinstance(ws, DirectServerConnection)
        await attached.wait()
        await asyncio.sleep(0.1)  # the client's first messages are parsed by now
        ws.attach_receiver(received.append)
        await done.wait()

    server, uri = await _pair(handler)
    async with server, connect(uri, create_connection=DirectClientConnection, compression=None) as client:
        for n in range(5):
            await client.send(b"early %d" % n)
        attached.set()
        await asyncio.sleep(0.2)
        for n in range(5):
            await client.send(b"direct %d" % n)
        for _ in range(100):
            if len(received) == 10:
                break
            await asyncio.sleep(0.01)
        done.set()
    assert received == [b"early %d" % n for n in range(5)] + [b"direct %d" % n for n in range(5)]


async def test_a_fragmented_message_turns_the_direct_path_off_and_order_is_kept() -> None:
    direct: list[bytes] = []
    queued: list[bytes] = []
    done = asyncio.Event()

    async def handler(ws: DirectServerConnection) -> None:  # type: ignore[override]
        ws.attach_receiver(direct.append)
        while len(queued) < 2:
            queued.append(await ws.recv())  # type: ignore[arg-type]
        done.set()

    server, uri = await _pair(handler)
    async with server, connect(uri, create_connection=DirectClientConnection, compression=None) as client:
        await asyncio.sleep(0.05)
        await client.send(b"first")
        await client.send([b"frag", b"mented"])  # a message in two frames
        await client.send(b"after")  # must not overtake the fragmented one
        await asyncio.wait_for(done.wait(), 5)
    assert direct == [b"first"]
    assert queued == [b"fragmented", b"after"]


async def test_reading_pauses_while_early_messages_wait_and_resumes_on_attach() -> None:
    received: list[bytes] = []
    states: dict[str, bool] = {}
    go = asyncio.Event()
    done = asyncio.Event()

    async def handler(ws: DirectServerConnection) -> None:  # type: ignore[override]
        await go.wait()
        await asyncio.sleep(0.2)
        states["paused"] = not ws.transport.is_reading()
        ws.attach_receiver(received.append)
        states["resumed"] = ws.transport.is_reading()
        await done.wait()

    server, uri = await _pair(handler)
    async with server, connect(uri, create_connection=DirectClientConnection, compression=None) as client:
        go.set()
        for n in range(EARLY_MESSAGES + 4):
            await client.send(b"m%d" % n)
        for _ in range(200):
            if len(received) == EARLY_MESSAGES + 4:
                break
            await asyncio.sleep(0.01)
        done.set()
    assert states == {"paused": True, "resumed": True}
    assert received == [b"m%d" % n for n in range(EARLY_MESSAGES + 4)]


async def test_send_now_sends_at_once_only_when_send_would_not_wait() -> None:
    received: list[bytes] = []
    done = asyncio.Event()

    async def handler(ws: DirectServerConnection) -> None:  # type: ignore[override]
        ws.attach_receiver(received.append)
        await done.wait()

    server, uri = await _pair(handler)
    async with server:
        client = await connect(uri, create_connection=DirectClientConnection, compression=None)
        assert client.send_now(b"one") is True
        client.pause_writing()  # what the transport calls above its high-water mark
        assert client.send_now(b"not now") is False
        client.resume_writing()
        assert client.send_now(b"two") is True
        for _ in range(100):
            if len(received) == 2:
                break
            await asyncio.sleep(0.01)
        assert received == [b"one", b"two"]
        done.set()
        await client.close()
        assert client.send_now(b"closed") is False
