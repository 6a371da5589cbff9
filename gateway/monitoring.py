"""The instance's monitoring side: the console's Cloud Management node, for a browser.

A plain HTTP listener on the monitoring port (loopback by default, never the client
port): ``/metrics`` (Prometheus), ``/healthz`` (the process serves), ``/readyz`` (some
connected connection point serves every role the site publishes), ``/status.json``
(this instance), ``/status/all.json`` (every instance, gathered from their monitoring
ports) and ``/status`` (a page that shows the CMG as the console does and refreshes live).
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .app import GatewayInstance


def instance_status(g: "GatewayInstance") -> dict[str, Any]:
    """This instance as the console's monitoring node shows it."""
    cfg = g.config
    links = g.routes.links
    served: dict[int, list[str]] = {r.role_id: [] for r in cfg.roles}
    points: dict[str, dict[str, Any]] = {}
    for link in links:
        p = points.setdefault(link.name, {
            "name": link.name, "state": "Connected", "tunnels": 0, "roles": [],
            "total_requests": 0, "failed_requests": 0, "active_requests": 0,
            "request_bytes": 0, "response_bytes": 0, "rtt_ms": None, "draining": False,
            "connected_since": link.connected_at,
        })
        p["tunnels"] += 1
        p["total_requests"] += link.total_requests
        p["failed_requests"] += link.failed_requests
        p["active_requests"] += link.active_requests
        p["request_bytes"] += link.request_bytes
        p["response_bytes"] += link.response_bytes
        p["draining"] = p["draining"] or link.session.peer_draining
        if link.session.rtt is not None:
            p["rtt_ms"] = round(link.session.rtt * 1000, 3)
        p["roles"] = sorted(set(p["roles"]) | {str(r) for r in link.roles})
        if link.usable:
            for role_id in link.roles:
                served.setdefault(role_id, []).append(link.name)
    for name in g.known_connection_points - set(points):
        points[name] = {"name": name, "state": "Disconnected", "tunnels": 0, "roles": []}
    missing = [str(r) for r, by in served.items() if not by and any(x.role_id == r for x in cfg.roles)]
    if not g.routes.ever_connected:
        status = "Provisioning"
    elif missing:
        status = "Error"
    else:
        status = "Ready"
    return {
        "service_name": cfg.service_name,
        "site_code": cfg.site_code,
        "instance": g.instance_name,
        "index": cfg.instance,
        "status": status,
        "started": g.started_at,
        "uptime_s": round(time.time() - g.started_at, 1),
        "requests_in_flight": g.handler.in_flight if g.handler else 0,
        "roles": [
            # Role ids are strings here: 2^56 + n is beyond a JavaScript number's exact range.
            {"role_id": str(r.role_id), "kind": r.kind, "name": r.name,
             "served_by": sorted(served.get(r.role_id, []))}
            for r in cfg.roles
        ],
        "connection_points": sorted(points.values(), key=lambda p: p["name"]),
        "traffic": [
            {"connection_point": link.name, "role_id": str(role_id), **counts}
            for link in links for role_id, counts in sorted(link.traffic.items())
        ],
        "missing_roles": missing,
    }


class MonitoringServer:
    def __init__(self, gateway: "GatewayInstance") -> None:
        self._g = gateway
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    async def start(self) -> None:
        cfg = self._g.config
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status.json", self._status)
        app.router.add_get("/status/all.json", self._status_all)
        app.router.add_get("/status", self._page)
        app.router.add_get("/", self._page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.monitoring_bind, cfg.monitoring_port, reuse_address=True)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._g.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "instance": self._g.instance_name})

    async def _readyz(self, request: web.Request) -> web.Response:
        s = instance_status(self._g)
        ready = s["status"] == "Ready"
        return web.json_response({"ready": ready, "status": s["status"], "missing_roles": s["missing_roles"]},
                                 status=200 if ready else 503)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(instance_status(self._g))

    async def _status_all(self, request: web.Request) -> web.Response:
        cfg = self._g.config
        me = instance_status(self._g)

        async def peer(i: int) -> dict[str, Any]:
            if i == cfg.instance:
                return me
            url = f"http://{cfg.monitoring_peer_hosts[i]}:{cfg.monitoring_base_port + i}/status.json"
            assert self._session is not None
            try:
                async with self._session.get(url) as r:
                    return dict(await r.json())
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return {"instance": f"ProxyService_IN_{i}", "index": i, "status": "Unreachable",
                        "connection_points": [], "roles": [], "traffic": []}

        instances = await asyncio.gather(*(peer(i) for i in range(cfg.instances)))
        return web.json_response(aggregate(cfg.service_name, cfg.site_code, instances))

    async def _page(self, request: web.Request) -> web.Response:
        html = resources.files("gateway").joinpath("status.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html")


def aggregate(service_name: str, site_code: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole CMG from its instances' status: Ready only when every instance is."""
    states = [i.get("status") for i in instances]
    if all(s == "Ready" for s in states):
        status = "Ready"
    elif all(s in ("Provisioning", "Ready") for s in states) and "Provisioning" in states:
        status = "Provisioning"
    else:
        status = "Error"
    names = sorted({p["name"] for i in instances for p in i.get("connection_points", [])})
    matrix = [
        {"connection_point": n,
         "instances": {i["instance"]: next((p["state"] for p in i.get("connection_points", []) if p["name"] == n),
                                           "Disconnected") for i in instances}}
        for n in names
    ]
    traffic: dict[tuple[str, str], dict[str, int]] = {}
    for i in instances:
        for t in i.get("traffic", []):
            key = (t["connection_point"], t["role_id"])
            acc = traffic.setdefault(key, {"total_requests": 0, "failed_requests": 0,
                                           "request_bytes": 0, "response_bytes": 0})
            for k in acc:
                acc[k] += int(t.get(k, 0))
    return {
        "service_name": service_name,
        "site_code": site_code,
        "status": status,
        "instances": [{"instance": i["instance"], "status": i["status"], "uptime_s": i.get("uptime_s")}
                      for i in instances],
        "connection_points": matrix,
        "traffic": [{"connection_point": cp, "role_id": role, **v} for (cp, role), v in sorted(traffic.items())],
        "roles": instances[0].get("roles", []) if instances else [],
        "generated": time.time(),
    }
