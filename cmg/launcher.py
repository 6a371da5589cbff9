"""Starting a whole deployment as processes on loopback: the one launcher.

``cmg up``, the integration tests and the benchmark all start a stack through
:class:`Stack`: certificates when missing, the mock site, N gateway instances, M
connection points, each a separate process (``python -m ...``), then
``DIR/deployment.json`` once every connection point is connected to every instance.
A component that dies is restarted with backoff; ``stop()`` drains connection points
first, then instances, then the site.

Fault injection (for tests, see ``cmg.testing``): :meth:`Stack.kill` (SIGKILL, the
supervisor restarts it), :meth:`Stack.stop_process` / :meth:`Stack.start_process` (down
until started again), :meth:`Stack.restart`, :meth:`Stack.pause` / :meth:`Stack.resume`
(SIGSTOP / SIGCONT), and :meth:`Stack.wait_healthy` (every process up, every connection
point connected to every instance, as each instance's ``/CMGStatus`` says).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import random
import signal
import socket
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit, urlunsplit
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import allocator
from . import config as cfg
from . import pki

DEFAULT_HTTPS_PORT = 443
FALLBACK_PORT = 8443


class LaunchError(Exception):
    """The stack could not be started; the message says which part and why."""


@dataclass
class Process:
    name: str
    kind: str  # gateway | connector | site
    argv: list[str]
    proc: subprocess.Popen[str] | None = None
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)
    restarts: int = 0
    ready: dict[str, Any] = field(default_factory=dict)
    stderr_path: Path | None = None
    started_at: float = 0.0
    held: bool = False  # stopped on purpose (stop_process): the supervisor leaves it down
    paused: bool = False  # SIGSTOPped (pause)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _below_ephemeral() -> range:
    """Ports under the kernel's ephemeral range: a port chosen there cannot be taken by an
    outgoing connection's local port before the component binds it (a port the kernel
    picked with bind(0) could: 'address already in use', seen with the bench's clients)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(10000, low) if low - 10000 >= 2000 else range(0)


def free_port(host: str = "127.0.0.1", avoid: "set[int] | None" = None) -> int:
    """A port free now on ``host`` (and not in ``avoid``, ports already chosen): a random
    one under the ephemeral range where there is one, else one the kernel picks."""
    candidates = _below_ephemeral()
    for attempt in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, random.choice(candidates) if candidates and attempt < 150 else 0))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if not avoid or port not in avoid:
            if avoid is not None:
                avoid.add(port)
            return port
    raise LaunchError(f"found no free port on {host}")


def free_port_run(count: int, host: str = "127.0.0.1", avoid: "set[int] | None" = None) -> int:
    """A base port such that base .. base+count-1 are all free now (and none in
    ``avoid``, ports already chosen, to which they are added)."""
    for _ in range(200):
        base = free_port(host)
        run = range(base, base + count)
        if base + count > 65535 or (avoid and not avoid.isdisjoint(run)):
            continue
        ok = True
        for p in run:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            if avoid is not None:
                avoid.update(run)
            return base
    raise LaunchError(f"found no run of {count} free ports on {host}")


def can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _connect_host(bind: str) -> str:
    return bind if bind not in ("0.0.0.0", "::") else "127.0.0.1"


