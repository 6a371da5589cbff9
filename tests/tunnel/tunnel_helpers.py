"""Shared helpers for the tunnel tests: wiring two protocols back to back, fake clocks."""

from __future__ import annotations

import asyncio

from tunnel import Event, Limits, PublishedRole, Role, TunnelProtocol

ROLES = (
    PublishedRole(
        role_id=72057594037927942,
        kind="MP",
        name="SMS_MP",
        internal_url="https://mp.contoso.local",
        paths=("/SMS_MP", "/CCM_STS"),
    ),
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def transfer(sender: TunnelProtocol, receiver: TunnelProtocol) -> list[Event]:
    """Move every pending byte from sender to receiver; return the receiver's events."""
    events: list[Event] = []
    for chunk in sender.data_to_send():
        events += receiver.receive_data(chunk)
    return events


def pump(gateway: TunnelProtocol, connector: TunnelProtocol) -> tuple[list[Event], list[Event]]:
    """Exchange bytes both ways until quiet; return (gateway events, connector events)."""
    gateway_events: list[Event] = []
    connector_events: list[Event] = []
    while True:
        got_c = transfer(gateway, connector)
        got_g = transfer(connector, gateway)
        connector_events += got_c
        gateway_events += got_g
        if not got_c and not got_g:
            # one more pass for frames queued without producing events (PONG, RESET ...)
            if not any(p._outgoing for p in (gateway, connector)):
                return gateway_events, connector_events


def handshake(
    gateway_limits: Limits = Limits(),
    connector_limits: Limits = Limits(),
    clock: FakeClock | None = None,
) -> tuple[TunnelProtocol, TunnelProtocol]:
    kwargs = {"clock": clock} if clock is not None else {}
    gateway = TunnelProtocol(Role.GATEWAY, gateway_limits, **kwargs)
    connector = TunnelProtocol(Role.CONNECTOR, connector_limits, **kwargs)
    connector.send_hello("ABC", "cp1.contoso.local", ROLES)
    transfer(connector, gateway)
    gateway.send_welcome("instance-0")
    transfer(gateway, connector)
    assert gateway.handshake_done and connector.handshake_done
    return gateway, connector


#: Whether memory_pair() gives websockets with ``send_now`` (as tunnel.ws's) by default;
#: the ``websocket_kind`` fixture (conftest.py) runs a module's tests both ways.
DIRECT = False


class MemoryWebSocket:
    """One end of an in-memory websocket pair (asyncio.Queue based, with close).

    ``gate``: while it is clear, sends wait (a stuck or congested tunnel); ``broken``:
    sends raise ConnectionError (a connection reset under the websocket)."""

    _CLOSED = object()

    def __init__(self, maxsize: int = 64) -> None:
        self._inbox: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.peer: MemoryWebSocket | None = None
        self.closed = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.sent_messages = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.broken = False

    async def send(self, message: bytes) -> None:
        await self.gate.wait()
        if self.broken:
            raise ConnectionError("connection reset")
        if self.closed or self.peer is None or self.peer.closed:
            raise ConnectionError("websocket is closed")
        self.sent_messages += 1
        await self.peer._inbox.put(bytes(message))

    async def recv(self) -> bytes:
        if self.closed and self._inbox.empty():
            raise ConnectionError("websocket is closed")
        item = await self._inbox.get()
        if item is self._CLOSED:
            self.closed = True
            self._inbox.put_nowait(self._CLOSED)  # later recv() calls fail too
            raise ConnectionError(f"websocket closed ({self.close_code} {self.close_reason})")
        assert isinstance(item, bytes)
        return item

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code, self.close_reason = code, reason
        for end in (self, self.peer):
            if end is not None:
                if end is not self:
                    end.close_code, end.close_reason = code, reason
                _force_put(end._inbox, self._CLOSED)


def _force_put(queue: "asyncio.Queue[object]", item: object) -> None:
    while True:
        try:
            queue.put_nowait(item)
            return
        except Exception:  # full: the reader is gone or slow; make room for the close marker
            queue.get_nowait()


class DirectMemoryWebSocket(MemoryWebSocket):
    """With ``send_now`` as :class:`tunnel.ws._DirectConnection` has it: a message is
    taken at once unless the gate is clear or the peer's inbox is full (a paused
    transport); then False, and ``send()`` waits."""

    def send_now(self, message: bytes) -> bool:
        if self.broken:
            raise ConnectionError("connection reset")
        if self.closed or self.peer is None or self.peer.closed:
            raise ConnectionError("websocket is closed")
        if not self.gate.is_set() or self.peer._inbox.full():
            return False
        self.sent_messages += 1
        self.peer._inbox.put_nowait(bytes(message))
        return True


def memory_pair(maxsize: int = 64, direct: bool | None = None) -> tuple[MemoryWebSocket, MemoryWebSocket]:
    kind = DirectMemoryWebSocket if (DIRECT if direct is None else direct) else MemoryWebSocket
    a, b = kind(maxsize), kind(maxsize)
    a.peer, b.peer = b, a
    return a, b
