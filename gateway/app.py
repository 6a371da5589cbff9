"""One gateway instance: its client listener, its tunnel endpoint, its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from cmg.cmtrace import open_log
from cmg.config import GatewayConfig

from .client_auth import ClientCertificateVerifier
from .http1 import GatewayServer
from .metrics import GatewayMetrics
from .monitoring import MonitoringServer
from .proxy import ClientRequestHandler
from .revocation import CRLStore
from .routing import ConnectorLink, Routes
from .service_log import TrafficSummary
from .token_auth import TokenAuthenticator
from .tls import StartupError, check_service_name, client_context, load_certificates, load_server_identity, tunnel_context
from .tls_transport import TLSListener, TLSServerSettings, TLSServerTransport
from .tunnel_endpoint import TunnelEndpoint


def client_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """The client listener's socket; instances on one host share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)  # TLSListener listens when the instance starts serving
    return sock


class GatewayInstance:
    """A CMG VM instance: TLS on the client port, tunnels on its own port."""

    def __init__(self, config: GatewayConfig, echo: bool = False) -> None:
        self.config = config
        suffix = f"_IN_{config.instance}" if config.instances > 1 else ""
        self.log = open_log(f"gateway.{config.instance}", config.logs_dir / f"CMGService{suffix}.log",
                            "CMGService", config.log_format, echo=echo, max_bytes=config.log_max_bytes)
        self.routes = Routes()
        self.instance_name = f"ProxyService_IN_{config.instance}"
        self.started_at = time.time()
        self.metrics = GatewayMetrics(config.instance)
        self.known_connection_points: set[str] = set()
        self.monitoring: MonitoringServer | None = None
        self._server: TLSListener | None = None
        self._web: GatewayServer | None = None
        self._summary_task: asyncio.Task[None] | None = None
        self.summary = TrafficSummary(self.log, self.metrics)
        self.tunnels: TunnelEndpoint | None = None
        self.handler: ClientRequestHandler | None = None
        self.tokens: TokenAuthenticator | None = None
        self._connections: set[TLSServerTransport] = set()
        self._all_connections_closed: asyncio.Event | None = None  # while stop() waits for it
        self._first_connection_point = asyncio.Event()
        self._stopping = False
        self._listening: asyncio.Future[None] | None = None
        self._refused_connections = 0

    async def start(self) -> None:
        cfg = self.config
        identity = load_server_identity(cfg.tls)
        check_service_name(identity, cfg.service_name)
        roots = load_certificates(cfg.tls.trusted_client_roots)
        auth = cfg.client_auth
        crls = CRLStore(auth.crl_files) if auth.verify_revocation else None
        if crls is not None:
            for problem in crls.problems.values():
                self.log.warning("Client certificate revocation: %s", problem)
        verifier = ClientCertificateVerifier(roots, crls, refuse_unknown=auth.crl_unavailable == "refuse",
                                             log=self.log)
        self.tokens = TokenAuthenticator(auth, self.log)
        await self.tokens.start()
        ctx = client_context(identity, roots, cfg.enforce_tls12)

        site_crls = CRLStore((cfg.tls.connection_point_ca.with_name("site-ca.crl"),)) if auth.verify_revocation else None
        self.tunnels = TunnelEndpoint(cfg, self.routes, tunnel_context(cfg.tls), self.log, site_crls,
                                      on_connect=self._connection_point_connected,
                                      before_welcome=self._serve_clients)
        await self.tunnels.start()

        self.handler = ClientRequestHandler(cfg, self.routes, verifier, self.tokens, self.summary, self.log)
        # handler_cancellation: a client that goes away cancels its request, so its
        # stream is reset towards the connection point at once (a held BGB poll too).
        self._web = GatewayServer(self.handler, header_timeout=cfg.client_header_timeout, log=self.log,
                                  keepalive_timeout=120, max_field_size=16384)
        sock = client_socket(cfg.bind, cfg.client_port, reuse_port=True)
        settings = TLSServerSettings(ctx, self._web, send_timeout=cfg.client_send_timeout, log=self.log,
                                     on_lost=self._connection_lost)
        # Bound now (the port is ours), listening only once a connection point serves this
        # instance, or after listen_grace: with several instances on one port, a
        # restarted instance must not take clients it can only answer with 503.
        self._server = TLSListener(sock, lambda s, peer: self._client_connection(settings, s, peer),
                                   backlog=4096, log=self.log)
        if cfg.listen_grace > 0:
            self._listening = asyncio.ensure_future(self._start_serving())
        else:
            await self._server.start_serving()
        self.metrics.watch(self.routes, self.handler)
        self.monitoring = MonitoringServer(self)
        await self.monitoring.start()
        self._summary_task = asyncio.ensure_future(self._summaries())
        self.log.info(
            "CMG %s instance %s started: clients on %s:%d (TLS %s), tunnels on %s:%d; client "
            "certificate revocation check %s; Entra ID tenant %s",
            cfg.service_name, self.tunnels.instance_name, cfg.bind, self.client_port,
            "1.2 minimum" if cfg.enforce_tls12 else "1.0 minimum", cfg.bind, self.tunnels.port,
            "on" if auth.verify_revocation else "off",
            auth.entra.tenant_id if auth.entra.enabled else "not enabled",
        )

    async def _start_serving(self) -> None:
        try:
            await asyncio.wait_for(self._first_connection_point.wait(), self.config.listen_grace)
        except asyncio.TimeoutError:
            self.log.warning("No connection point after %.0f s: taking clients anyway (they will get 503 "
                             "until one connects)", self.config.listen_grace)
        await self._serve_clients()

    async def _serve_clients(self) -> None:
        """Open the client listener (once): before the first connection point is welcomed."""
        self._first_connection_point.set()
        if self._server is None or self._server.is_serving() or self._stopping:
            return
        await self._server.start_serving()
        self.log.info("Taking client connections on %s:%d", self.config.bind, self.client_port)

    def _connection_point_connected(self, link: ConnectorLink) -> None:
        self.known_connection_points.add(link.name)
        self.metrics.tunnel_connects.labels(str(self.config.instance), link.name).inc()

    def _client_connection(self, settings: TLSServerSettings, sock: socket.socket,
                           peer: object) -> TLSServerTransport | None:
        """A new client connection, or a closed door (None) once max_connections are open."""
        if len(self._connections) >= self.config.max_connections:
            self._refused_connections += 1
            if self._refused_connections in (1, 10, 100) or self._refused_connections % 1000 == 0:
                self.log.warning("Connection limit %d reached: %d connections refused so far",
                                 self.config.max_connections, self._refused_connections)
            return None
        conn = TLSServerTransport(settings, sock, peer)
        self._connections.add(conn)
        return conn

    def _connection_lost(self, conn: TLSServerTransport) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_connections_closed is not None:
            self._all_connections_closed.set()

    @property
    def client_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(self.config.traffic_summary_interval)
            self.summary.flush()

    async def _connections_sent(self, deadline: float) -> None:
        """A finished response may still sit in its connection's send buffer while the
        client reads it: each closing connection sends what is queued, then closes. Wait
        for that (within the drain budget, at least a second) before the process leaves,
        or the end of the response is lost."""
        if not self._connections:
            return
        self._all_connections_closed = asyncio.Event()
        for conn in list(self._connections):
            conn.close()  # graceful: what is queued goes first, then close_notify
        timeout = max(1.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self._all_connections_closed.wait(), timeout)
        except asyncio.TimeoutError:
            self.log.warning("Drain timeout: %d client connections still sending their response; closed",
                             len(self._connections))
            for conn in list(self._connections):
                conn.abort()

    async def stop(self, drain: bool = True) -> None:
        """Drain: take no new connections, close idle keep-alive ones and let busy ones
        close after their response, finish what is in flight (up to drain_timeout), then
        leave. The tunnels stay usable until the end, so nothing in flight gets a 503."""
        cfg = self.config
        self._stopping = True
        deadline = asyncio.get_running_loop().time() + cfg.drain_timeout
        if self._listening is not None:
            self._listening.cancel()
        if self._server is not None:
            self._server.close()
        if self._web is not None:
            self._web.pre_shutdown()
        if drain and self.handler is not None and self.handler.in_flight:
            self.log.info("Draining %d in-flight requests (up to %.0f s)", self.handler.in_flight,
                          cfg.drain_timeout)
            try:
                await asyncio.wait_for(self.handler.idle.wait(), cfg.drain_timeout)
            except asyncio.TimeoutError:
                self.log.warning("Drain timeout: %d requests still in flight", self.handler.in_flight)
                for line in self.handler.describe_in_flight():
                    self.log.warning("Still in flight: %s", line)
        if self.tunnels is not None:
            await self.tunnels.drain()
        if self._web is not None:
            await self._web.shutdown(timeout=1.0)
        if drain:
            await self._connections_sent(deadline)
        if self.tunnels is not None:
            await self.tunnels.close()
        if self.tokens is not None:
            await self.tokens.close()
        if self.monitoring is not None:
            await self.monitoring.close()
        if self._summary_task is not None:
            self._summary_task.cancel()
        self.summary.flush()
        self.log.info("CMG instance %d stopped", cfg.instance)
        for h in list(self.log.handlers):
            h.flush()
