"""The pure-Python fallback response parser behaves like httptools' on what the forwarder needs."""

from __future__ import annotations

import pytest

from connector._http11 import ParserError, ResponseParser

httptools = pytest.importorskip("httptools")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.keep_alive: list[bool] = []
        self.parser: object = None

    def on_message_begin(self) -> None:
        self.events.append(("begin", None))

    def on_status(self, s: bytes) -> None:  # llhttp may deliver the reason in pieces
        if self.events and self.events[-1][0] == "status":
            self.events[-1] = ("status", self.events[-1][1] + s)  # type: ignore[operator]
        else:
            self.events.append(("status", s))

    def on_header(self, n: bytes, v: bytes) -> None:
        self.events.append(("header", (n, v)))

    def on_headers_complete(self) -> None:
        self.events.append(("headers_complete", None))
        self.keep_alive.append(self.parser.should_keep_alive())

    def on_body(self, b: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + b)  # type: ignore[operator]
        else:
            self.events.append(("body", b))

    def on_message_complete(self) -> None:
        self.events.append(("complete", None))


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 404 \r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
]


@pytest.mark.parametrize("raw", RESPONSES)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_same_events_and_keep_alive_as_httptools(raw: bytes, step: int) -> None:
    ours, theirs = Recorder(), Recorder()
    p, q = ResponseParser(ours), httptools.HttpResponseParser(theirs)
    ours.parser, theirs.parser = p, q
    for i in range(0, len(raw), step):
        p.feed_data(raw[i:i + step])
        q.feed_data(raw[i:i + step])
    assert ours.events == theirs.events
    assert p.get_status_code() == q.get_status_code()
    # Keep-alive is asked for when the head is complete (llhttp forgets it afterwards).
    assert ours.keep_alive == theirs.keep_alive
    assert p.get_http_version() == q.get_http_version()


def test_garbage_is_an_error() -> None:
    with pytest.raises(ParserError):
        ResponseParser(Recorder()).feed_data(b"SSH-2.0-OpenSSH\r\n\r\n")
