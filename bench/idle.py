"""Idle client TLS connections (``idle-6000``): memory per connection, and all still served.

``N`` connections are opened by a few threads, each with a full TLS set-up including the
client certificate, one request on each (so each is a real keep-alive client connection
that has been through the server's request path), and then left idle. The TLS session of
the previous connection is offered on the next one (resumption), so the set-up costs a
resumed handshake per connection, not a full one. Afterwards :meth:`IdleConnections.check`
sends one more request on every connection: "all served" means every one is answered 2xx.

Every loop is bounded: the set-up by ``deadline`` seconds (connections not opened by then
are reported, not waited for), each socket operation by ``timeout``.
"""

from __future__ import annotations

import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .load import Target, _read_response


def raise_nofile(needed: int) -> int:
    """Raises this process's RLIMIT_NOFILE soft limit to at least ``needed`` when it can
    (the hard limit too, as root); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    want_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, want_hard))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class OpenResult:
    opened: int = 0
    resumed: int = 0  # handshakes that resumed the offered session
    errors: int = 0
    seconds: float = 0.0
    error_samples: list[str] = field(default_factory=list)


@dataclass
class CheckResult:
    served: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


class IdleConnections:
    """``count`` keep-alive TLS connections to ``target``, held open until :meth:`close`."""

    def __init__(self, target: Target, tail: str, count: int, *, threads: int = 8,
                 timeout: float = 20.0, deadline: float = 90.0) -> None:
        self.target = target
        self.count = count
        self.threads = max(1, min(threads, count))
        self.timeout = timeout
        self.deadline = deadline
        self.ctx = ssl.create_default_context(cafile=str(target.ca))
        if target.client_cert is not None:
            self.ctx.load_cert_chain(str(target.client_cert), str(target.client_key))
        extra = "".join(f"{h}\r\n" for h in target.headers)
        self.request = (f"GET {target.path(tail)} HTTP/1.1\r\nHost: {target.host}\r\n"
                        f"User-Agent: bench-idle\r\n{extra}\r\n").encode()
        self.socks: list[ssl.SSLSocket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "IdleConnections":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _note(self, res: OpenResult | CheckResult, exc: BaseException) -> None:
        res.errors += 1
        if len(res.error_samples) < 5:
            res.error_samples.append(f"{type(exc).__name__}: {exc}"[:200])

    def open(self) -> OpenResult:
        """Opens the connections (one request each); bounded by ``deadline`` seconds."""
        raise_nofile(self.count + 1024)
        res = OpenResult()
        t0 = time.monotonic()
        stop_at = t0 + self.deadline
        shares = [self.count // self.threads + (1 if i < self.count % self.threads else 0)
                  for i in range(self.threads)]

        def worker(n: int) -> None:
            session: ssl.SSLSession | None = None
            for _ in range(n):
                if time.monotonic() >= stop_at:
                    return
                raw = None
                try:
                    raw = socket.create_connection(self.target.address, timeout=self.timeout)
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock = self.ctx.wrap_socket(raw, server_hostname=self.target.host, session=session)
                    sock.sendall(self.request)
                    _read_response(sock)
                except (OSError, ValueError) as exc:
                    if raw is not None:
                        raw.close()
                    with self._lock:
                        self._note(res, exc)
                    session = None
                    continue
                # The session (TLS 1.3: the ticket that came after the handshake) for the next one.
                session = sock.session
                with self._lock:
                    self.socks.append(sock)
                    res.opened += 1
                    res.resumed += 1 if sock.session_reused else 0

        self._run_threads(worker, shares, stop_at)
        res.seconds = time.monotonic() - t0
        return res

    def check(self) -> CheckResult:
        """One more request on every open connection; 2xx = served."""
        res = CheckResult()
        t0 = time.monotonic()
        stop_at = t0 + self.deadline
        with self._lock:
            socks = list(self.socks)
        parts = [socks[i::self.threads] for i in range(self.threads)]

        def worker(part: list[ssl.SSLSocket]) -> None:
            mine: list[float] = []
            for sock in part:
                if time.monotonic() >= stop_at:
                    with self._lock:
                        self._note(res, TimeoutError("not checked before the deadline"))
                    continue
                try:
                    t = time.perf_counter()
                    sock.sendall(self.request)
                    _read_response(sock)
                    mine.append((time.perf_counter() - t) * 1000.0)
                except (OSError, ValueError) as exc:
                    with self._lock:
                        self._note(res, exc)
            with self._lock:
                res.latencies_ms.extend(mine)
                res.served += len(mine)

        self._run_threads(worker, parts, stop_at)
        res.seconds = time.monotonic() - t0
        return res

    def _run_threads(self, worker: Any, shares: list[Any], stop_at: float) -> None:
        """``worker(share)`` in a daemon thread per share; joined by the deadline (+ slack)."""
        workers = [threading.Thread(target=worker, args=(share,), daemon=True) for share in shares]
        for w in workers:
            w.start()
        for w in workers:
            w.join(max(0.0, stop_at - time.monotonic()) + self.timeout + 5)

    def close(self) -> None:
        with self._lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
