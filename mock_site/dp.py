"""The distribution point: ``GET``/``HEAD /SMS_DP_SMSPKG$/<ContentID>/<file>`` with Range.

One range (``bytes=a-b``, ``a-``, ``-n``) gets 206 and ``Content-Range``; an
unsatisfiable one 416 with ``Content-Range: bytes */size``; several ranges, or a
malformed header, get the whole file (200), which RFC 9110 allows. The body is
streamed in 256 KiB chunks from :mod:`mock_site.content`, never built whole.
"""

from __future__ import annotations

import hashlib
from urllib.parse import unquote

from aiohttp import web

from mock_site.content import content_size, iter_content, parse_range
from mock_site.context import SiteContext

CHUNK = 256 * 1024
_LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"


async def serve_content(ctx: SiteContext, request: web.Request) -> web.StreamResponse:
    parts = request.path.split("/")
    # ["", "SMS_DP_SMSPKG$", <ContentID>, <file>]
    if len(parts) != 4 or not parts[2] or not parts[3]:
        raise web.HTTPNotFound(reason="content path must be /SMS_DP_SMSPKG$/<ContentID>/<file>")
    content_id, file = unquote(parts[2]), unquote(parts[3])
    size = content_size(content_id, file)
    if size is None:
        ctx.logs.dp.warning(f"{request.method} {content_id}/{file}: no such content")
        raise web.HTTPNotFound(reason=f"no content {content_id}/{file}")
    etag = '"' + hashlib.sha256(f"{content_id}/{file}/{size}".encode()).hexdigest()[:32] + '"'
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Last-Modified": _LAST_MODIFIED,
               "Content-Type": "application/octet-stream"}
    start, end, status = 0, size, 200
    range_header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if range_header and (if_range is None or if_range == etag):
        parsed = parse_range(range_header, size)
        if parsed == "unsatisfiable":
            ctx.logs.dp.warning(f"{request.method} {content_id}/{file}: range {range_header} not satisfiable")
            return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if isinstance(parsed, tuple):
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = end - start
    await resp.prepare(request)
    if request.method != "HEAD":
        for chunk in iter_content(content_id, file, start, end, CHUNK):
            await resp.write(chunk)
    await resp.write_eof()
    ctx.logs.dp.info(f"{request.method} {content_id}/{file} {status} bytes {start}-{end - 1}/{size} "
                     f"from {request.remote}")
    return resp
