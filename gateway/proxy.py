"""The client-facing request handler: authenticate, filter, stream through a tunnel.

One request: parse the CMG path, authenticate the client by the method the path
demands, check the role and endpoint against what connected connection points
publish, open a stream on the next connection point's tunnel (round-robin), and
pump the bodies both ways under the tunnel's flow control. Nothing unauthenticated
or unpublished is ever written to a tunnel.

A request without a body (most of a client's: policy, content, location requests) is an
:class:`_Exchange` driven by callbacks; on a MutualAuth path it is taken without a task
at all (``begin``), and a task is made only when its response is to be streamed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import os
from collections.abc import Awaitable, Callable
from xml.sax.saxutils import escape

from cmg.config import GatewayConfig
from cmg.tokens import TokenError
from tunnel import (
    DrainingError,
    ErrorCode,
    StreamResetError,
    TooManyStreamsError,
    TunnelClosedError,
    TunnelStream,
)

from . import errors
from .http1 import ClientRequest, Response, StreamedResponse, WholeResponse, close_awaitable
from .client_auth import ClientCertificateCheck, ClientCertificateVerifier, ClientIdentity, Verdict
from cmg.paths import Channel, ClientPath, parse_client_path
from .routing import ConnectorLink, Routes
from .service_log import TrafficSummary
from .token_auth import TokenAuthenticator, TokenIdentity

# Headers that belong to one hop and never cross the tunnel.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"proxy-connection",
})
# The gateway's own headers to the site: a client can never set them itself.
IDENTITY_PREFIX = b"x-cmg-"
HDR_THUMBPRINT = b"X-CMG-Client-Certificate-Thumbprint"
HDR_SUBJECT = b"X-CMG-Client-Certificate-Subject"
HDR_AUTH = b"X-CMG-Client-Auth"
HDR_TOKEN_SUBJECT = b"X-CMG-Token-Subject"
HDR_TOKEN_TENANT = b"X-CMG-Token-Tenant"
HDR_MESSAGE_ID = b"X-CMG-Message-Id"
HDR_CLIENT_IP = b"X-CMG-Client-IP"

#: How many distinct header names the per-name caches below keep (clients choose names).
NAME_CACHE_SIZE = 1024


class _HeaderNames:
    """Whether a header name, as a peer spelled it, is relayed; memoised, since the same
    few names come with every request."""

    def __init__(self, dropped: frozenset[bytes]) -> None:
        self._dropped = dropped
        self._names: dict[bytes, bool] = {}
        self.get = self._names.get

    def add(self, name: bytes) -> bool:
        relayed = name.lower() not in self._dropped
        if len(self._names) < NAME_CACHE_SIZE:
            self._names[name] = relayed
        return relayed


# Response header names relayed when the response is streamed, and when it arrived whole
# (WholeResponse writes Content-Length from the body; only whether a name is relayed counts).
_STREAMED_NAMES = _HeaderNames(HOP_BY_HOP)
_WHOLE_NAMES = _HeaderNames(HOP_BY_HOP | {b"content-length"})
# Request header names: whether they cross the tunnel (never hop-by-hop ones, nor the
# gateway's own X-CMG-*).
_FORWARDED: dict[bytes, bool] = {}


def _forwarded(name: bytes) -> bool:
    lower = name.lower()
    forward = lower not in HOP_BY_HOP and not lower.startswith(IDENTITY_PREFIX)
    if len(_FORWARDED) < NAME_CACHE_SIZE:
        _FORWARDED[name] = forward
    return forward


CHECK_KEY = "cmg_client_check"
# Methods a client may send twice without harm: replayed on another connection point
# when a tunnel dies before answering. Never CCM_POST or BITS_POST.
SAFE_METHODS = frozenset({"GET", "HEAD", "PROPFIND", "OPTIONS"})
# Responses that never have a body (their Content-Length, if any, describes another).
NO_BODY_STATUSES = frozenset({204, 304})


# Random hex digits for message ids, read from the OS 4 KiB at a time (one getrandom
# call per 128 ids instead of one per id).
_random_hex = ""
_random_pos = 0
# The GUID variant digit (10xx in binary) from any random hex digit.
_VARIANT_DIGIT = {c: "89AB"[int(c, 16) & 3] for c in "0123456789ABCDEF"}


def _forget_random_hex() -> None:  # a forked child must not reuse its parent's digits
    global _random_hex, _random_pos
    _random_hex, _random_pos = "", 0


os.register_at_fork(after_in_child=_forget_random_hex)


def new_message_id() -> str:
    """A ConfigMgr-style message id: a random (version 4) GUID in braces, upper case."""
    global _random_hex, _random_pos
    pos = _random_pos
    if pos >= len(_random_hex):
        _random_hex = os.urandom(4096).hex().upper()
        pos = 0
    _random_pos = pos + 32
    x = _random_hex[pos:pos + 32]
    return f"{{{x[:8]}-{x[8:12]}-4{x[13:16]}-{_VARIANT_DIGIT[x[16]]}{x[17:20]}-{x[20:]}}}"


def _await_chain(task: asyncio.Task[object] | None) -> str:
    """Where a task waits: its chain of awaited coroutines, outermost first."""
    parts: list[str] = []
    awaited: object = task.get_coro() if task is not None else None
    while awaited is not None and len(parts) < 20:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            parts.append(type(awaited).__name__)
            break
        parts.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " > ".join(parts) or "?"


def _error_for(code: ErrorCode) -> errors.CMGError:
    """The CMG's answer when a connection point reset a stream before the response head."""
    return errors.GATEWAY_TIMEOUT if code is ErrorCode.TIMEOUT else errors.BAD_GATEWAY


