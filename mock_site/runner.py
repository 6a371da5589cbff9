"""Start and stop the mock site in-process: MP, SUP, DP and the mock Entra ID tenant,
each its own aiohttp server.

``await start_site(config)`` returns a :class:`SiteRunner` with the bound ``ports``
(``{"mp": .., "sup": .., "dp": .., "entra": ..}``, ``entra`` only when
``client_auth.entra.enabled``; a configured port 0 gets a free one) and
``await runner.close()``. The launcher and the tests use this; ``python -m mock_site``
wraps it.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from cmg.config import SiteConfig
from mock_site.admin import Admin, recorder
from mock_site.bgb import NotificationHub
from mock_site.bits import UploadStore
from mock_site.context import SiteContext
from mock_site.dp import serve_content
from mock_site.entra import EntraTenant
from mock_site.httpserver import CaseInsensitiveRouter, ConfigMgrAppRunner
from mock_site.logs import SiteLogs
from mock_site.mp import ManagementPoint
from mock_site.registry import ClientRegistry
from mock_site.signing import load_or_create
from mock_site.sup import CookieSigner, UpdateService

MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # CCM_POST and SOAP bodies; BITS fragments stream instead


@dataclass
class SiteRunner:
    """A running mock site."""

    ctx: SiteContext
    ports: dict[str, int]
    uploads: UploadStore
    bgb: NotificationHub
    sup: UpdateService
    _runners: list[web.AppRunner] = field(default_factory=list)
    _closed: bool = False

    def url(self, role: str) -> str:
        """The base URL of a role: ``mp``, ``sup``, ``dp`` or ``entra`` (the tenant's authority)."""
        host = self.ctx.config.bind if self.ctx.config.bind not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.ports[role]}"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.bgb.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.uploads.close()
        self.ctx.logs.site.info("Mock site stopped")
        self.ctx.logs.close()


def _admin_routes(router: CaseInsensitiveRouter, admin: Admin) -> None:
    router.add("GET", "/_mock/uploads", admin.uploads, prefix=True)
    router.add("GET", "/_mock/clients", admin.clients)
    router.add("GET", "/_mock/requests", admin.requests)
    router.add("GET", "/_mock/health", admin.health)
    router.add("POST", "/_mock/bgb/notify", admin.bgb_notify)


def _app(ctx: SiteContext, role: str, router: CaseInsensitiveRouter) -> web.Application:
    app = web.Application(client_max_size=MAX_MESSAGE_SIZE, middlewares=[recorder(ctx, role)])
    router.install(app)
    return app


