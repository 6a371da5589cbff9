"""The CMG connection point: outbound tunnels to every gateway instance.

It never listens. For each instance it dials ``wss://<gateway>:<10124 + i>``,
presents its site-issued certificate, announces the roles it publishes, serves the
streams the gateway opens, and redials with capped exponential backoff and jitter when
a tunnel drops.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from cmg.cmtrace import open_log
from cmg.config import ConnectionPointConfig
from tunnel import (
    SUBPROTOCOL,
    ErrorCode,
    PublishedRole,
    Role,
    TunnelClosedError,
    TunnelProtocol,
    TunnelSession,
)
from tunnel.ws import DirectClientConnection

from .backoff import backoff
from .forwarder import Forwarder
from .traffic import ConnectorTraffic
from .url_map import UrlMap


class ConnectionPoint:
    def __init__(self, config: ConnectionPointConfig, echo: bool = False,
                 status: Callable[[str, dict[str, object]], None] | None = None) -> None:
        self.config = config
        self._status = status
        self.log = open_log(f"connector.{config.name}", config.logs_dir / f"SMS_Cloud_ProxyConnector_{config.name}.log",
                            "SMS_Cloud_ProxyConnector", config.log_format, echo=echo,
                            max_bytes=config.log_max_bytes)
        self.traffic = ConnectorTraffic(config.name)
        self._monitoring: web.AppRunner | None = None
        self.monitoring_port = 0
        self.forwarder = Forwarder(UrlMap(config.service_name, config.roles), self.log, config.pool_size,
                                   config.request_timeout, self.traffic)
        self.sessions: dict[int, TunnelSession] = {}
        self.connected: dict[int, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._limits = config.limits.protocol_limits()
        self._roles = tuple(
            PublishedRole(r.role_id, r.kind, r.name, r.internal_url, r.endpoints) for r in config.roles
        )

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.config.ca_bundle))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.config.certificate), str(self.config.key))
        return ctx

    async def _start_monitoring(self) -> None:
        """/metrics, /healthz and /readyz (connected to every instance) on a loopback port."""
        self.traffic.watch(lambda: [(i, s.rtt) for i, s in sorted(self.sessions.items()) if not s.closed])

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.traffic.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "connection_point": self.config.name})

        async def readyz(request: web.Request) -> web.Response:
            up = sorted(i for i, s in self.sessions.items() if not s.closed)
            ready = len(up) == len(self.config.tunnel_ports)
            return web.json_response({"ready": ready, "connected_instances": up}, status=200 if ready else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        self._monitoring = web.AppRunner(app, access_log=None)
        await self._monitoring.setup()
        site = web.TCPSite(self._monitoring, self.config.monitoring_bind, self.config.monitoring_port,
                           reuse_address=True)
        await site.start()
        self.monitoring_port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _traffic_reports(self) -> None:
        while True:
            await asyncio.sleep(self.config.traffic_report_interval)
            self.traffic.report(self.log)

    async def start(self) -> None:
        await self._start_monitoring()
        self._tasks.append(asyncio.ensure_future(self._traffic_reports()))
        ctx = self._ssl_context()
        await self.forwarder.start()
        self.log.info("Connection point %s (site %s) starting; publishing %s", self.config.name,
                      self.config.site_code,
                      ", ".join(f"{r.kind} {r.role_id} -> {r.internal_url}" for r in self.config.roles))
        for i, port in enumerate(self.config.tunnel_ports):
            self.connected[i] = asyncio.Event()
            self._tasks.append(asyncio.ensure_future(self._maintain(i, port, ctx)))

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.connected.values())), timeout)

    async def _maintain(self, instance: int, port: int, ctx: ssl.SSLContext) -> None:
        cfg = self.config
        url = f"wss://{cfg.gateway_hosts[instance]}:{port}/CMGTunnel"
        delays = backoff(cfg.reconnect_min, cfg.reconnect_max)
        first = True
        while not self._stopping:
            if not first:
                delay = next(delays)
                self.log.info("Reconnecting to CMG instance %d in %.1f s", instance, delay)
                await asyncio.sleep(delay)
            first = False
            try:
                async with connect(
                    url, ssl=ctx, server_hostname=cfg.service_name, subprotocols=[SUBPROTOCOL],
                    compression=None, ping_interval=None, ping_timeout=None, proxy=None,
                    create_connection=DirectClientConnection,
                    max_size=2 * (cfg.limits.max_frame_size + cfg.limits.max_header_size) + 2**20,
                    max_queue=64, write_limit=cfg.limits.max_frame_size * 4,
                    open_timeout=cfg.limits.open_timeout, close_timeout=2.0, user_agent_header=None,
                ) as ws:
                    if await self._serve(instance, url, ws):
                        delays = backoff(cfg.reconnect_min, cfg.reconnect_max)
            except InvalidStatus as exc:
                body = exc.response.body.decode("utf-8", "replace").strip()
                self.log.error("CMG instance %d at %s refused the tunnel: HTTP %d %s", instance, url,
                               exc.response.status_code, body[:300])
            except (OSError, asyncio.TimeoutError, WebSocketException, TunnelClosedError) as exc:
                self.log.warning("Cannot connect to CMG instance %d at %s: %s: %s", instance, url,
                                 exc.__class__.__name__, exc)
            except asyncio.CancelledError:
                raise

    async def _serve(self, instance: int, url: str, ws: object) -> bool:
        lim = self.config.limits
        session = TunnelSession(
            TunnelProtocol(Role.CONNECTOR, self._limits), ws, ping_interval=lim.ping_interval,
            ping_timeout=lim.ping_timeout, on_request=self.forwarder.handle, logger=self.log,
            name=f"{self.config.name}->IN_{instance}",
        )
        runner = asyncio.ensure_future(session.run())
        session.send_hello(self.config.site_code, self.config.name, self._roles)
        try:
            await asyncio.wait_for(session.wait_handshake(), lim.open_timeout)
        except (asyncio.TimeoutError, TunnelClosedError):
            self.log.warning("CMG instance %d at %s did not welcome the tunnel: %s", instance, url,
                             session.close_reason or "timeout")
            runner.cancel()
            return False
        welcome = session.welcome
        self.sessions[instance] = session
        self.connected[instance].set()
        if self._status is not None:
            self._status("CONNECTED", {"instance": instance})
        self.traffic.reconnects.labels(self.config.name, str(instance)).inc()
        self.log.info("Connected to CMG instance %s at %s (TLS tunnel, %s)",
                      welcome.instance if welcome else instance, url, SUBPROTOCOL)
        try:
            await runner
        finally:
            self.connected[instance].clear()
            if self._status is not None:
                self._status("DISCONNECTED", {"instance": instance})
            self.sessions.pop(instance, None)
            self.log.info("Disconnected from CMG instance %d at %s: %s", instance, url,
                          session.close_reason or "closed")
        return True

    async def stop(self, drain: bool = True) -> None:
        """Drain: no new streams, in-flight ones finish (up to drain_timeout), then leave."""
        self._stopping = True
        sessions = list(self.sessions.values())
        if drain and sessions:
            for s in sessions:
                await s.drain()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.drain_timeout
            # Streams the gateway opened before it read our DRAIN are still served:
            # wait until each instance has acknowledged the drain and nothing is open.
            def busy(s: TunnelSession) -> bool:
                return not s.closed and (s.open_streams > 0 or not s.drain_acknowledged)

            while any(busy(s) for s in sessions) and loop.time() < deadline:
                await asyncio.sleep(0.05)
        for s in sessions:
            await s.close(ErrorCode.NO_ERROR, "connection point stopping")
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.forwarder.close()
        self.traffic.report(self.log)
        if self._monitoring is not None:
            await self._monitoring.cleanup()
        self.log.info("Connection point %s stopped", self.config.name)

