"""The mock's own admin endpoints (under ``/_mock``, outside every published path, so
the CMG never forwards them) and the request recorder behind ``/_mock/requests``.

- ``GET /_mock/uploads``, ``GET /_mock/uploads/{name}``: BITS uploads (size, sha256,
  complete, client identity headers seen)
- ``GET /_mock/clients``: registrations
- ``GET /_mock/requests[?since=SEQ]``: recent requests (method, path, query, status,
  ``X-CMG-Client-*`` headers; ``client_auth`` = the gateway's ``X-CMG-Client-Auth``;
  ``authorization`` = ``{"scheme", "token_sha256"}`` of the ``Authorization`` header, or
  null: the token itself is not kept). Also ``seq`` (increasing; ``since`` returns only
  later ones), ``url`` (the internal URL as the role received it), ``headers`` (every
  header as received, in order, ``[name, value]`` pairs; an ``Authorization`` value is
  replaced by ``<scheme> sha256:<hex of the credentials>``), ``body_size``,
  ``body_sha256`` and ``body_complete`` (the body as it arrived, whatever the handler read)
- ``POST /_mock/stall``: ``{"role": "mp"|"sup"|"dp", "stalled": true|false}``: while a
  role is stalled its requests wait unanswered (admin endpoints still answer); released
  when unstalled
- ``POST /_mock/bgb/notify``: ``{"client": smsid or "*", "type": ..., "param": ...}``
- ``GET /_mock/health``: ports, counts, ``last_request_seq``, ``stalled`` roles
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict
from typing import Any, Awaitable, Callable

from aiohttp import web

from mock_site.bgb import NotificationHub
from mock_site.bits import UploadStore
from mock_site.context import SiteContext, client_identity, tap_body

ADMIN_PREFIX = "/_mock/"


def authorization_summary(value: str | None) -> dict[str, str] | None:
    """What the request log keeps of an ``Authorization`` header: its scheme and a hash."""
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    return {"scheme": scheme, "token_sha256": hashlib.sha256(credentials.strip().encode("utf-8")).hexdigest()}


def recorder(ctx: SiteContext, role: str) -> Callable[..., Any]:
    @web.middleware
    async def record(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path.startswith(ADMIN_PREFIX):
            if request.path == "/_mock/stall":
                return await stall(ctx, request)
            return await handler(request)
        started = time.time()
        status = 500
        tap = tap_body(request)
        try:
            gate = ctx.stalls.get(role)
            if gate is not None:
                await gate.wait()
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            ctx.requests.record({
                "time": started,
                "role": role,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "status": status,
                "client_identity": client_identity(request.headers),
                "client_auth": request.headers.get("X-CMG-Client-Auth", ""),
                "authorization": authorization_summary(request.headers.get("Authorization")),
                "user_agent": request.headers.get("User-Agent", ""),
                "elapsed_ms": round((time.time() - started) * 1000, 3),
                "url": str(request.url),
                "headers": received_headers(request),
                "body": tap,
            })
    return record


def received_headers(request: web.Request) -> list[list[str]]:
    """Every header as received, in order (``Authorization`` credentials hashed)."""
    out = []
    for name, value in request.raw_headers:
        n, v = name.decode("latin-1"), value.decode("latin-1")
        if n.lower() == "authorization":
            scheme, _, credentials = v.strip().partition(" ")
            v = f"{scheme} sha256:{hashlib.sha256(credentials.strip().encode('utf-8')).hexdigest()}"
        out.append([n, v])
    return out


async def stall(ctx: SiteContext, request: web.Request) -> web.Response:
    """``POST /_mock/stall`` ``{"role": "mp", "stalled": true}``."""
    if request.method != "POST":
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    try:
        data = json.loads(await request.read())
    except ValueError:
        raise web.HTTPBadRequest(reason="body must be JSON") from None
    role = data.get("role") if isinstance(data, dict) else None
    if role not in ("mp", "sup", "dp"):
        raise web.HTTPBadRequest(reason='body must be {"role": "mp"|"sup"|"dp", "stalled": true|false}')
    if data.get("stalled", True):
        ctx.stalls.setdefault(role, asyncio.Event())
    else:
        gate = ctx.stalls.pop(role, None)
        if gate is not None:
            gate.set()
    return web.json_response({"stalled": sorted(ctx.stalls)})


class Admin:
    def __init__(self, ctx: SiteContext, uploads: UploadStore, bgb: NotificationHub) -> None:
        self.ctx, self.uploads_store, self.bgb = ctx, uploads, bgb

    async def uploads(self, request: web.Request) -> web.Response:
        name = request.path[len("/_mock/uploads"):].strip("/")
        if name:
            found = self.uploads_store.upload(name)
            if found is None:
                raise web.HTTPNotFound(reason=f"no upload {name}")
            return web.json_response(found)
        return web.json_response(self.uploads_store.uploads())

    async def clients(self, request: web.Request) -> web.Response:
        return web.json_response([asdict(r) for r in self.ctx.clients.all()])

    async def requests(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise web.HTTPBadRequest(reason="since must be an integer") from None
        return web.json_response(self.ctx.requests.entries(since))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "site_code": self.ctx.site_code,
            "ports": self.ctx.ports,
            "clients": len(self.ctx.clients.all()),
            "bgb_held": self.bgb.held,
            "upload_sessions": len(self.uploads_store.sessions),
            "last_request_seq": self.ctx.requests.last_seq,
            "stalled": sorted(self.ctx.stalls),
        })

    async def bgb_notify(self, request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.read())
        except ValueError:
            raise web.HTTPBadRequest(reason="body must be JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("client"), str) or not data["client"]:
            raise web.HTTPBadRequest(reason='body must be {"client": "<SMSID>" or "*", "type": "..."}')
        type_ = data.get("type", "RequestMachinePolicy")
        if not isinstance(type_, str) or not type_:
            raise web.HTTPBadRequest(reason="type must be a non-empty string")
        return web.json_response(self.bgb.push(data["client"], type_, str(data.get("param", ""))))
