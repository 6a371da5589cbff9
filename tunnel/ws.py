"""websockets connections that hand whole binary messages straight to the tunnel session.

``websockets.asyncio`` queues every message it parses and hands it over when a task
awaits ``recv()``: a task switch and an event-loop turn per message. Over the tunnel,
where one message may carry a single small response, that was a sizeable part of a
request's cost. These subclasses (for ``serve(create_connection=...)`` and
``connect(create_connection=...)``) pass each unfragmented binary message to a receiver
as soon as it is parsed; :class:`~tunnel.session.TunnelSession` attaches one when it runs.

Order is kept: messages parsed before a receiver is attached wait in a short queue
(reading pauses while it is full) and go first; a text or fragmented message, which the
tunnel's peers never send, turns the direct path off for good, so it and everything
after it go through ``recv()`` in order. The tunnel's own flow control bounds what a
receiver is given, as the queue of ``recv()`` did.

The other way, :meth:`_DirectConnection.send_now` sends a binary message from a plain
callback, without ``send()``'s coroutine, when ``send()`` would not have to wait: the
connection open, no fragmented message under way, the transport not paused. Otherwise
it returns False and the caller uses ``send()``, which waits as it always did.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

__all__ = ["DirectClientConnection", "DirectServerConnection", "Receiver"]

#: Messages parsed before a receiver is attached that are held before reading pauses.
EARLY_MESSAGES = 16

Receiver = Callable[[bytes], None]


class _Direct:
    """The direct path's state for one connection."""

    __slots__ = ("receiver", "early", "on", "paused")

    def __init__(self) -> None:
        self.receiver: Receiver | None = None
        self.early: deque[bytes] = deque()
        self.on = True
        self.paused = False

    def offer(self, event: Event, pause: Callable[[], None]) -> bool:
        """Whether the event was taken (a whole binary message)."""
        if not isinstance(event, Frame):
            return False
        if not (self.on and event.opcode is Opcode.BINARY and event.fin):
            if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                self.on = False  # through recv() from here on, in order
            return False
        data = event.data if type(event.data) is bytes else bytes(event.data)
        receiver = self.receiver
        if receiver is not None:
            receiver(data)
            return True
        self.early.append(data)
        if len(self.early) >= EARLY_MESSAGES and not self.paused:
            self.paused = True
            pause()
        return True

    def attach(self, receiver: Receiver, resume: Callable[[], None]) -> None:
        early, self.early = self.early, deque()
        self.receiver = receiver
        while early and self.receiver is receiver:
            receiver(early.popleft())
        if self.paused:
            self.paused = False
            resume()

    def detach(self) -> None:
        self.receiver = None
        self.on = False
        self.early.clear()


class _DirectConnection(Connection):
    """What both ends add to websockets' connection: the direct path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = _Direct()

    def process_event(self, event: Event) -> None:
        if not self._direct.offer(event, self.transport.pause_reading):
            super().process_event(event)

    def attach_receiver(self, receiver: Receiver) -> None:
        self._direct.attach(receiver, self.transport.resume_reading)

    def detach_receiver(self) -> None:
        self._direct.detach()

    def send_now(self, message: bytes) -> bool:
        """Send one binary message at once if ``send()`` would send it without waiting;
        False (nothing sent) when it would wait or raise: use ``send()`` then."""
        if (self.paused or self.send_in_progress is not None or self.protocol.state is not State.OPEN
                or self.transport.is_closing()):
            return False
        self.protocol.send_binary(message)
        self.send_data()
        return True


class DirectServerConnection(_DirectConnection, ServerConnection):
    """The gateway's end of a tunnel (``serve(create_connection=DirectServerConnection)``)."""


class DirectClientConnection(_DirectConnection, ClientConnection):
    """The connection point's end of a tunnel (``connect(create_connection=DirectClientConnection)``)."""