def write_ports_file(path: Path, ports: dict[str, int]) -> None:
    """Write ``site-ports.json`` atomically (a launcher may be polling for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(ports, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def start_site(config: SiteConfig, *, bgb_hold: float = 300.0, ports_file: Path | None = None,
                     echo: bool = False) -> SiteRunner:
    """Start the MP, SUP and DP servers on ``config.bind``; raises ``OSError`` if a port is taken."""
    loop = asyncio.get_running_loop()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    logs = SiteLogs(config.logs_dir, config.log_format, echo=echo, max_bytes=config.log_max_bytes)
    mp_name = next((r.name for r in config.roles if r.kind == "MP"), "MP01")
    certs = await loop.run_in_executor(None, load_or_create, config.data_dir, config.site_code, mp_name)
    clients = ClientRegistry(config.data_dir / "clients.jsonl")
    known = await loop.run_in_executor(None, clients.load)
    ports: dict[str, int] = {}
    ctx = SiteContext(config, ports, logs, certs, clients)
    for reg in clients.all():
        ctx.policies.client_policy(reg)

    uploads = UploadStore(ctx, config.data_dir / "incoming")
    await loop.run_in_executor(None, uploads.load)
    bgb = NotificationHub(ctx, bgb_hold)
    signer = await loop.run_in_executor(None, CookieSigner, config.data_dir / "sup-cookie.key")
    sup = UpdateService(ctx, signer)
    mp = ManagementPoint(ctx)
    admin = Admin(ctx, uploads, bgb)

    mp_router = CaseInsensitiveRouter()
    _admin_routes(mp_router, admin)
    mp_router.add("GET", "/SMS_MP/.sms_aut", mp.sms_aut)
    mp_router.add("GET", "/SMS_MP/.sms_pol", mp.sms_pol)
    mp_router.add("CCM_POST", "/ccm_system/request", mp.ccm_request)
    mp_router.add("CCM_POST", "/ccm_system_tokenauth/request", mp.ccm_tokenauth_request)
    mp_router.add("BITS_POST", "/CCM_Incoming/", uploads.handle, prefix=True)
    mp_router.add("GET", "/BGB/handler.ashx", bgb.poll)
    mp_router.add(("GET", "HEAD"), "/CCM_Client/ccmsetup.cab", mp.ccmsetup_cab)

    sup_router = CaseInsensitiveRouter()
    _admin_routes(sup_router, admin)
    for path in ("/ClientWebService/client.asmx", "/SimpleAuthWebService/SimpleAuth.asmx",
                 "/ReportingWebService/ReportingWebService.asmx"):
        sup_router.add("POST", path, sup.handle)

    dp_router = CaseInsensitiveRouter()
    _admin_routes(dp_router, admin)

    async def content(request: web.Request) -> web.StreamResponse:
        return await serve_content(ctx, request)

    dp_router.add(("GET", "HEAD"), "/SMS_DP_SMSPKG$/", content, prefix=True)

    mp_router.add(("POST", "CCM_POST"), "/CCM_STS", mp.ccm_sts)

    entra_config = config.client_auth.entra
    if entra_config.enabled:
        ctx.entra = EntraTenant(entra_config, config.data_dir, logs.entra)
        await loop.run_in_executor(None, ctx.entra.keys.load_or_create)
    try:
        await loop.run_in_executor(None, ctx.token_signer)
        signing_note = f"token-signing kid {ctx.token_signer().kid}"
    except OSError as exc:
        signing_note = "no token-signing key: CCM_STS and token authentication refused"
        logs.sts.warning(str(exc))

    site = SiteRunner(ctx, ports, uploads, bgb, sup)
    try:
        for role, router, port in (("mp", mp_router, config.mp_port), ("sup", sup_router, config.sup_port),
                                   ("dp", dp_router, config.dp_port)):
            runner = ConfigMgrAppRunner(_app(ctx, role, router), access_log=None, shutdown_timeout=5.0)
            await runner.setup()
            site._runners.append(runner)
            tcp = web.TCPSite(runner, config.bind, port, reuse_address=True)
            await tcp.start()
            ports[role] = runner.addresses[0][1]
        if ctx.entra is not None:
            entra_app = web.Application(client_max_size=1024 * 1024)
            ctx.entra.routes(entra_app)
            entra_runner = web.AppRunner(entra_app, access_log=None, shutdown_timeout=5.0)
            await entra_runner.setup()
            site._runners.append(entra_runner)
            tcp = web.TCPSite(entra_runner, config.bind, config.entra_port, reuse_address=True)
            await tcp.start()
            ports["entra"] = entra_runner.addresses[0][1]
    except BaseException:
        await site.close()
        raise
    logs.site.info(f"Mock site {config.site_code} started: MP port {ports['mp']}, SUP port {ports['sup']}, "
                   f"DP port {ports['dp']} on {config.bind}; {known} registered client(s); "
                   f"internet MP {ctx.internet_mp_url}; "
                   + (f"Entra ID tenant {entra_config.tenant_id} on port {ports['entra']}; " if "entra" in ports
                      else "Entra ID disabled; ")
                   + signing_note)
    if ports_file is not None:
        await loop.run_in_executor(None, write_ports_file, ports_file, dict(ports))
    return site
