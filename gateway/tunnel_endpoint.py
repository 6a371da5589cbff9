"""The instance's tunnel endpoint: where connection points dial in.

Mutual TLS (site CA only, see gateway.tls), websocket subprotocol negotiation (an old
connection point gets a 400 with the reason), then the tunnel handshake: the
connection point's hello must name the site this CMG serves and the name on its
certificate. Only then are its published roles routed to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Awaitable, Callable
from http import HTTPStatus

from cryptography import x509
from cryptography.x509.oid import NameOID
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from cmg.config import GatewayConfig
from tunnel import (
    ErrorCode,
    PublishedRole,
    Role,
    TunnelClosedError,
    TunnelProtocol,
    TunnelSession,
    VersionMismatch,
    negotiate,
)
from tunnel.ws import DirectServerConnection

from .revocation import CRLStore
from .routing import ConnectorLink, Routes


class TunnelEndpoint:
    """Accepts connection points' tunnels and keeps ``routes`` in step with them."""

    def __init__(self, config: GatewayConfig, routes: Routes, ssl_context: ssl.SSLContext,
                 log: logging.Logger, crls: CRLStore | None = None,
                 on_connect: Callable[[ConnectorLink], None] | None = None,
                 before_welcome: Callable[[], Awaitable[None]] | None = None) -> None:
        self._crls = crls
        self._on_connect = on_connect
        self._before_welcome = before_welcome
        self._config = config
        self._routes = routes
        self._ssl = ssl_context
        self._log = log
        self._server: Server | None = None
        self._sessions: set[TunnelSession] = set()
        self.instance_name = f"ProxyService_IN_{config.instance}"

    async def start(self) -> None:
        lim = self._config.limits
        self._server = await serve(
            self._handle, self._config.bind, self._config.tunnel_port, ssl=self._ssl,
            process_request=self._check_version, select_subprotocol=self._select,
            compression=None, ping_interval=None, ping_timeout=None, create_connection=DirectServerConnection,
            max_size=2 * (lim.max_frame_size + lim.max_header_size) + 2**20,  # frames coalesce; a HELLO may be 1 MiB
            max_queue=64, write_limit=lim.max_frame_size * 4,
            open_timeout=lim.open_timeout, close_timeout=2.0, server_header=None, logger=self._log.getChild("ws"),
        )
        self._log.info("Tunnel endpoint of %s listening on %s:%d", self.instance_name,
                       self._config.bind, self._config.tunnel_port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _check_version(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/CMGStatus" and "upgrade" not in request.headers.get("Connection", "").lower():
            return self._status(connection)
        offered = [p.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol")
                   for p in v.split(",") if p.strip()]
        try:
            negotiate(offered)
        except VersionMismatch as exc:
            self._log.warning("Refused a tunnel from %s: %s", _peer(connection), exc.reason)
            return connection.respond(HTTPStatus.BAD_REQUEST, exc.reason + "\n")
        return None

    def _status(self, connection: ServerConnection) -> Response:
        """This instance's connection points, for the site's own tools (mutual TLS: site CA)."""
        body = {
            "instance": self.instance_name,
            "connection_points": [
                {
                    "name": link.name,
                    "site_code": link.site_code,
                    "peer": link.peer,
                    "connected_at": link.connected_at,
                    "roles": sorted(link.roles),
                    "active_requests": link.active_requests,
                    "total_requests": link.total_requests,
                    "rtt_ms": None if link.session.rtt is None else round(link.session.rtt * 1000, 3),
                    "draining": link.session.peer_draining,
                }
                for link in self._routes.links
            ],
        }
        data = json.dumps(body).encode()
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                           ("Connection", "close")])
        return Response(HTTPStatus.OK.value, "OK", headers, data)

    @staticmethod
    def _select(connection: ServerConnection, offered: object) -> str | None:
        return negotiate(list(offered))  # type: ignore[call-overload]

    async def _handle(self, ws: ServerConnection) -> None:
        peer = _peer(ws)
        cert = _peer_certificate(ws)
        cert_name = _common_name(cert)
        refusal = self._revocation_refusal(cert)
        if refusal:
            self._log.warning("Refused connection point %s at %s: %s", cert_name, peer, refusal)
            await ws.close(1008, "certificate refused")
            return
        lim = self._config.limits
        session = TunnelSession(
            TunnelProtocol(Role.GATEWAY, lim.protocol_limits()), ws,
            ping_interval=lim.ping_interval, ping_timeout=lim.ping_timeout,
            logger=self._log, name=f"{cert_name}@{peer}",
        )
        self._sessions.add(session)
        runner = asyncio.ensure_future(session.run())
        link: ConnectorLink | None = None
        try:
            try:
                await asyncio.wait_for(session.wait_hello(), lim.open_timeout)
            except (asyncio.TimeoutError, TunnelClosedError):
                self._log.warning("Connection point at %s sent no valid hello; tunnel closed (%s)",
                                  peer, session.close_reason or "timeout")
                await session.close(ErrorCode.PROTOCOL_ERROR, "no hello")
                return
            hello = session.hello
            assert hello is not None
            if hello.site_code.upper() != self._config.site_code.upper():
                self._log.warning("Refused connection point %s at %s: it serves site %s, this CMG serves %s",
                                  hello.connection_point, peer, hello.site_code, self._config.site_code)
                await session.close(ErrorCode.PROTOCOL_ERROR, "wrong site")
                return
            if hello.connection_point.lower() != cert_name.lower():
                self._log.warning("Refused connection point %s at %s: its certificate is issued to %s",
                                  hello.connection_point, peer, cert_name)
                await session.close(ErrorCode.PROTOCOL_ERROR, "certificate does not match the connection point name")
                return
            overreach = self._overreach(hello.roles)
            if overreach:
                self._log.warning("Refused connection point %s at %s: %s", hello.connection_point, peer, overreach)
                await session.close(ErrorCode.PROTOCOL_ERROR, "publishes endpoints the site does not")
                return
            if self._before_welcome is not None:
                # e.g. the instance opens its client listener: once a connection point
                # holds a WELCOME, clients can reach what it serves.
                await self._before_welcome()
            session.send_welcome(self.instance_name)
            link = ConnectorLink(
                name=hello.connection_point, site_code=hello.site_code, session=session,
                roles={r.role_id: r for r in hello.roles}, peer=peer,
            )
            self._routes.add(link)
            if self._on_connect is not None:
                self._on_connect(link)
            self._log.info(
                "Connection point %s (site %s) connected from %s to %s; published roles: %s",
                link.name, link.site_code, peer, self.instance_name,
                ", ".join(f"{r.kind} {r.role_id}" for r in hello.roles) or "none",
            )
            await runner
        finally:
            if link is not None:
                self._routes.remove(link)
                self._log.info("Connection point %s disconnected from %s: %s", link.name,
                               self.instance_name, session.close_reason or "closed")
            if not runner.done():
                runner.cancel()
            self._sessions.discard(session)

    def _overreach(self, roles: tuple[PublishedRole, ...]) -> str:
        """What a hello announces beyond the site's roles and endpoints, or ''."""
        allowed = {r.role_id: r for r in self._config.roles}
        for role in roles:
            mine = allowed.get(role.role_id)
            if mine is None:
                return f"it publishes role {role.role_id}, which is not a role of site {self._config.site_code}"
            extra = {p.lower() for p in role.paths} - {e.lower() for e in mine.endpoints}
            if extra:
                return f"it publishes endpoints {', '.join(sorted(extra))} of role {role.role_id}, which the site does not"
        return ""

    def _revocation_refusal(self, cert: x509.Certificate | None) -> str:
        """Why a connection point's certificate is refused, or '' (TLS checked the chain)."""
        if self._crls is None or cert is None:
            return ""
        site_ca = self._site_ca()
        if site_ca is None:
            return ""
        status = self._crls.status(cert, site_ca)
        if status.revoked:
            return f"its certificate {status.reason}"
        if status.unknown and self._config.client_auth.crl_unavailable == "refuse":
            return f"revocation status unknown: {status.reason}"
        if status.unknown:
            self._log.warning("Connection point certificate revocation status unknown: %s; allowed", status.reason)
        return ""

    def _site_ca(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self._config.tls.connection_point_ca.read_bytes())
        except (OSError, ValueError):
            return None

    async def drain(self) -> None:
        """Tell every connection point no new streams will come; in-flight ones go on."""
        for s in list(self._sessions):
            if not s.closed:
                await s.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=False)
        for s in list(self._sessions):
            await s.close(ErrorCode.NO_ERROR, "instance stopping")
        if self._server is not None:
            await self._server.wait_closed()


def _peer(ws: ServerConnection) -> str:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if addr else "?"


def _peer_certificate(ws: ServerConnection) -> x509.Certificate | None:
    der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def _common_name(cert: x509.Certificate | None) -> str:
    if cert is None:
        return ""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
