"""The CMG emulator as a test dependency.

A whole deployment (mock site, gateway instances, connection points, each a process)
on ephemeral loopback ports, with certificates of its own, in a temporary directory
that is removed when it stops::

    from cmg.testing import CMGStack

    with CMGStack(instances=2, connectors=2) as cmg:          # or: async with CMGStack() as cmg
        with cmg.client(auth="pki") as client:
            assert client.request("GET", "SMS_MP/.sms_aut?MPLIST", role="MP").status == 200
        [req] = cmg.site_requests(path="/SMS_MP/.sms_aut")
        assert req.identity["X-CMG-Client-Certificate-Thumbprint"]

The pytest plugin (:mod:`cmg.pytest_plugin`) gives the same object as the ``cmg_stack``
fixture. Everything here is documented with examples in ``docs/testing.md``.

Sync and async: :class:`CMGStack` is a context manager both ways (``async with``
starts and stops it in a worker thread, so the event loop keeps running).
:meth:`CMGStack.client` is a *synchronous* client (it runs its own event loop in a
thread: use it in plain ``def`` tests); :meth:`CMGStack.aclient` is the same client
with ``async`` methods, for ``async def`` tests — use that one whenever the test's
event loop serves something itself (an aiohttp app behind the CMG), or a blocking
call would hold that loop. Fault injection blocks only as long as its docstring says;
in an ``async def`` test with traffic in flight, call it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import shutil
import tempfile
import threading
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Mapping, TypeVar

from multidict import CIMultiDict
from yarl import URL

from clientsim import payloads
from clientsim.client import (AUTH_METHODS, CMGError, CycleResult, EntraSettings, InternetClient, StepFailure,
                              UploadResult)
from cmg import config as cfg
from cmg.launcher import LaunchError, Process, Stack
from cmg.messaging import Message, parse_xml

__all__ = [
    "AsyncClient", "CMGError", "CMGStack", "Client", "LaunchError", "Response", "SiteRequest", "StepFailure",
    "role", "ROLE_KINDS",
]

ROLE_KINDS = ("MP", "SUP", "DP", "AdminService")
_T = TypeVar("_T")

# --- certificates: generated once per process, copied into each stack ---

_cert_cache: Path | None = None
_cert_cache_lock = threading.Lock()


def _certificate_cache() -> Path:
    global _cert_cache
    with _cert_cache_lock:
        if _cert_cache is None:
            _cert_cache = Path(tempfile.mkdtemp(prefix="cmg-testing-certs-"))
            atexit.register(shutil.rmtree, _cert_cache, True)
        return _cert_cache


def role(kind: str, internal_url: str, *, role_id: int | None = None, name: str | None = None,
         endpoints: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """A ``[[site.roles]]`` table for a service of the test's own behind the CMG.

    ``kind`` is one of MP, SUP, DP, AdminService; ``internal_url`` the service's base URL
    (``http://127.0.0.1:<port>``); ``endpoints`` the first path segments it publishes
    (default: the kind's usual ones, e.g. ``["AdminService"]``). ``role_id`` defaults to
    a fresh id above the site's own (2^56 + 1000 + n). Give it to
    ``CMGStack(extra_roles=[...])`` (or the marker's ``extra_roles``).
    """
    if kind not in ROLE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ROLE_KINDS)}, not {kind!r}")
    table: dict[str, Any] = {"role_id": role_id if role_id is not None else _next_role_id(), "kind": kind,
                             "name": name or f"{kind.upper()}-TEST", "internal_url": internal_url.rstrip("/")}
    if endpoints is not None:
        table["endpoints"] = list(endpoints)
    return table


_role_counter = iter(range(1000, 10**6))


def _next_role_id() -> int:
    return cfg.ROLE_ID_BASE + next(_role_counter)


# --- what comes back ---


@dataclass(frozen=True)
class Response:
    """An HTTP answer as the client got it."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def xml(self) -> ET.Element:
        return parse_xml(self.body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class SiteRequest:
    """One request as a site role (MP, SUP or DP) received it, from the mock site's log."""

    seq: int
    role: str  # mp | sup | dp
    method: str
    path: str
    query: str
    url: str  # the internal URL, as the role received it
    status: int
    headers: list[tuple[str, str]]  # as received, in order (Authorization credentials hashed)
    identity: dict[str, str]  # the X-CMG-Client-* headers the gateway passed on
    client_auth: str  # X-CMG-Client-Auth
    authorization: dict[str, str] | None  # {"scheme", "token_sha256"}
    body_size: int
    body_sha256: str
    body_complete: bool
    time: float
    raw: dict[str, Any] = field(repr=False)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (any case)."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), default)

    @classmethod
    def from_entry(cls, e: dict[str, Any]) -> "SiteRequest":
        return cls(seq=int(e.get("seq", 0)), role=e.get("role", ""), method=e["method"], path=e["path"],
                   query=e.get("query", ""), url=e.get("url", ""), status=int(e.get("status", 0)),
                   headers=[(k, v) for k, v in e.get("headers", [])], identity=dict(e.get("client_identity", {})),
                   client_auth=e.get("client_auth", ""), authorization=e.get("authorization"),
                   body_size=int(e.get("body_size", 0)), body_sha256=e.get("body_sha256", ""),
                   body_complete=bool(e.get("body_complete", True)), time=float(e.get("time", 0.0)), raw=e)


# --- the stack ---


class CMGStack:
    """A whole CMG deployment for a test; a context manager, sync or async.

    ``instances`` gateway instances, ``connectors`` connection points; ``overrides``
    are tables of the deployment file merged over the defaults (``{"client_auth":
    {"verify_revocation": False}, "connection_point": {"request_timeout": 2}}``);
    ``extra_roles`` publish services of the test's own (see :func:`role`).
    ``directory``: where the deployment lives (default: a new temporary directory,
    removed at :meth:`stop` unless ``keep``). ``share_certificates``: copy one
    certificate set generated per process rather than generating one per stack.
    ``ephemeral=False``: keep the ports the configuration names (``overrides``) rather
    than free ones (tests that place components on fixed addresses, e.g. in network
    namespaces with ``command_prefix``).
    """

    def __init__(self, *, instances: int = 1, connectors: int = 1,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 extra_roles: list[dict[str, Any]] | None = None, directory: Path | str | None = None,
                 keep: bool = False, share_certificates: bool = True, connect_timeout: float = 60.0,
                 supervise: bool = True, command_prefix: dict[str, list[str]] | None = None,
                 ephemeral: bool = True) -> None:
        self.options = {"instances": instances, "connectors": connectors,
                        "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
                        "extra_roles": [dict(r) for r in extra_roles or []]}
        self._given_dir = Path(directory) if directory is not None else None
        self.keep = keep
        self._share = share_certificates and not (overrides and "dir" in (overrides.get("certificates") or {}))
        self._connect_timeout = connect_timeout
        self._supervise = supervise
        self._command_prefix = command_prefix
        self._ephemeral = ephemeral
        self.directory: Path | None = None
        self.stack: Stack | None = None
        self.deployment: dict[str, Any] = {}
        self.faulted = False  # a fault was injected (the pytest plugin does not reuse it)
        self.baseline = 0  # site_requests() default: only requests after this seq
        self.startup_seconds: float | None = None
        self._clients: list[Client | AsyncClient] = []
        self._stalled: set[str] = set()

    # --- lifecycle ---

    def start(self) -> "CMGStack":
        """Start every process; returns when every connection point is connected to
        every instance. Raises :class:`LaunchError` (and cleans up) when it cannot."""
        import time

        if self.stack is not None:
            raise RuntimeError("this CMGStack is already started")
        self.directory = self._given_dir or Path(tempfile.mkdtemp(prefix="cmg-stack-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.stack = Stack(self.directory, port=0 if self._ephemeral else None, instances=self.options["instances"],
                           connectors=self.options["connectors"], overrides=self.options["overrides"],
                           extra_roles=self.options["extra_roles"], connect_timeout=self._connect_timeout,
                           supervise=self._supervise, command_prefix=self._command_prefix,
                           certificate_cache=_certificate_cache() if self._share else None)
        try:
            self.stack.start()
        except BaseException:
            self.stack = None
            self._remove_dir()
            raise
        self.startup_seconds = time.perf_counter() - t0
        self.deployment = json.loads((self.directory / "deployment.json").read_text(encoding="utf-8"))
        return self

    def stop(self) -> None:
        """Close the clients it made, stop every process, remove the directory (unless
        ``keep`` or it was given). Safe to call twice."""
        for c in list(self._clients):
            with contextlib.suppress(Exception):
                c._close_from_stack()
        self._clients.clear()
        for r in list(self._stalled):  # let held requests go: the site then stops at once
            with contextlib.suppress(Exception):
                self.unstall(r)
        if self.stack is not None:
            self.stack.stop()
            self.stack = None
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self.directory is not None and self._given_dir is None and not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "CMGStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> "CMGStack":
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    @property
    def running(self) -> bool:
        return self.stack is not None

    def _need(self) -> Stack:
        if self.stack is None:
            raise RuntimeError("the CMGStack is not started")
        return self.stack

    # --- where things are ---

    def path(self, key: str) -> Path:
        """A path from ``deployment.json`` (``ca_cert``, ``client_cert``, ``logs_dir``...), absolute."""
        assert self.directory is not None
        p = Path(self.deployment[key])
        return p if p.is_absolute() else self.directory / p

    @property
    def service_name(self) -> str:
        return str(self.deployment["service_name"])

    @property
    def address(self) -> tuple[str, int]:
        """Where the gateway listens (the service name resolves here)."""
        host, _, port = self.deployment["listen"].rpartition(":")
        return host, int(port)

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    def url(self, path: str) -> str:
        """``https://<listen address><path>`` (send ``Host``/SNI = :attr:`service_name`)."""
        return f"https://{self.deployment['listen']}{path}"

    def role(self, kind_or_name: str | int) -> dict[str, Any]:
        """A published role from ``deployment.json`` by kind (the first), name or role id."""
        for r in self.deployment["roles"]:
            if kind_or_name in (r["kind"], r["name"], r["role_id"], str(r["role_id"])):
                return dict(r)
        raise KeyError(f"no role {kind_or_name!r} (roles: {[r['name'] for r in self.deployment['roles']]})")

    def mp_path(self, tail: str, channel: str = "CCM_Proxy_MutualAuth") -> str:
        """``/<channel>/<MP role id>/<tail>``."""
        return f"/{channel}/{self.role('MP')['role_id']}/{tail.lstrip('/')}"

    @property
    def logs_dir(self) -> Path:
        return self.path("logs_dir")

    def log(self, name: str = "CMGService.log") -> str:
        """A log file's text (``CMGService.log``, ``SMS_Cloud_ProxyConnector_CMGCP01.log``...)."""
        f = self.logs_dir / name
        return f.read_text(encoding="utf-8", errors="replace") if f.exists() else ""

    def config(self) -> cfg.Deployment:
        """The resolved configuration every process runs with."""
        assert self.directory is not None
        return cfg.load(self.path("config"), base_dir=self.directory)

    @property
    def processes(self) -> list[Process]:
        return list(self._need().processes)

    @property
    def gateways(self) -> list[str]:
        return [p.name for p in self._need().processes if p.kind == "gateway"]

    @property
    def connectors(self) -> list[str]:
        return [p.name for p in self._need().processes if p.kind == "connector"]

    # --- clients ---

    def _client_args(self, auth: str, cert: Path | str | None, key: Path | str | None, certificate: bool | None,
                     bulk_token: str | None, client_name: str | None, timeout: float,
                     **kw: Any) -> InternetClient:
        if auth not in AUTH_METHODS:
            raise ValueError(f"auth must be one of {', '.join(AUTH_METHODS)}, not {auth!r}")
        use_cert = (auth == "pki") if certificate is None else certificate
        extra: dict[str, Any] = {}
        if auth == "entra":
            e = self.deployment["entra"]
            extra["entra"] = EntraSettings(e["authority"], e["tenant_id"], e["client_app_id"], e["server_app_id_uri"])
        elif auth == "token":
            extra["bulk_token"] = bulk_token or self.bulk_token()
        c = Path(cert) if cert else self.path("client_cert")
        k = Path(key) if key else (None if cert else self.path("client_key"))
        return InternetClient(self.service_name, self.address, int(self.role("MP")["role_id"]), self.path("ca_cert"),
                              c if use_cert else None, k if use_cert else None,
                              client_name=client_name or f"CLIENT-{uuid.uuid4().hex[:6].upper()}",
                              timeout=timeout, auth=auth, **extra, **kw)

    def aclient(self, auth: str = "pki", *, cert: Path | str | None = None, key: Path | str | None = None,
                certificate: bool | None = None, bulk_token: str | None = None, client_name: str | None = None,
                timeout: float = 30.0, **kw: Any) -> "AsyncClient":
        """An internet client with ``async`` methods (see :class:`AsyncClient`).

        ``auth``: ``pki`` (client certificate on CCM_Proxy_MutualAuth), ``entra`` (Entra
        ID device token from the mock tenant, exchanged at CCM_STS) or ``token`` (a bulk
        registration token, new from the site unless ``bulk_token``). ``cert``/``key``: a
        client certificate of the test's own; ``certificate=False``: present none;
        ``certificate=True`` with a token method: present one as well. ``kw`` go to
        :class:`clientsim.client.InternetClient` (``upload_size``, ``content_id``...).
        """
        c = AsyncClient(self._client_args(auth, cert, key, certificate, bulk_token, client_name, timeout, **kw), self)
        self._clients.append(c)
        return c

    def client(self, auth: str = "pki", **kw: Any) -> "Client":
        """The same client as :meth:`aclient` with blocking methods (its own event loop
        in a thread), for plain ``def`` tests."""
        c = Client(self.aclient(auth, **kw))
        self._clients.remove(c._async)
        self._clients.append(c)
        return c

    def bulk_token(self, minutes: int | None = None) -> str:
        """A bulk registration token from the site (``cmg token new``)."""
        from cmg.site_tokens import new_bulk_token

        return new_bulk_token(self.config().site, minutes)

    # --- the site's side ---

    def _site_get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.role('MP')['internal_url']}{path}", timeout=10) as r:  # noqa: S310
            return json.loads(r.read())

    def _site_post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(f"{self.role('MP')['internal_url']}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            return json.loads(r.read())

    def mark(self) -> int:
        """The sequence number of the last request the site received: pass it as
        ``site_requests(since=...)`` to see only what comes after."""
        return int(self._site_get("/_mock/health").get("last_request_seq", 0))

    def site_requests(self, since: int | None = None, *, role: str | None = None, method: str | None = None,
                      path: str | None = None) -> list[SiteRequest]:
        """What the site's MP, SUP and DP received, oldest first: method, internal URL,
        headers (incl. the ``X-CMG-Client-*`` identity the gateway passed on), body size
        and SHA-256. ``since``: after that sequence number (default :attr:`baseline`:
        the start of the current test under the pytest plugin, else everything).
        Filters: ``role`` (``MP``/``mp``...), ``method``, ``path`` (case-insensitive,
        exact, or a prefix when it ends with ``*``). Requests to services of the test's
        own are not here: they went to the test's server. Blocking but brief (one
        loopback HTTP call to another process): fine in async tests too."""
        entries = self._site_get(f"/_mock/requests?since={self.baseline if since is None else since}")
        out = [SiteRequest.from_entry(e) for e in entries]
        if role:
            out = [r for r in out if r.role == role.lower()]
        if method:
            out = [r for r in out if r.method == method.upper()]
        if path:
            p = path.lower()
            out = [r for r in out if (r.path.lower().startswith(p[:-1]) if p.endswith("*") else r.path.lower() == p)]
        return out

    def uploads(self) -> list[dict[str, Any]]:
        """BITS uploads the MP holds (name, size, sha256, complete, identity)."""
        return list(self._site_get("/_mock/uploads"))

    def registrations(self) -> list[dict[str, Any]]:
        """Clients registered at the MP."""
        return list(self._site_get("/_mock/clients"))

    # --- fault injection ---

    def _fault(self) -> Stack:
        self.faulted = True
        return self._need()

    def kill(self, component: str) -> int:
        """SIGKILL a component (``gateway-0``, ``CMGCP01`` or ``connector-CMGCP01``,
        ``mock_site``): a crash. The supervisor restarts it after about a second; wait
        with :meth:`wait_restarted`. Returns at once with the killed pid."""
        return self._fault().kill(component)

    def wait_restarted(self, component: str, old_pid: int, timeout: float = 60.0) -> None:
        """Block until the supervisor replaced ``old_pid`` and the stack is whole again."""
        self._need().wait_restarted(component, old_pid, timeout)

    def stop_component(self, component: str, *, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop a component (SIGTERM, it drains first; ``kill=True``: SIGKILL) and keep
        it down until :meth:`start_component`. Blocks until it has exited."""
        self._fault().stop_process(component, timeout, kill=kill)

    def start_component(self, component: str, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start a stopped component again; with ``wait``, block until the stack is whole."""
        self._fault().start_process(component, wait=wait, timeout=timeout)

    def restart(self, component: str, timeout: float = 60.0) -> None:
        """Graceful stop then start; blocks until the stack is whole again."""
        self._fault().restart(component, timeout)

    def pause(self, component: str) -> None:
        """SIGSTOP a component: it keeps its sockets open and answers nothing."""
        self._fault().pause(component)

    def resume(self, component: str) -> None:
        """SIGCONT a paused component."""
        self._need().resume(component)

    def stall(self, target: str = "MP") -> None:
        """Stall a role: ``MP``, ``SUP`` or ``DP``: its requests wait unanswered until
        :meth:`unstall` (the rest of the site answers; the gateway answers
        ``504 CMGConnector_GatewayTimeout`` after ``connection_point.request_timeout``).
        ``site``: SIGSTOP the whole site process (every role and the Entra tenant)."""
        self._fault()
        if target.lower() in ("site", "mock_site"):
            self.pause("mock_site")
            return
        self._site_post("/_mock/stall", {"role": _site_role(target), "stalled": True})
        self._stalled.add(_site_role(target))

    def unstall(self, target: str = "MP") -> None:
        """Release a stalled role (or ``site``); held requests are then answered."""
        if target.lower() in ("site", "mock_site"):
            self.resume("mock_site")
            return
        self._site_post("/_mock/stall", {"role": _site_role(target), "stalled": False})
        self._stalled.discard(_site_role(target))

    @contextlib.contextmanager
    def stalled(self, target: str = "MP") -> Iterator[None]:
        """``with cmg.stalled("MP"): ...``: :meth:`stall` then :meth:`unstall`."""
        self.stall(target)
        try:
            yield
        finally:
            self.unstall(target)

    def connection_status(self) -> dict[int, set[str] | None]:
        """Instance -> the connection points it has connected (``/CMGStatus``)."""
        return self._need().connection_status()

    def healthy(self) -> bool:
        """Every component running, every connection point connected to every instance."""
        return self._need().healthy()

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Block until :meth:`healthy`; :class:`LaunchError` after ``timeout``."""
        self._need().wait_healthy(timeout)

    def pid(self, component: str) -> int:
        return self._need().process(component).pid

    def __repr__(self) -> str:
        state = f"listening on {self.deployment.get('listen')}" if self.running else "stopped"
        return (f"<CMGStack {self.options['instances']} instance(s), {self.options['connectors']} "
                f"connection point(s), {state}>")


def _site_role(target: str) -> str:
    t = target.lower()
    if t not in ("mp", "sup", "dp"):
        raise ValueError(f"a stallable role is MP, SUP, DP or site, not {target!r}")
    return t


# --- clients ---


class AsyncClient:
    """A simulated internet client through the stack's CMG, ``async``.

    ConfigMgr operations: :meth:`mplist`, :meth:`location`, :meth:`register`,
    :meth:`policy`, :meth:`send_message`, :meth:`upload`, :meth:`update_scan`,
    :meth:`download`, :meth:`run_cycle` (all of them, timed, never raising), and the raw
    :meth:`request`. Token methods authenticate on first use (:meth:`authenticate`).
    Use as ``async with cmg.aclient() as c`` or call :meth:`close`; the stack closes the
    ones still open when it stops. ``inner`` is the
    :class:`clientsim.client.InternetClient` for anything else.
    """

    def __init__(self, inner: InternetClient, stack: CMGStack) -> None:
        self.inner = inner
        self._stack = stack
        self._authenticated = inner.auth == "pki"
        self._site_code = ""

    @property
    def auth(self) -> str:
        return self.inner.auth

    @property
    def channel(self) -> str:
        """``CCM_Proxy_MutualAuth`` (pki) or ``CCM_Proxy_ServerAuth`` (tokens)."""
        return self.inner.channel

    @property
    def smsid(self) -> str | None:
        return self.inner.smsid

    @property
    def access_token(self) -> str | None:
        """What goes in ``Authorization: Bearer`` (a CCM or client token), once authenticated."""
        return self.inner.access_token

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.inner.close()
        with contextlib.suppress(ValueError):
            self._stack._clients.remove(self)

    def _close_from_stack(self) -> None:
        pass  # aiohttp sessions belong to the caller's loop; closed by close()

    def role_path(self, role: str | int, tail: str = "") -> str:
        """``/<this client's channel>/<role id>/<tail>``; ``role``: kind, name or id."""
        rid = self._stack.role(role)["role_id"]
        return f"/{self.channel}/{rid}/{tail.lstrip('/')}"

    async def authenticate(self) -> None:
        """entra: a device token from the tenant, exchanged at CCM_STS for a CCM token;
        token: registration with the bulk token, which gives the client its own token
        (and an SMSID); pki: nothing. Done once; later calls return at once."""
        if self._authenticated:
            return
        c = self.inner
        if c.auth == "entra":
            _, _, device_token = await c._entra_token()
            res = await c.request("POST", f"{c.role_url(c.mp_role_id)}/CCM_STS",
                                  headers={"Authorization": f"Bearer {device_token}", "Content-Length": "0"})
            if res.status != 200:
                raise CMGError(res.status, res.reason, res.body, res.headers)
            c.access_token = str(json.loads(res.body)["access_token"])
        elif c.auth == "token":
            await self._register_with_token()
        self._authenticated = True

    async def _register_with_token(self) -> str:
        c = self.inner
        token = c.client_token or c.bulk_token
        reply = parse_xml((await c.send_message("MP_ClientRegistration", payloads.registration_request(
            c.client_name, c.client_name, c._signing_cert_hex()), token=token)).body)
        smsid = reply.get("SMSID", "")
        element = reply.find("ClientToken")
        client_token = (element.text or "").strip() if element is not None else ""
        if not smsid.startswith("GUID:") or not client_token:
            raise StepFailure(200, f"token registration gave no SMSID or no ClientToken ({reply.tag})")
        c.smsid, c.client_token, c.access_token = smsid, client_token, client_token
        return smsid

    async def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                      body: bytes | str | None = None, role: str | int | None = None) -> Response:
        """One raw request through the CMG; the whole answer (status, reason, headers, body).

        ``path`` is the path on the CMG (``/CCM_Proxy_MutualAuth/<id>/SMS_MP/.sms_aut?MPLIST``)
        sent exactly as written, or, with ``role`` (kind, name or id), the path under
        that role on this client's channel (``request("GET", "SMS_MP/.sms_aut?MPLIST",
        role="MP")``). The client's bearer token goes along (token methods authenticate
        first) unless ``headers`` has an ``Authorization``; ``Host`` and SNI are the
        service name. Never raises for an HTTP status.
        """
        if role is not None:
            path = self.role_path(role, path)
        if not path.startswith("/"):
            raise ValueError("path must start with / (or give role=)")
        if not any(k.lower() == "authorization" for k in (headers or {})):
            await self.authenticate()
        data = body.encode("utf-8") if isinstance(body, str) else body
        url = URL(f"https://{self.inner.service_name}{path}", encoded=True)
        res = await self.inner.request(method, url, data=data, headers=headers)  # type: ignore[arg-type]
        return Response(res.status, res.reason, CIMultiDict(res.headers), res.body)

    async def get(self, path_under_role: str, role: str | int = "MP",
                  headers: Mapping[str, str] | None = None) -> Response:
        """``GET`` a path under a role on this client's channel."""
        return await self.request("GET", path_under_role, role=role, headers=headers)

    async def send_message(self, endpoint: str, body_xml: str) -> Message:
        """A ConfigMgr message (``CCM_POST ccm_system[_tokenauth]/request``) for
        ``endpoint`` (``MP_LocationManager``...); the reply. :class:`CMGError` on non-200."""
        await self.authenticate()
        return await self.inner.send_message(endpoint, body_xml)

    async def mplist(self) -> ET.Element:
        """``SMS_MP/.sms_aut?MPLIST``: the MP list (raises :class:`CMGError` on non-200)."""
        res = await self.get("SMS_MP/.sms_aut?MPLIST")
        if res.status != 200:
            raise CMGError(res.status, res.reason, res.body, res.headers)
        return res.xml()

    async def location(self, request: str = "SiteInformationRequest", package_id: str = "") -> ET.Element:
        """A location request (``SiteInformationRequest``, ``WSUSLocationRequest``,
        ``ContentLocationRequest`` with ``package_id``, ``EnumerateMPLocationRequest``);
        the reply's XML."""
        site_code = self._site_code
        if request != "SiteInformationRequest" and not site_code:
            info = (await self.location()).find("SiteInformation")
            site_code = self._site_code = info.get("SiteCode", "") if info is not None else ""
        reply = parse_xml((await self.send_message("MP_LocationManager",
                                                   payloads.location_request(request, site_code, package_id))).body)
        return reply

    async def register(self) -> str:
        """Registration (``MP_ClientRegistration``); the SMSID. Token clients register
        with their bulk token (and get their own client token)."""
        if self.inner.auth == "token":
            if self.inner.smsid is None:
                await self._register_with_token()
                self._authenticated = True
            return str(self.inner.smsid)
        reply = parse_xml((await self.send_message("MP_ClientRegistration", payloads.registration_request(
            self.inner.client_name, self.inner.client_name, self.inner._signing_cert_hex()))).body)
        smsid = reply.get("SMSID", "")
        if not smsid.startswith("GUID:"):
            raise StepFailure(200, f"registration reply carries no SMSID ({reply.tag})")
        self.inner.smsid = smsid
        return smsid

    async def policy(self) -> ET.Element:
        """Policy assignments (``MP_PolicyManager`` RequestAssignments; registers first if
        needed); the ``ReplyAssignments`` XML."""
        if self.inner.smsid is None:
            await self.register()
        if not self._site_code:
            await self.location()
        return parse_xml((await self.send_message("MP_PolicyManager", payloads.request_assignments(
            str(self.inner.smsid), self.inner.client_name, self._site_code))).body)

    async def upload(self, name: str | None = None, data: int | bytes = 64 * 1024,
                     fragment_size: int = 256 * 1024) -> UploadResult:
        """A BITS upload to ``CCM_Incoming/<name>`` (default a new ``{GUID}``): ``data``
        bytes, or a size (a generated state-message payload)."""
        await self.authenticate()
        name = name or "{" + str(uuid.uuid4()).upper() + "}"
        return await self.inner.bits_upload(name, data, fragment_size)

    async def update_scan(self) -> str:
        """A Windows Update Agent scan at the SUP (GetAuthorizationCookie, GetCookie,
        SyncUpdates rounds); a summary such as ``3 applicable update(s) in 2 ...``."""
        await self.authenticate()
        wsus = await self.location("WSUSLocationRequest")
        urls = [self.inner.on_channel(r.get("WSUSURL", "")) for r in wsus.iter("LocationRecord") if r.get("WSUSURL")]
        if not urls:
            raise StepFailure(200, "no software update point located")
        return (await self.inner._update_scan(urls[0]))[1]

    async def download(self, content_id: str = "PS100001.1", file: str = "payload-1048576.bin",
                       range: str | tuple[int, int] | None = None) -> tuple[int, str, int]:
        """``GET`` a DP content file through the CMG (``payload-<N>.bin`` holds N bytes;
        :func:`mock_site.content.content_sha256` gives the expected hash). Returns
        ``(status, sha256, size)`` of what arrived; an error status is returned, not raised."""
        await self.authenticate()
        dp = self._stack.role("DP")["role_id"]
        return await self.inner.download(dp, f"SMS_DP_SMSPKG$/{content_id}/{file}", range)

    async def run_cycle(self) -> CycleResult:
        """What a client does after install, each step timed: (EntraToken, CCM_STS,)
        MPLIST, location, registration, policy, upload, update scan, content. Never
        raises for a failure on the path: see ``result.ok`` and ``result.steps``."""
        return await self.inner.run_cycle()


class _LoopThread:
    """An event loop in a daemon thread, for the synchronous facade."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cmg-testing-client", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[_T], timeout: float | None = None) -> _T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _blocking(name: str) -> Callable[..., Any]:
    method = getattr(AsyncClient, name)

    def call(self: "Client", *args: Any, **kw: Any) -> Any:
        return self._loop.run(getattr(self._async, name)(*args, **kw))

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call


class Client:
    """:class:`AsyncClient` with blocking methods (same names, same arguments).

    It runs its own event loop in a thread, so do not call it from a coroutine whose
    loop must keep serving (use :meth:`CMGStack.aclient` there). A context manager;
    closed by the stack at the latest.
    """

    def __init__(self, inner: AsyncClient) -> None:
        self._async = inner
        self._loop = _LoopThread()

    inner = property(lambda self: self._async.inner)
    auth = property(lambda self: self._async.auth)
    channel = property(lambda self: self._async.channel)
    smsid = property(lambda self: self._async.smsid)
    access_token = property(lambda self: self._async.access_token)

    def role_path(self, role: str | int, tail: str = "") -> str:
        return self._async.role_path(role, tail)

    authenticate = _blocking("authenticate")
    request = _blocking("request")
    get = _blocking("get")
    send_message = _blocking("send_message")
    mplist = _blocking("mplist")
    location = _blocking("location")
    register = _blocking("register")
    policy = _blocking("policy")
    upload = _blocking("upload")
    update_scan = _blocking("update_scan")
    download = _blocking("download")
    run_cycle = _blocking("run_cycle")

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.run(self._async.inner.close(), 10)
            self._loop.close()
        with contextlib.suppress(ValueError):
            self._async._stack._clients.remove(self)

    def _close_from_stack(self) -> None:
        self.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