class ClientRequestHandler:
    """The gateway's HTTP/1.1 layer (gateway/http1.py) calls this once per client request, in
    a task of its own: a client that goes away cancels it."""

    def __init__(self, config: GatewayConfig, routes: Routes, verifier: ClientCertificateVerifier,
                 tokens: TokenAuthenticator, summary: TrafficSummary, log: logging.Logger) -> None:
        self._tokens = tokens
        self._config = config
        self._routes = routes
        self._verifier = verifier
        self._summary = summary
        self._log = log
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # The requests in flight, by their task (or their _Exchange when taken without a
        # task): what a drain that times out reports.
        self._requests: dict[object, tuple[str, str, float]] = {}
        self._instance_name = f"ProxyService_IN_{config.instance}"

    async def __call__(self, request: ClientRequest) -> Response:
        start = time.monotonic()
        task = asyncio.current_task()
        self._track(task, request, start)
        try:
            return await self._handle(request, start)
        finally:
            self._untrack(task)

    def begin(self, request: ClientRequest) -> bool:
        """The common exchange without a task (gateway/http1.py ``GatewayServer.begin``): a
        request without a body, on a MutualAuth path of a published endpoint, from a client
        whose certificate passed. True when taken: the answer comes through
        ``request.respond``. Anything else (a refusal, a token, a body) goes the way of
        ``__call__``, which gives the same answer for these."""
        if request.body_exists:
            return False
        cp = parse_client_path(request.raw_path)
        if cp is None or cp.role_id is None or cp.channel is not Channel.MUTUAL_AUTH or cp.malformed:
            return False
        check = self._client_check(request)
        identity = check.identity
        if check.verdict is not Verdict.TRUSTED or identity is None:
            return False
        if not self._routes.is_known(cp.role_id, cp.resource):
            return False
        start = time.monotonic()
        exchange = _Exchange(self, request, cp, identity, start, request.respond)
        self._track(exchange, request, start)
        request.on_abandon = exchange.abandon
        exchange.start()
        return True

    def _track(self, key: object, request: ClientRequest, start: float) -> None:
        self.in_flight += 1
        self.idle.clear()
        self._requests[key] = (request.method, request.raw_path, start)

    def _untrack(self, key: object) -> None:
        if self._requests.pop(key, None) is None:
            return  # once per request, however it ended
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    def describe_in_flight(self) -> list[str]:
        """One line per request in flight: method, path, age, and where it waits."""
        now = time.monotonic()
        return [f"{method} {path[:200]} for {now - start:.1f} s, waiting in "
                f"{key.waiting_in() if isinstance(key, _Exchange) else _await_chain(key)}"  # type: ignore[arg-type]
                for key, (method, path, start) in list(self._requests.items())]

    async def _handle(self, request: ClientRequest, start: float) -> Response:
        raw_path = request.raw_path
        cp = parse_client_path(raw_path)
        if cp is None:
            return self._refuse(request, errors.ENDPOINT_NOT_FOUND, "not a CMG path")

        identity: ClientIdentity | TokenIdentity | None = None
        if cp.role_id is None:
            return self._service_endpoint(request, cp)
        if cp.channel is Channel.MUTUAL_AUTH:
            outcome = self._authenticate_certificate(request)
            if isinstance(outcome, WholeResponse):
                return outcome
            identity = outcome
        else:
            authorization = request.header("Authorization") or ""
            if not authorization:
                return self._refuse(request, errors.UNAUTHORIZED, "no Authorization header on a ServerAuth path")
            try:
                identity = await self._tokens.authenticate(authorization, cp.resource)
            except TokenError as exc:
                return self._refuse(request, errors.INVALID_TOKEN, exc.reason)

        if cp.malformed:
            return self._refuse(request, errors.BAD_REQUEST, "dot segments or backslashes in the path")

        if not self._routes.is_known(cp.role_id, cp.resource):
            if not self._routes.ever_connected:
                return self._refuse(request, errors.SERVICE_UNAVAILABLE,
                                    "no connection point has connected to this instance yet")
            return self._refuse(request, errors.ENDPOINT_NOT_FOUND,
                                f"role {cp.role_id} endpoint '{cp.resource}' is not published")

        length = request.content_length
        if length is not None and length > self._config.max_request_body:
            return self._refuse(request, errors.REQUEST_TOO_LARGE,
                                f"Content-Length {length} is over {self._config.max_request_body}")
        return await self._forward(request, cp, identity, start)

    # --- authentication ---

    def _authenticate_certificate(self, request: ClientRequest) -> ClientIdentity | WholeResponse:
        """The client's validated identity, or the CMG's refusal."""
        check = self._client_check(request)
        if check.verdict is Verdict.NO_CERTIFICATE:
            return self._refuse(request, errors.CLIENT_CERTIFICATE_REQUIRED, check.reason)
        if check.verdict is Verdict.REJECTED or check.identity is None:
            return self._refuse(request, errors.FORBIDDEN, check.reason)
        return check.identity

    def _client_check(self, request: ClientRequest) -> ClientCertificateCheck:
        transport = request.transport
        if transport is None:
            return ClientCertificateCheck(Verdict.NO_CERTIFICATE, reason="connection closed")
        check: ClientCertificateCheck | None = transport.get_extra_info(CHECK_KEY)
        if check is None:
            chain = transport.get_extra_info("peercert_chain") or ()
            check = self._verifier.check(chain)
            set_extra = getattr(transport, "set_extra", None)
            if set_extra is not None:
                set_extra(CHECK_KEY, check)
        return check

    # --- forwarding ---

    def _request_headers(self, request: ClientRequest, identity: ClientIdentity | TokenIdentity | None,
                         message_id: str) -> list[tuple[bytes, bytes]]:
        forwarded = _FORWARDED.get
        headers = []
        for k, v in request.raw_headers:
            forward = forwarded(k)
            if forward is None:
                forward = _forwarded(k)
            if forward:
                headers.append((k, v))
        connection_tokens = {t for t in request.connection if t}
        if connection_tokens:
            # The headers the Connection header names belong to this hop too.
            headers = [(k, v) for k, v in headers if k.lower() not in connection_tokens]
        headers.append((HDR_MESSAGE_ID, message_id.encode()))
        peer = request.remote
        if peer:
            headers.append((HDR_CLIENT_IP, peer.encode("latin-1")))
        if isinstance(identity, ClientIdentity):
            headers.append((HDR_AUTH, b"MutualAuth"))
            headers.append((HDR_THUMBPRINT, identity.thumbprint.encode()))
            headers.append((HDR_SUBJECT, identity.subject.encode("utf-8", "replace")))
        elif isinstance(identity, TokenIdentity):
            headers.append((HDR_AUTH, identity.auth.encode()))
            headers.append((HDR_TOKEN_SUBJECT, identity.subject.encode("utf-8", "replace")))
            if identity.tenant:
                headers.append((HDR_TOKEN_TENANT, identity.tenant.encode("utf-8", "replace")))
        return headers

    async def _forward(self, request: ClientRequest, cp: ClientPath,
                       identity: ClientIdentity | TokenIdentity | None, start: float) -> Response:
        assert cp.role_id is not None
        if not request.body_exists:
            # The exchange of begin(), awaited here (after a token was checked, say).
            answer: asyncio.Future[WholeResponse | Awaitable[Response]] = \
                asyncio.get_running_loop().create_future()

            def deliver(result: WholeResponse | Awaitable[Response]) -> None:
                if not answer.done():
                    answer.set_result(result)

            exchange = _Exchange(self, request, cp, identity, start, deliver)
            exchange.start()
            try:
                result = await answer
            except BaseException:  # cancelled: the client went away
                exchange.abandon()
                if answer.done() and not answer.cancelled():
                    close_awaitable(answer.result())
                raise
            return result if isinstance(result, WholeResponse) else await result
        message_id = new_message_id()
        headers = self._request_headers(request, identity, message_id)
        target = request.raw_path
        timeout = self._config.response_timeout
        stream: TunnelStream | None = None
        link: ConnectorLink | None = None
        for candidate in self._routes.candidates(cp.role_id):
            try:
                # A request with a body waits until its head left for the tunnel: one
                # whose tunnel died before that goes to the next connection point, its
                # body still unread.
                stream = await candidate.session.open_stream(request.method, target, headers, wait_sent=True)
            except (DrainingError, TooManyStreamsError, TunnelClosedError) as exc:
                self._log.info("Connection point %s cannot take message %s: %s",
                               candidate.name, message_id, exc.__class__.__name__)
                continue
            link = candidate
            break
        if stream is None or link is None:
            return self._refuse(request, errors.SERVICE_UNAVAILABLE,
                                f"no connection point can take role {cp.role_id} now")

        link.active_requests += 1
        sent = [0]
        upload = asyncio.ensure_future(self._pump_request(request, stream, sent))
        try:
            head = await self._response_head(stream, upload, sent, timeout)
        except TimeoutError:
            upload.cancel()
            stream.reset(ErrorCode.CANCEL, "no response head in time")
            link.active_requests -= 1
            return self._failed(request, cp, start, errors.GATEWAY_TIMEOUT,
                                f"no answer to message {message_id} from {link.name} within {timeout:g} s "
                                "of its last request byte", link, sent[0])
        except (StreamResetError, TunnelClosedError) as exc:
            upload.cancel()
            link.active_requests -= 1
            code = exc.code if isinstance(exc, StreamResetError) else ErrorCode.INTERNAL_ERROR
            return self._failed(request, cp, start, _error_for(code),
                                f"message {message_id} to {link.name} failed after {sent[0]} request bytes: {exc}",
                                link, sent[0])
        except BaseException:
            upload.cancel()
            stream.reset(ErrorCode.CANCEL, "client went away")
            link.active_requests -= 1
            raise
        link.active_requests -= 1
        return await self._relay(request, cp, link, stream, upload, head, start, sent)

    @staticmethod
    async def _response_head(stream: TunnelStream, upload: asyncio.Future[None], sent: list[int],
                             timeout: float) -> object:
        """The response head; TimeoutError when none came within ``timeout`` of the last
        request byte (a bound of last resort: no request waits forever)."""
        while True:
            before = sent[0]
            try:
                return await stream.response(timeout)
            except TimeoutError:
                if not upload.done() and sent[0] != before:
                    continue  # the request body is still flowing: the clock starts again
                raise

    def _whole(self, request: ClientRequest, cp: ClientPath, link: ConnectorLink, stream: TunnelStream,
               head: object, start: float, sent: int) -> WholeResponse | None:
        """The answer when the whole response is here already (a small one, usually),
        written with its head in one go; None when its body is to be streamed."""
        status: int = head.status  # type: ignore[attr-defined]
        if status in NO_BODY_STATUSES or request.method == "HEAD":
            return None
        body = stream.buffered_body()
        if body is None:
            return None
        known = _WHOLE_NAMES.get
        headers = []
        for k, v in head.headers:  # type: ignore[attr-defined]
            relayed = known(k)
            if relayed is None:
                relayed = _WHOLE_NAMES.add(k)
            if relayed:
                headers.append((k, v))
        role_id = cp.role_id
        assert role_id is not None
        size = len(body)

        def account() -> None:  # once written: off the response's path
            link.account(role_id, status < 500, sent, size)
            self._summary.record(request.path, sent, size, (time.monotonic() - start) * 1000)

        return WholeResponse(status, head.reason, headers, body, account)  # type: ignore[attr-defined]

    async def _relay(self, request: ClientRequest, cp: ClientPath, link: ConnectorLink,
                     stream: TunnelStream, upload: asyncio.Future[None] | None, head: object,
                     start: float, sent: list[int] | int) -> Response:
        status: int = head.status  # type: ignore[attr-defined]
        if upload is None or upload.done():
            whole = self._whole(request, cp, link, stream, head, start, sent[0] if isinstance(sent, list) else sent)
            if whole is not None:
                return whole
        streamed = []
        for k, v in head.headers:  # type: ignore[attr-defined]
            relayed = _STREAMED_NAMES.get(k)
            if relayed is None:
                relayed = _STREAMED_NAMES.add(k)
            if relayed:
                streamed.append((k, v))
        resp = StreamedResponse(status, head.reason, streamed)  # type: ignore[attr-defined]
        received = 0
        complete = ended = False
        try:
            await resp.prepare(request)
            while True:
                try:
                    chunk = await stream.read(self._config.response_timeout)
                except TimeoutError:
                    # Mid-body silence this long: a bound of last resort (the connection
                    # point's own request_timeout normally comes first).
                    self._log.warning("Response for %s from %s stalled after %d bytes for %g s; connection closed",
                                      cp.internal.partition("?")[0], link.name, received,
                                      self._config.response_timeout)
                    stream.reset(ErrorCode.CANCEL, "response stalled")
                    self._abort(request)  # never ended as if complete
                    break
                if not chunk:
                    ended = True
                    break
                received += len(chunk)
                await resp.write(chunk)
            if ended:
                await resp.write_eof()
                complete = True
        except (StreamResetError, TunnelClosedError) as exc:
            # The head is gone already: cut the client off so a truncated body is never
            # taken for a complete one.
            self._log.warning("Response for %s from %s broke after %d bytes: %s",
                              cp.internal.partition("?")[0], link.name, received, exc)
            self._abort(request)
        except (ConnectionError, asyncio.CancelledError):
            stream.reset(ErrorCode.CANCEL, "client went away")
            raise
        finally:
            if not complete:
                # Whatever ended the relay early (the client, a write error of any kind): an
                # open stream would hold the tunnel's credit for good. A no-op once closed.
                stream.reset(ErrorCode.CANCEL, "response not relayed")
            if upload is not None and not upload.done():
                upload.cancel()
                stream.reset(ErrorCode.CANCEL, "response complete before the request body")
            nsent = sent[0] if isinstance(sent, list) else sent
            assert cp.role_id is not None
            link.account(cp.role_id, complete and head.status < 500, nsent, received)  # type: ignore[attr-defined]
        self._summary.record(request.path, nsent, received, (time.monotonic() - start) * 1000)
        return resp

    async def _pump_request(self, request: ClientRequest, stream: TunnelStream, sent: list[int]) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._config.client_body_timeout
        stalled = [False]

        def stall() -> None:  # the client paused its body too long: cut it off
            stalled[0] = True
            self._log.info("Request body broke off after %d bytes: stalled for %.0f s", sent[0], timeout)
            stream.reset(ErrorCode.CANCEL, "client request body incomplete")
            self._abort(request)

        timer = loop.call_later(timeout, stall)
        content = request.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                timer.cancel()
                await stream.write(chunk)
                sent[0] += len(chunk)
                timer = loop.call_later(timeout, stall)
            timer.cancel()
            await stream.end()
        except (StreamResetError, TunnelClosedError):
            return  # the response side reports it
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client's body broke off: never let a short upload look complete
            if not stalled[0]:  # stall() has said so and reset the stream already
                self._log.info("Request body broke off after %d bytes: %s", sent[0], exc.__class__.__name__)
                stream.reset(ErrorCode.CANCEL, "client request body incomplete")
        finally:
            timer.cancel()

    # --- answers of the gateway's own ---

    def _refuse(self, request: ClientRequest, error: errors.CMGError, why: str) -> WholeResponse:
        self._log.warning("%s %s refused with %d %s: %s (client %s)", request.method,
                          request.raw_path[:300], error.status, error.name, why, request.remote)
        self._summary.refused(error.name)
        return error.response()

    def _failed(self, request: ClientRequest, cp: ClientPath, start: float, error: errors.CMGError,
                why: str, link: ConnectorLink | None = None, sent: int = 0) -> WholeResponse:
        if link is not None and cp.role_id is not None:
            link.account(cp.role_id, False, sent, 0)
        self._summary.record(request.path, sent, None, (time.monotonic() - start) * 1000)
        return self._refuse(request, error, why)

    @staticmethod
    def _abort(request: ClientRequest) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    def _service_endpoint(self, request: ClientRequest, cp: ClientPath) -> WholeResponse:
        """The CMG's own endpoints, without a role id."""
        name = cp.resource.lower()
        if request.method not in ("GET", "HEAD"):
            return self._refuse(request, errors.ENDPOINT_NOT_FOUND, f"{request.method} on {cp.resource}")
        if name == "servicemetadata":
            if cp.channel is Channel.MUTUAL_AUTH:
                outcome = self._authenticate_certificate(request)
                if isinstance(outcome, WholeResponse):
                    return outcome
            return self._service_metadata(cp)
        if name == "aadauthinfo" and cp.channel is Channel.SERVER_AUTH:
            tenant = request.query.get("TenantID") or request.query.get("tenantid") or ""
            info = self._tokens.aad_auth_info(tenant)
            if info is None:
                return self._refuse(request, errors.ENDPOINT_NOT_FOUND, f"tenant {tenant[:64]!r} is not onboarded")
            body = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in info.items())
            return _xml(f'<?xml version="1.0" encoding="utf-8"?><AADAuthInfo>{body}</AADAuthInfo>')
        return self._refuse(request, errors.ENDPOINT_NOT_FOUND, f"no role id in {request.raw_path[:200]}")

    def _service_metadata(self, cp: ClientPath) -> WholeResponse:
        roles = "".join(
            f'<Role RoleID="{r.role_id}" Kind="{escape(r.kind)}" Name="{escape(r.name)}"/>'
            for r in self._routes.published_roles()
        )
        body = (
            '<?xml version="1.0" encoding="utf-8"?>'
            f'<ServiceMetadata Channel="{cp.channel.value}">'
            f"<ServiceName>{escape(self._config.service_name)}</ServiceName>"
            f"<SiteCode>{escape(self._config.site_code)}</SiteCode>"
            f"<Instance>{self._instance_name}</Instance>"
            f"<Roles>{roles}</Roles></ServiceMetadata>"
        )
        return _xml(body)


