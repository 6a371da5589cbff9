"""The client notification channel (BGB) over HTTP: long polls released by a push.

``GET /BGB/handler.ashx?RequestType=LogIn|Poll`` is held until a notification for that
client is pushed (``POST /_mock/bgb/notify``) or the hold time passes; then it answers
200 with the notifications (possibly none). A held poll is one future, no thread, so
thousands of clients cost little. A push for a client with no poll waiting is queued
(up to 100 per client) and delivered by its next poll. The client names itself with the
``CCMClientID`` header (its SMSID) or a ``ClientID`` query parameter; the response body
shape (``<BgbResponseMessage>``) is the emulator's choice: the real one is undocumented.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass

from aiohttp import web

from mock_site.context import SiteContext

MAX_HOLD = 900.0
MAX_QUEUED = 100


@dataclass(frozen=True)
class Notification:
    task_id: str
    type: str
    param: str
    pushed: float


class NotificationHub:
    def __init__(self, ctx: SiteContext, hold: float = 300.0) -> None:
        self.ctx = ctx
        self.hold = min(max(hold, 0.0), MAX_HOLD)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._queued: dict[str, deque[Notification]] = {}
        self._closing = False

    @property
    def held(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def push(self, client: str, type_: str, param: str = "") -> dict[str, int]:
        """Queue a notification for one client (SMSID) or ``"*"`` (every client polling now)."""
        n = Notification("{" + str(uuid.uuid4()).upper() + "}", type_, param, time.time())
        targets = list(self._waiters) if client == "*" else [client.upper()]
        released = 0
        for key in targets:
            q = self._queued.setdefault(key, deque(maxlen=MAX_QUEUED))
            q.append(n)
            for fut in self._waiters.get(key, ()):
                if not fut.done():
                    fut.set_result(None)
                    released += 1
        self.ctx.logs.bgb.info(f"Push {type_} for {client}: {released} held poll(s) released")
        return {"released": released, "clients": len(targets)}

    async def poll(self, request: web.Request) -> web.Response:
        request_type = request.query.get("RequestType", "")
        if request_type.lower() not in ("login", "poll"):
            raise web.HTTPBadRequest(reason=f"RequestType must be LogIn or Poll, not {request_type!r}")
        client = (request.headers.get("CCMClientID") or request.query.get("ClientID") or "").strip().upper()
        if not client:
            raise web.HTTPBadRequest(reason="the client names no CCMClientID")
        hold = self.hold
        if "Timeout" in request.query:
            try:
                hold = min(max(float(request.query["Timeout"]), 0.0), self.hold)
            except ValueError:
                raise web.HTTPBadRequest(reason="Timeout must be a number of seconds") from None
        if not self._queued.get(client) and not self._closing and hold > 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(client, set()).add(fut)
            try:
                await asyncio.wait_for(asyncio.shield(fut), hold)
            except asyncio.TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(client)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        del self._waiters[client]
        queued = self._queued.pop(client, deque())
        root = ET.Element("BgbResponseMessage", RequestType=request_type, ClientID=client,
                          Count=str(len(queued)))
        for n in queued:
            push = ET.SubElement(root, "PushMessage", TaskID=n.task_id)
            ET.SubElement(push, "TaskType").text = n.type
            ET.SubElement(push, "Param").text = n.param
        self.ctx.logs.bgb.info(f"{request_type} from {client}: answered with {len(queued)} notification(s)")
        return web.Response(text=ET.tostring(root, encoding="unicode"), content_type="text/xml")

    def close(self) -> None:
        """Release every held poll (empty answers) so shutdown does not wait for them."""
        self._closing = True
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
