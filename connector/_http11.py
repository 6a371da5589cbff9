"""A small HTTP/1.1 response parser with httptools' interface (the fallback).

The forwarder parses the site's answers with ``httptools`` (llhttp, in C). Where it is
not installed, this parser takes its place: the same callbacks (``on_message_begin``,
``on_status``, ``on_header``, ``on_headers_complete``, ``on_body``,
``on_message_complete``) and methods (``feed_data``, ``get_status_code``,
``get_http_version``, ``should_keep_alive``). Bodies by Content-Length, chunked, or
until the connection closes (the forwarder notices the close itself).
"""

from __future__ import annotations

from typing import Any

_MAX_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 4096


class ParserError(Exception):
    """The answer is not HTTP/1.x."""


class ResponseParser:
    def __init__(self, protocol: Any) -> None:
        self._p = protocol
        self._buf = bytearray()
        self._state = "head"
        self._remaining = 0
        self._status = 0
        self._version = "1.1"
        self._keep_alive = True

    def get_status_code(self) -> int:
        return self._status

    def get_http_version(self) -> str:
        return self._version

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def _body_part(self) -> bool:
        """Pass on what is buffered of the current body part; True once it is complete."""
        take = min(self._remaining, len(self._buf))
        chunk = bytes(self._buf[:take])
        del self._buf[:take]
        self._remaining -= take
        self._p.on_body(chunk)
        return self._remaining == 0

    def feed_data(self, data: bytes) -> None:
        self._buf += data
        while self._buf:
            state = self._state
            if state == "head":
                if not self._head():
                    return
            elif state == "length":
                if self._body_part():
                    self._complete()
            elif state == "eof":
                chunk = bytes(self._buf)
                self._buf.clear()
                self._p.on_body(chunk)
            elif state == "chunk-size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    if len(self._buf) > _MAX_CHUNK_LINE:
                        raise ParserError("chunk size line too long")
                    return
                line = bytes(self._buf[:end]).split(b";", 1)[0].strip()
                del self._buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise ParserError(f"bad chunk size {line[:20]!r}") from None
                if size < 0:
                    raise ParserError("negative chunk size")
                if size == 0:
                    self._state = "trailers"
                else:
                    self._remaining = size
                    self._state = "chunk-data"
            elif state == "chunk-data":
                if self._body_part():
                    self._state = "chunk-end"
            elif state == "chunk-end":
                if len(self._buf) < 2:
                    return
                if self._buf[:2] != b"\r\n":
                    raise ParserError("chunk not followed by CRLF")
                del self._buf[:2]
                self._state = "chunk-size"
            elif state == "trailers":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    if len(self._buf) > _MAX_HEAD:
                        raise ParserError("trailers too long")
                    return
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                if end == 0:
                    self._complete()
                else:
                    name, sep, value = line.partition(b":")
                    if not sep or not name:
                        raise ParserError(f"bad trailer line {line[:60]!r}")
                    self._p.on_header(name, value.strip())
            else:  # pragma: no cover
                raise ParserError(f"parser state {state}")

    def _complete(self) -> None:
        self._state = "head"
        self._p.on_message_complete()

    def _head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                raise ParserError("response head too long")
            return False
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[0]) != 8 or not parts[1].isdigit():
            raise ParserError(f"bad status line {lines[0][:60]!r}")
        self._version = parts[0][5:].decode("ascii")
        self._status = int(parts[1])
        self._p.on_message_begin()
        self._p.on_status(parts[2] if len(parts) > 2 else b"")
        length: int | None = None
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ParserError(f"bad header line {line[:60]!r}")
            value = value.strip()
            lname = name.lower()
            if lname == b"content-length":
                if not value.isdigit() or (length is not None and length != int(value)):
                    raise ParserError("bad Content-Length")
                length = int(value)
            elif lname == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif lname == b"connection":
                connection = value.lower()
            self._p.on_header(name, value)
        self._keep_alive = (b"close" not in connection) and (self._version == "1.1" or b"keep-alive" in connection)
        status = self._status
        self._p.on_headers_complete()
        if 100 <= status < 200 or status in (204, 304):
            self._complete()
        elif chunked:
            self._state = "chunk-size"
        elif length is not None:
            if length == 0:
                self._complete()
            else:
                self._remaining = length
                self._state = "length"
        else:
            self._keep_alive = False
            self._state = "eof"
        return True