class _Exchange:
    """A request without a body through a tunnel, driven by callbacks: no task, no
    coroutine, until its answer is known (or turns out to be a streamed one).

    It goes to the next connection point when one refused it unprocessed
    (REFUSED_STREAM), or when its tunnel died before any answer and the request is safe to
    replay (a GET) or never left (its head was not sent). ``deliver`` gets the answer
    once: a WholeResponse, or a coroutine that streams a larger response.
    """

    __slots__ = ("handler", "request", "cp", "began", "deliver", "message_id", "headers", "safe",
                 "candidates", "link", "stream", "over", "starting")

    def __init__(self, handler: ClientRequestHandler, request: ClientRequest, cp: ClientPath,
                 identity: ClientIdentity | TokenIdentity | None, start: float,
                 deliver: Callable[[WholeResponse | Awaitable[Response]], None]) -> None:
        assert cp.role_id is not None
        self.handler = handler
        self.request = request
        self.cp = cp
        self.began = start
        self.deliver = deliver
        self.message_id = new_message_id()
        self.headers = handler._request_headers(request, identity, self.message_id)
        self.safe = request.method in SAFE_METHODS
        self.candidates = iter(handler._routes.candidates(cp.role_id))
        self.link: ConnectorLink | None = None
        self.stream: TunnelStream | None = None
        self.over = False
        self.starting = False

    def start(self) -> None:
        self.starting = True  # an answer known at once is delivered from the loop
        try:
            self._next()
        finally:
            self.starting = False

    def waiting_in(self) -> str:
        link = self.link
        return f"_Exchange: the response head of message {self.message_id} from {link.name if link else '?'}"

    def abandon(self) -> None:
        """The client went away: reset the stream, or the answer is buffered here unread
        and its credit never returned."""
        self.over = True
        self.handler._untrack(self)  # when begin() tracked it; a no-op otherwise
        if self.stream is not None:
            self.stream.reset(ErrorCode.CANCEL, "client went away")

    def _next(self) -> None:
        handler, request = self.handler, self.request
        for candidate in self.candidates:
            try:
                stream = candidate.session.open_stream_now(request.method, request.raw_path, self.headers)
            except (DrainingError, TooManyStreamsError, TunnelClosedError) as exc:
                handler._log.info("Connection point %s cannot take message %s: %s",
                                  candidate.name, self.message_id, exc.__class__.__name__)
                continue
            self.link, self.stream = candidate, stream
            stream.when_answered(self._answered, handler._config.response_timeout)
            return
        self.link = self.stream = None
        self._finish(handler._refuse(request, errors.SERVICE_UNAVAILABLE,
                                     f"no connection point can take role {self.cp.role_id} now"))

    async def _relayed(self, relay: Awaitable[Response]) -> Response:
        try:
            return await relay
        finally:
            self.handler._untrack(self)

    def _answered(self, timed_out: bool) -> None:
        stream, link = self.stream, self.link
        if self.over or stream is None or link is None:
            return
        handler, request, cp, message_id = self.handler, self.request, self.cp, self.message_id
        if timed_out:
            timeout = handler._config.response_timeout
            stream.reset(ErrorCode.CANCEL, "no response head in time")
            self._finish(handler._failed(request, cp, self.began, errors.GATEWAY_TIMEOUT,
                                         f"no answer to message {message_id} from {link.name} "
                                         f"within {timeout:g} s", link))
            return
        try:
            head = stream.response_now()
        except StreamResetError as exc:
            if exc.code is ErrorCode.REFUSED_STREAM:
                handler._log.info("Connection point %s refused message %s; trying the next", link.name, message_id)
                self._next()
                return
            self._finish(handler._failed(request, cp, self.began, _error_for(exc.code),
                                         f"message {message_id} reset by {link.name}: {exc}", link))
            return
        except TunnelClosedError:
            if self.safe or not stream.head_sent:
                handler._log.info("Tunnel to %s closed before message %s was answered; trying the next",
                                  link.name, message_id)
                self._next()
                return
            self._finish(handler._failed(request, cp, self.began, errors.BAD_GATEWAY,
                                         f"tunnel to {link.name} closed during message {message_id}", link))
            return
        whole = handler._whole(request, cp, link, stream, head, self.began, 0)
        self._finish(whole if whole is not None else
                     handler._relay(request, cp, link, stream, None, head, self.began, 0))

    def _finish(self, result: WholeResponse | Awaitable[Response]) -> None:
        self.over = True
        if isinstance(result, WholeResponse):
            self.handler._untrack(self)
        else:  # in flight until the streamed response is relayed
            result = self._relayed(result)
        if self.starting:
            asyncio.get_running_loop().call_soon(self.deliver, result)
        else:
            self.deliver(result)


def _xml(text: str) -> WholeResponse:
    return WholeResponse(200, "OK", [(b"Content-Type", b"text/xml; charset=utf-8")], text.encode())
