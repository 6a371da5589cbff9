"""Forwarding one tunnel stream to the site role it names, and its answer back.

Request and response bodies stream in chunks under the tunnel's flow control; the
site is reached over a keep-alive connection pool. If the gateway resets the stream
while the request body is still flowing, the request to the role is aborted, so an
upload never reaches the MP truncated and marked complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import aiohttp

from tunnel import ErrorCode, StreamResetError, TunnelClosedError, TunnelStream

from .url_map import UnmappedURL, UrlMap

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "proxy-connection",
})
MESSAGE_ID = "x-cmg-message-id"


class Forwarder:
    """Handles the streams the gateway opens on this connection point's tunnels."""

    def __init__(self, url_map: UrlMap, log: logging.Logger, pool_size: int,
                 request_timeout: float = 600.0) -> None:
        self._map = url_map
        self._timeout = request_timeout
        self._log = log
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0,
                                         keepalive_timeout=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
            # sock_read: a role silent this long (before or during its answer) is given up on.
            timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15, sock_read=self._timeout),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, stream: TunnelStream) -> None:
        req = stream.request
        assert req is not None and self._session is not None
        start = time.monotonic()
        headers: list[tuple[str, str]] = []
        message_id = ""
        for k, v in req.headers:
            name = k.decode("latin-1")
            lname = name.lower()
            if lname == MESSAGE_ID:
                message_id = v.decode("latin-1")
            if lname not in HOP_BY_HOP:
                headers.append((name, v.decode("latin-1")))
        try:
            mapped = self._map.map(req.target)
        except UnmappedURL as exc:
            self._log.warning("Refused proxy message %s: %s", message_id, exc)
            stream.reset(ErrorCode.REFUSED_STREAM, "not published")
            return
        self._log.info("Forwarding proxy message %s to URL: %s", message_id, mapped.url)
        self._log.info("Switched to internal URL. Replaced '%s' with '%s'",
                       mapped.external_prefix, mapped.internal_prefix)

        body = None if req.end_stream else _request_body(stream)
        size = 0
        status_line = ""
        try:
            async with self._session.request(
                req.method, mapped.url, headers=headers, data=body, allow_redirects=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type"),
            ) as resp:
                status_line = f"HTTP/{resp.version.major}.{resp.version.minor} {resp.status} {resp.reason or ''}".rstrip()
                out = [(k, v) for k, v in resp.raw_headers if k.decode("latin-1").lower() not in HOP_BY_HOP]
                # With no body to follow (HEAD, 204, 304, Content-Length 0), the head ends the stream.
                empty = req.method == "HEAD" or resp.status in (204, 304) or resp.content_length == 0
                await stream.send_response(resp.status, resp.reason or "", out, end_stream=empty)
                if not empty:
                    async for chunk in resp.content.iter_any():
                        await stream.write(chunk)
                        size += len(chunk)
                    await stream.end()
        except (StreamResetError, TunnelClosedError) as exc:
            self._log.info("Proxy message %s cancelled by the CMG after %d response bytes: %s",
                           message_id, size, exc)
            return
        except asyncio.TimeoutError:
            self._log.warning("Proxy message %s to %s timed out: no data from the role for %.0f s",
                              message_id, mapped.url, self._timeout)
            stream.reset(ErrorCode.TIMEOUT, "site role timed out")
            return
        except (aiohttp.ClientError, OSError) as exc:
            # Before the head: the gateway turns this into a 502; after it, the reset
            # cuts the client off rather than passing a truncated body as complete.
            self._log.warning("Proxy message %s to %s failed: %s: %s", message_id, mapped.url,
                              exc.__class__.__name__, exc)
            stream.reset(ErrorCode.UPSTREAM_ERROR, "site role failed")
            return
        elapsed = (time.monotonic() - start) * 1000
        self._log.info(
            "MessageID: %s RequestURI: %s EndpointName: %s ResponseHeader: %s ~~ ResponseBodySize: %d ElapsedTime: %d ms",
            message_id, req.target, mapped.endpoint, status_line, size, elapsed,
        )


async def _request_body(stream: TunnelStream) -> AsyncIterator[bytes]:
    """The client's body as it arrives through the tunnel; raises if it is cut off."""
    while True:
        chunk = await stream.read()
        if not chunk:
            return
        yield chunk