class Stack:
    """A running deployment; use as a context manager or call start()/stop()."""

    def __init__(self, directory: Path | str = ".", *, config_file: Path | str | None = None,
                 port: int | None = None, instances: int | None = None,
                 connectors: int | None = None, ephemeral: bool = False,
                 connect_timeout: float = 60.0, supervise: bool = True,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 echo: bool = False,
                 command_prefix: dict[str, list[str]] | None = None,
                 extra_roles: list[dict[str, Any]] | None = None,
                 certificate_cache: Path | str | None = None) -> None:
        self.dir = Path(directory).resolve()
        self.config_file = Path(config_file).resolve() if config_file else None
        if self.config_file is None and (self.dir / "deployment.toml").exists():
            self.config_file = self.dir / "deployment.toml"
        self.port = port
        self.instances = instances
        self.connectors = connectors
        self.ephemeral = ephemeral
        self.connect_timeout = connect_timeout
        self.supervise = supervise
        self.overrides = overrides or {}
        self.echo = echo
        # Per component kind (site, gateway, connector): words put before the command,
        # e.g. ["ip", "netns", "exec", "cloud"] to run every gateway in a namespace.
        self.command_prefix = command_prefix or {}
        # Roles published besides the site's own (MP, SUP, DP): ``[[site.roles]]`` tables,
        # e.g. a user's service {"role_id": ..., "kind": "AdminService", "internal_url": ...}.
        self.extra_roles = [dict(r) for r in extra_roles or []]
        # Where generated certificate sets are kept and copied from, so that stacks of
        # the same names do not each generate theirs (tests): one set per service name,
        # site code and connection points.
        self.certificate_cache = Path(certificate_cache) if certificate_cache else None
        self.processes: list[Process] = []
        self.notes: list[str] = []
        self.deployment: dict[str, Any] = {}
        self.resolved_path = self.dir / "run" / "deployment.resolved.json"
        self._stopping = False
        self._stop_event = threading.Event()
        self._lock = threading.RLock()  # spawning vs stopping
        self._supervisor: threading.Thread | None = None
        self._site_ports: dict[str, int] = {}
        self._config: cfg.Deployment | None = None

    # --- configuration ---

    def _resolve(self) -> tuple[dict[str, Any], cfg.Deployment]:
        raw: dict[str, Any] = cfg.read_file(self.config_file) if self.config_file else {}
        raw = json.loads(json.dumps(raw))  # a deep, plain copy
        for table, values in self.overrides.items():
            raw.setdefault(table, {}).update(values)
        service = raw.setdefault("service", {})
        if self.instances is not None:
            service["instances"] = self.instances
        if self.connectors is not None:
            names = raw.setdefault("connection_point", {}).get("names")
            if not names or len(names) != self.connectors:
                raw["connection_point"]["names"] = [f"CMGCP{i + 1:02d}" for i in range(self.connectors)]
        # Validate what the user gave before choosing ports.
        first = cfg.from_dict(raw, self.config_file.parent if self.config_file else self.dir)
        bind = first.bind
        if self.ephemeral or self.port == 0:
            taken: set[int] = set()
            service["client_port"] = free_port(bind, taken)
            service["tunnel_base_port"] = free_port_run(first.instances, bind, taken)
            service["monitoring_base_port"] = free_port_run(first.instances, first.monitoring_bind, taken)
            cp_raw = raw.setdefault("connection_point", {})
            cp_raw["monitoring_base_port"] = free_port_run(len(first.connection_point_names),
                                                           first.cp_monitoring_bind, taken)
            site = raw.setdefault("site", {})
            # Chosen now rather than 0 (the site's pick) so that every process can be
            # started at once, all reading one configuration.
            for key in ("mp_port", "sup_port", "dp_port", "entra_port"):
                site[key] = free_port(first.site_bind, taken)
        elif self.port is not None:
            service["client_port"] = self.port
        port = service.get("client_port", first.client_port)
        if port == DEFAULT_HTTPS_PORT and not can_bind(bind, port):
            service["client_port"] = FALLBACK_PORT
            self.notes.append(f"port 443 is not available here (not root, or in use): using {FALLBACK_PORT}")
        # Relative paths: anchor them to the user's file's folder, or DIR.
        base = self.config_file.parent if self.config_file else self.dir
        certs = raw.setdefault("certificates", {})
        certs["dir"] = str((base / certs.get("dir", "certs")).resolve())
        logging_ = raw.setdefault("logging", {})
        logging_["dir"] = str((base / logging_.get("dir", "logs")).resolve())
        site = raw.setdefault("site", {})
        site["data_dir"] = str((base / site.get("data_dir", "data")).resolve())
        if self.extra_roles:
            if "roles" not in site:
                mid = cfg.from_dict(raw, base)
                site["roles"] = [_role_table(r) for r in mid.roles]
            site["roles"] = list(site["roles"]) + [dict(r) for r in self.extra_roles]
        deployment = cfg.from_dict(raw, base)
        return raw, deployment

    def _write_resolved(self, raw: dict[str, Any]) -> cfg.Deployment:
        self.resolved_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.resolved_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=2), encoding="utf-8")
        tmp.replace(self.resolved_path)
        return cfg.load(self.resolved_path, base_dir=self.dir)

    # --- processes ---

    def _spawn(self, p: Process) -> None:
        if p.proc is not None and p.proc.stdout is not None and not p.alive():
            p.proc.stdout.close()  # the previous run's pipe (its pump has seen EOF)
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        p.stderr_path = logs / f"{p.name}.stderr.log"
        err = open(p.stderr_path, "a", encoding="utf-8")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        allocator.environment(env)
        p.proc = subprocess.Popen(
            p.argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            cwd=self.dir, env=env, start_new_session=True,
        )
        err.close()
        p.lines = queue.Queue()
        p.started_at = time.monotonic()
        threading.Thread(target=_pump_lines, args=(p.proc, p.lines), daemon=True).start()

    def _wait_line(self, p: Process, prefix: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaunchError(f"{p.name} did not report {prefix} within {timeout:.0f} s{self._stderr_tail(p)}")
            try:
                line = p.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not p.alive():
                    raise LaunchError(f"{p.name} exited with code {p.proc.returncode if p.proc else '?'}{self._stderr_tail(p)}")
                continue
            if line is None:  # type: ignore[comparison-overlap]
                raise LaunchError(f"{p.name} exited{self._stderr_tail(p)}")
            if line.startswith(prefix + " "):
                return dict(json.loads(line[len(prefix) + 1:]))

    @staticmethod
    def _stderr_tail(p: Process) -> str:
        if p.stderr_path and p.stderr_path.exists():
            tail = p.stderr_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-8:]
            if tail:
                return ":\n  " + "\n  ".join(tail)
        return ""

    def _argv(self, kind: str, module: str, *extra: str) -> list[str]:
        return [*self.command_prefix.get(kind, []), sys.executable, "-m", module,
                "--config", str(self.resolved_path), "--dir", str(self.dir), *extra]

    # --- lifecycle ---

    def start(self) -> "Stack":
        attempts = 3 if (self.ephemeral or self.port == 0) else 1
        for attempt in range(attempts):
            try:
                self._start()
                return self
            except LaunchError as exc:
                self.stop()
                if attempt + 1 < attempts and "in use" in str(exc).lower():
                    # Another process took a port between choosing and binding: again.
                    self._reset()
                    continue
                raise
            except BaseException:
                self.stop()
                raise
        return self

    def _reset(self) -> None:
        self.processes = []
        self.deployment = {}
        self._stopping = False
        self._stop_event = threading.Event()

    def _start(self) -> None:
        try:
            self.notes.append(allocator.describe())
            allocator.environment({**os.environ})  # CMG_ALLOCATOR=mimalloc without it: say so now
        except allocator.AllocatorError as exc:
            raise LaunchError(str(exc)) from None
        raw, deployment = self._resolve()
        certs_dir = deployment.certs_dir
        names = deployment.connection_point_names
        if not pki.certificates_present(certs_dir, deployment.service_name, names):
            if self.certificate_cache is not None:
                cached = _cached_certificates(self.certificate_cache, deployment)
                shutil.copytree(cached, certs_dir, dirs_exist_ok=True)
                self.notes.append(f"certificates copied from {cached}")
            else:
                made = pki.init_certificates(certs_dir, service_name=deployment.service_name,
                                             site_code=deployment.site_code, connection_points=names)
                self.notes.append(f"certificates generated in {certs_dir} ({len(made.created)} files)")
        deployment = self._write_resolved(raw)

        site = Process("mock_site", "site", self._argv("site", "mock_site"))
        self.processes.append(site)
        self._spawn(site)
        # Every port is known now (unless the file asks the site for port 0): the
        # instances start beside the site rather than after it.
        early = not self._site_port_zero(raw)
        if early:
            self._spawn_gateways(deployment)
        site.ready = self._wait_line(site, "READY", 30)
        ports = site.ready.get("ports", {})
        self._site_ports = {k: int(v) for k, v in ports.items()}
        if not early:
            # Point the roles at the ports the site really took.
            site_raw = raw.setdefault("site", {})
            for key, kind in (("mp_port", "mp"), ("sup_port", "sup"), ("dp_port", "dp"), ("entra_port", "entra")):
                if kind in ports:
                    site_raw[key] = int(ports[kind])
            if "roles" in site_raw:
                site_raw["roles"] = [self._bound_role(r) for r in site_raw["roles"]]
            deployment = self._write_resolved(raw)
            # The site was started with port 0: it keeps the ports it took.
            self._spawn_gateways(deployment)
        for g in self.processes:
            if g.kind == "gateway":
                g.ready = self._wait_line(g, "READY", 30)

        for name in deployment.connection_point_names:
            c = Process(f"connector-{name}", "connector", self._argv("connector", "connector", "--name", name))
            self.processes.append(c)
            self._spawn(c)
        for c in self.processes:
            if c.kind == "connector":
                c.ready = self._wait_line(c, "READY", 30)
                seen: set[int] = set()
                while len(seen) < deployment.instances:
                    seen.add(int(self._wait_line(c, "CONNECTED", self.connect_timeout)["instance"]))

        self._config = deployment
        self.deployment = self.describe(deployment)
        out = self.dir / "deployment.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.deployment, indent=2), encoding="utf-8")
        tmp.replace(out)
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise, daemon=True)
            self._supervisor.start()

    def _spawn_gateways(self, deployment: cfg.Deployment) -> None:
        for i in range(deployment.instances):
            g = Process(f"gateway-{i}", "gateway", self._argv("gateway", "gateway", "--instance", str(i)))
            self.processes.append(g)
            self._spawn(g)

    @staticmethod
    def _site_port_zero(raw: dict[str, Any]) -> bool:
        site = raw.get("site", {})
        if any(site.get(k, 1) == 0 for k in ("mp_port", "sup_port", "dp_port", "entra_port")):
            return True
        return any(urlsplit(str(r.get("internal_url", ""))).port == 0 for r in site.get("roles", []))

    def _bound_role(self, role: dict[str, Any]) -> dict[str, Any]:
        """A ``[[site.roles]]`` table whose internal URL names port 0: the port the site
        took for that kind of role."""
        parts = urlsplit(str(role.get("internal_url", "")))
        kind = {"MP": "mp", "SUP": "sup", "DP": "dp"}.get(str(role.get("kind", "")))
        if parts.port != 0 or kind not in self._site_ports:
            return role
        host = parts.hostname or "127.0.0.1"
        return {**role, "internal_url": urlunsplit((parts.scheme, f"{host}:{self._site_ports[kind]}",
                                                    parts.path, parts.query, ""))}

    def describe(self, d: cfg.Deployment) -> dict[str, Any]:
        """deployment.json's content for a deployment (also written by the compose set-up)."""
        tls = d.tls_files()
        port = d.client_port
        host_port = d.service_name if port == 443 else f"{d.service_name}:{port}"
        mp = d.role("MP")
        entra = d.entra_config()

        def rel(p: Path) -> str:
            try:
                return str(p.resolve().relative_to(self.dir))
            except ValueError:
                return str(p.resolve())

        connect_host = d.bind if d.bind not in ("0.0.0.0", "::") else "127.0.0.1"
        mon_host = d.monitoring_bind if d.monitoring_bind not in ("0.0.0.0", "::") else "127.0.0.1"
        return {
            "service_name": d.service_name,
            "site_code": d.site_code,
            "listen": f"{connect_host}:{port}",
            "client_url": f"https://{host_port}/CCM_Proxy_MutualAuth/{mp.role_id}",
            "ccmhostname": f"{host_port}/CCM_Proxy_MutualAuth/{mp.role_id}",
            "instances": d.instances,
            "tunnel_ports": [d.tunnel_port(i) for i in range(d.instances)],
            "connection_points": list(d.connection_point_names),
            "ca_cert": rel(tls.ca_bundle),
            "client_cert": rel(d.certs_dir / pki.CLIENT_CERT),
            "client_key": rel(d.certs_dir / pki.CLIENT_KEY),
            "client_ca_cert": rel(d.certs_dir / pki.ISSUING_CA_CERT),
            "client_ca_key": rel(d.certs_dir / pki.ISSUING_CA_KEY),
            "crl": rel(d.certs_dir / pki.ISSUING_CRL),
            "token_signing_cert": rel(d.client_auth().token_signing_certificate),
            "entra": {
                "enabled": entra.enabled,
                "tenant_id": entra.tenant_id,
                "tenant_name": entra.tenant_name,
                "authority": entra.authority,
                "server_app_id": entra.server_app_id,
                "server_app_id_uri": entra.server_app_id_uri,
                "client_app_id": entra.client_app_id,
            },
            "roles": [
                {"role_id": r.role_id, "kind": r.kind, "name": r.name, "internal_url": r.internal_url,
                 "endpoints": list(r.endpoints)}
                for r in d.roles
            ],
            "logs_dir": rel(d.path(d.logs_dir)),
            "config": rel(self.resolved_path),
            "processes": [{"name": p.name, "kind": p.kind, "pid": p.pid} for p in self.processes],
            "status_url": f"http://{mon_host}:{d.monitoring_base_port}/status",
            "ready_url": f"http://{mon_host}:{d.monitoring_base_port}/readyz",
            "metrics_urls": {
                **{f"gateway-{i}": f"http://{mon_host}:{d.monitoring_base_port + i}/metrics"
                   for i in range(d.instances)},
                **{f"connector-{n}": f"http://{_connect_host(d.cp_monitoring_bind)}:{d.connection_point(n).monitoring_port}/metrics"
                   for n in d.connection_point_names},
            },
        }

    def _supervise(self) -> None:
        """Restart what dies, each on its own backoff: two components that die together
        restart together, not one after the other's wait."""
        delays: dict[str, float] = {}
        due: dict[str, float] = {}  # name -> when its restart is due
        while not self._stop_event.wait(0.1):
            now = time.monotonic()
            for p in list(self.processes):
                with self._lock:
                    if self._stopping or p.held or p.alive():
                        due.pop(p.name, None)
                        continue
                if p.name not in due:
                    code = p.proc.returncode if p.proc else None
                    if now - p.started_at > 60:
                        delays.pop(p.name, None)  # it ran well for a while: start the backoff over
                    delay = min(delays.get(p.name, 0.5) * 2, 30.0)
                    delays[p.name] = delay
                    due[p.name] = now + delay
                    sys.stderr.write(f"cmg: {p.name} exited with code {code}; restarting in {delay:.1f} s\n")
                    continue
                if now < due[p.name]:
                    continue
                with self._lock:
                    due.pop(p.name, None)
                    if self._stopping or p.held or p.alive():
                        continue
                    p.restarts += 1
                    self._spawn(p)
                    self._refresh_pids()

    def _refresh_pids(self) -> None:
        if not self.deployment:
            return
        self.deployment["processes"] = [{"name": p.name, "kind": p.kind, "pid": p.pid} for p in self.processes]
        out = self.dir / "deployment.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.deployment, indent=2), encoding="utf-8")
        tmp.replace(out)

    def wait_connected(self, name: str, old_pid: int | None = None, timeout: float = 60.0) -> Process:
        """Wait until connection point ``name`` (a process other than ``old_pid``, when
        given: the supervisor's restart) is connected to every instance."""
        p = self.process(name)
        deadline = time.monotonic() + timeout
        while old_pid is not None and (p.pid == old_pid or p.proc is None):
            if time.monotonic() > deadline:
                raise LaunchError(f"{name} was not restarted within {timeout:.0f} s")
            time.sleep(0.05)
        seen: set[int] = set()
        instances = int(self.deployment.get("instances", 1)) if self.deployment else 1
        while len(seen) < instances:
            seen.add(int(self._wait_line(p, "CONNECTED", max(0.1, deadline - time.monotonic()))["instance"]))
        return p

    def process(self, name: str) -> Process:
        """A component by name: ``mock_site``, ``gateway-<i>``, ``connector-<name>``
        (a connection point's bare name, e.g. ``CMGCP01``, works too)."""
        for p in self.processes:
            if p.name == name or (p.kind == "connector" and p.name == f"connector-{name}"):
                return p
        raise KeyError(f"{name} (processes: {', '.join(p.name for p in self.processes)})")

    # --- fault injection ---

    def signal(self, name: str, sig: int) -> int:
        """Send ``sig`` to a component; its pid."""
        p = self.process(name)
        if not p.alive():
            raise LaunchError(f"{p.name} is not running")
        os.kill(p.pid, sig)
        return p.pid

    def kill(self, name: str) -> int:
        """SIGKILL a component (a crash); the supervisor restarts it after its backoff
        (see :meth:`wait_restarted`). Returns the killed pid."""
        p = self.process(name)
        if p.paused:
            self.resume(p.name)
        pid = self.signal(p.name, signal.SIGKILL)
        try:
            p.proc.wait(10)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pass
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 60.0) -> Process:
        """Wait until the supervisor has replaced ``old_pid`` and the stack is whole again."""
        p = self.process(name)
        deadline = time.monotonic() + timeout
        while p.pid == old_pid or not p.alive():
            if time.monotonic() > deadline:
                raise LaunchError(f"{p.name} was not restarted within {timeout:.0f} s")
            time.sleep(0.05)
        self.wait_healthy(max(1.0, deadline - time.monotonic()))
        return p

    def stop_process(self, name: str, timeout: float = 30.0, *, kill: bool = False) -> None:
        """Stop a component (SIGTERM: it drains; SIGKILL with ``kill=True``) and keep it
        down (the supervisor does not restart it) until :meth:`start_process`."""
        p = self.process(name)
        with self._lock:
            p.held = True
        if not p.alive():
            return
        if p.paused:
            self.resume(p.name)
        p.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)  # type: ignore[union-attr]
        try:
            p.proc.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            p.proc.kill()  # type: ignore[union-attr]
            p.proc.wait()  # type: ignore[union-attr]

    def start_process(self, name: str, *, wait: bool = True, timeout: float = 60.0) -> Process:
        """Start a component stopped with :meth:`stop_process` again; with ``wait``, until
        it is ready and the stack is whole (:meth:`wait_healthy`)."""
        p = self.process(name)
        with self._lock:
            if self._stopping:
                raise LaunchError("the stack is stopping")
            if p.alive():
                p.held = False
                return p
            p.restarts += 1
            self._spawn(p)
            p.held = False
            self._refresh_pids()
        p.ready = self._wait_line(p, "READY", timeout)
        if wait:
            self.wait_healthy(timeout)
        return p

    def restart(self, name: str, timeout: float = 60.0) -> Process:
        """Stop a component gracefully and start it again; returns when the stack is whole."""
        self.stop_process(name, timeout)
        return self.start_process(name, timeout=timeout)

    def pause(self, name: str) -> None:
        """SIGSTOP a component: it holds its sockets but answers nothing (a hung process)."""
        p = self.process(name)
        self.signal(p.name, signal.SIGSTOP)
        p.paused = True

    def resume(self, name: str) -> None:
        """SIGCONT a paused component."""
        p = self.process(name)
        if p.alive():
            os.kill(p.pid, signal.SIGCONT)
        p.paused = False

    def connection_status(self, timeout: float = 2.0) -> dict[int, set[str] | None]:
        """Instance -> the connection points its ``/CMGStatus`` lists as connected (and
        not draining); ``None`` for an instance that does not answer."""
        d = self._config
        if d is None:
            raise LaunchError("the stack is not started")
        out: dict[int, set[str] | None] = {}
        host = d.bind if d.bind not in ("0.0.0.0", "::") else "127.0.0.1"
        ctx = ssl.create_default_context(cafile=str(d.tls_files().ca_bundle))
        for name in d.connection_point_names:
            cert = d.certs_dir / f"connection-point-{name}.pem"
            key = d.certs_dir / f"connection-point-{name}.key"
            if cert.exists() and key.exists():
                ctx.load_cert_chain(str(cert), str(key))
                break
        for i in range(d.instances):
            try:
                status = _get_json(ctx, host, d.tunnel_port(i), d.service_name, "/CMGStatus", timeout)
                out[i] = {c["name"] for c in status.get("connection_points", []) if not c.get("draining")}
            except (OSError, ValueError, ssl.SSLError, http.client.HTTPException):
                out[i] = None
        return out

    def healthy(self) -> bool:
        """Every component not held down is running and not paused, and every such
        connection point is connected to every such instance."""
        if self._config is None:
            return False
        up = [p for p in self.processes if not p.held]
        if any(not p.alive() or p.paused for p in up):
            return False
        want = {p.name[len("connector-"):] for p in up if p.kind == "connector"}
        instances = {int(p.name.rsplit("-", 1)[1]) for p in up if p.kind == "gateway"}
        status = self.connection_status()
        return all(status.get(i) is not None and want <= status[i] for i in instances)  # type: ignore[operator]

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until :meth:`healthy`; raises :class:`LaunchError` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise LaunchError(f"the stack was not whole again within {timeout:.0f} s: "
                                  f"{self.connection_status()}; "
                                  + ", ".join(f"{p.name} {'up' if p.alive() else 'down'}" for p in self.processes))
            time.sleep(0.1)

    # --- stop ---

    def stop(self, timeout: float = 30.0) -> None:
        """Drain and stop: connection points, then instances, then the site."""
        with self._lock:
            self._stopping = True
            self._stop_event.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(5)
        for p in self.processes:
            if p.paused and p.alive():
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.paused = False
        for kind in ("connector", "gateway", "site"):
            group = [p for p in self.processes if p.kind == kind and p.alive()]
            for p in group:
                try:
                    p.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            for p in group:
                try:
                    p.proc.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:
                    p.proc.kill()  # type: ignore[union-attr]
                    p.proc.wait()  # type: ignore[union-attr]
        for p in self.processes:
            if p.proc is not None:
                try:  # anything the component left in its own session
                    os.killpg(p.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if p.proc and p.proc.stdout:
                p.proc.stdout.close()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_CACHE_LOCK = threading.Lock()


def _cached_certificates(cache: Path, d: cfg.Deployment) -> Path:
    """A generated certificate set for ``d``'s names in ``cache`` (made once)."""
    names = list(d.connection_point_names)
    key = hashlib.sha256(json.dumps([d.service_name, d.site_code, names]).encode()).hexdigest()[:16]
    target = cache / key
    with _CACHE_LOCK:
        if not pki.certificates_present(target, d.service_name, names):
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=_mkdir(cache)))
            pki.init_certificates(tmp, service_name=d.service_name, site_code=d.site_code, connection_points=names)
            shutil.rmtree(target, ignore_errors=True)
            tmp.replace(target)
    return target


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _role_table(r: cfg.RoleConfig) -> dict[str, Any]:
    return {"role_id": r.role_id, "kind": r.kind, "name": r.name, "internal_url": r.internal_url,
            "endpoints": list(r.endpoints)}


def _get_json(ctx: ssl.SSLContext, host: str, port: int, server_name: str, path: str,
              timeout: float) -> dict[str, Any]:
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
            resp = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
            resp.begin()
            body = resp.read()
            if resp.status != 200:
                raise ValueError(f"{path}: {resp.status}")
            return dict(json.loads(body))


def _pump_lines(proc: subprocess.Popen[str], lines: "queue.Queue[str]") -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
    except (ValueError, OSError):
        pass
    lines.put(None)  # type: ignore[arg-type]
