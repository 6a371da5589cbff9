"""aiohttp's low-level server with a request parser that accepts ConfigMgr's verbs.

ConfigMgr clients use ``CCM_POST`` and ``BITS_POST``. aiohttp's C parser (llhttp) knows
only the registered HTTP methods and answers 400 "Invalid method" to anything else;
aiohttp's pure-Python parser accepts any RFC 9110 token as a method. Both the gateway
and the mock site serve through :class:`AnyVerbServer`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler, RequestPayloadError
from aiohttp.web_server import Server


class AnyVerbRequestHandler(RequestHandler):
    """A connection handler whose request parser accepts any token as the method."""

    parser_class: type[HttpRequestParserPy] = HttpRequestParserPy

    def __init__(self, manager: Server, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._parser = self.parser_class(
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


class AnyVerbServer(Server):
    """``aiohttp.web.Server`` whose connections accept any HTTP token as the method."""

    def __call__(self) -> RequestHandler:
        return AnyVerbRequestHandler(self, loop=self._loop, **self._kwargs)
