"""HTTP serving the way IIS does for ConfigMgr: its own verbs and case-insensitive paths.

Two things aiohttp does not do out of the box:

- ConfigMgr clients use the verbs ``CCM_POST`` and ``BITS_POST``. aiohttp's C parser
  (llhttp) knows only the registered HTTP methods, so the runner here serves through
  :class:`cmg.anyverb.AnyVerbServer` (aiohttp's pure-Python parser), as the gateway does.
- IIS matches paths case-insensitively (``/CCM_System/request`` = ``/ccm_system/request``),
  aiohttp's router does not. :class:`CaseInsensitiveRouter` dispatches on the lower-cased
  path behind a single catch-all route.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.web_server import Server

from cmg.anyverb import AnyVerbServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConfigMgrAppRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections accept ConfigMgr's verbs."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        return AnyVerbServer(
            server.request_handler,
            request_factory=server.request_factory,
            loop=server._loop,
            **server._kwargs,
        )


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    path: str  # lower case
    prefix: bool
    handler: Handler


class CaseInsensitiveRouter:
    """Routes on the lower-cased path, exact or by prefix; first match wins.

    A path that matches with the wrong method gets 405 with ``Allow``; no match, 404.
    """

    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(self, methods: str | tuple[str, ...], path: str, handler: Handler, *, prefix: bool = False) -> None:
        ms = (methods,) if isinstance(methods, str) else methods
        self._routes.append(Route(frozenset(m.upper() for m in ms), path.lower(), prefix, handler))

    def install(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.dispatch)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.lower()
        allowed: set[str] = set()
        for route in self._routes:
            if path == route.path or (route.prefix and path.startswith(route.path)):
                if request.method in route.methods:
                    return await route.handler(request)
                allowed |= route.methods
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
        raise web.HTTPNotFound(reason="Not Found")
