"""HTTP serving the way IIS does for ConfigMgr: its own verbs and case-insensitive paths.

Two things aiohttp does not do out of the box:

- ConfigMgr clients use the verbs ``CCM_POST`` and ``BITS_POST``. aiohttp's C parser
  (llhttp) knows only the registered HTTP methods and answers 400 "Invalid method" to
  anything else, so the runner here gives each connection aiohttp's pure-Python parser,
  which accepts any RFC 9110 token as a method.
- IIS matches paths case-insensitively (``/CCM_System/request`` = ``/ccm_system/request``),
  aiohttp's router does not. :class:`CaseInsensitiveRouter` dispatches on the lower-cased
  path behind a single catch-all route.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler, RequestPayloadError
from aiohttp.web_server import Server

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _AnyVerbRequestHandler(RequestHandler):
    """A connection handler whose request parser accepts any token as the method."""

    def __init__(self, manager: Server, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._parser = HttpRequestParserPy(
            self,
            loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=kwargs.get("auto_decompress", True),
            max_msg_queue_size=MAX_MSG_QUEUE_SIZE,
        )


class _AnyVerbServer(Server):
    def __call__(self) -> RequestHandler:
        return _AnyVerbRequestHandler(self, loop=self._loop, **self._kwargs)


class ConfigMgrAppRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections accept ConfigMgr's verbs."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        return _AnyVerbServer(
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
