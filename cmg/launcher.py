"""Starting a whole deployment as processes on loopback: the one launcher.

``cmg up``, the integration tests and the benchmark all start a stack through
:class:`Stack`: certificates when missing, the mock site, N gateway instances, M
connection points, each a separate process (``python -m ...``), then
``DIR/deployment.json`` once every connection point is connected to every instance.
A component that dies is restarted with backoff; ``stop()`` drains connection points
first, then instances, then the site.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that base .. base+count-1 are all free now."""
    for _ in range(200):
        base = free_port(host)
        if base + count > 65535:
            continue
        ok = True
        for p in range(base, base + count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
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


class Stack:
    """A running deployment; use as a context manager or call start()/stop()."""

    def __init__(self, directory: Path | str = ".", *, config_file: Path | str | None = None,
                 port: int | None = None, instances: int | None = None,
                 connectors: int | None = None, ephemeral: bool = False,
                 connect_timeout: float = 60.0, supervise: bool = True,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 echo: bool = False,
                 command_prefix: dict[str, list[str]] | None = None) -> None:
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
        self.processes: list[Process] = []
        self.notes: list[str] = []
        self.deployment: dict[str, Any] = {}
        self.resolved_path = self.dir / "run" / "deployment.resolved.json"
        self._stopping = False
        self._supervisor: threading.Thread | None = None

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
            service["client_port"] = free_port(bind)
            service["tunnel_base_port"] = free_port_run(first.instances, bind)
            service["monitoring_base_port"] = free_port_run(first.instances, first.monitoring_bind)
            site = raw.setdefault("site", {})
            for key in ("mp_port", "sup_port", "dp_port", "entra_port"):
                site[key] = 0
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
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        p.stderr_path = logs / f"{p.name}.stderr.log"
        err = open(p.stderr_path, "a", encoding="utf-8")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
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
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raw, deployment = self._resolve()
        certs_dir = deployment.certs_dir
        names = deployment.connection_point_names
        if not pki.certificates_present(certs_dir, deployment.service_name, names):
            made = pki.init_certificates(certs_dir, service_name=deployment.service_name,
                                         site_code=deployment.site_code, connection_points=names)
            self.notes.append(f"certificates generated in {certs_dir} ({len(made.created)} files)")
        deployment = self._write_resolved(raw)

        site = Process("mock_site", "site", self._argv("site", "mock_site"))
        self.processes.append(site)
        self._spawn(site)
        site.ready = self._wait_line(site, "READY", 30)
        ports = site.ready.get("ports", {})
        if deployment.mp_port == 0 or "roles" not in raw.get("site", {}):
            # Point the roles at the ports the site really took.
            site_raw = raw.setdefault("site", {})
            for key, kind in (("mp_port", "mp"), ("sup_port", "sup"), ("dp_port", "dp"), ("entra_port", "entra")):
                if kind in ports:
                    site_raw[key] = int(ports[kind])
            deployment = self._write_resolved(raw)
            # The site was started with port 0: it keeps the ports it took.

        for i in range(deployment.instances):
            g = Process(f"gateway-{i}", "gateway", self._argv("gateway", "gateway", "--instance", str(i)))
            self.processes.append(g)
            self._spawn(g)
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

        self.deployment = self._describe(deployment)
        out = self.dir / "deployment.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.deployment, indent=2), encoding="utf-8")
        tmp.replace(out)
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise, daemon=True)
            self._supervisor.start()

    def _describe(self, d: cfg.Deployment) -> dict[str, Any]:
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
            "metrics_urls": {f"gateway-{i}": f"http://{mon_host}:{d.monitoring_base_port + i}/metrics"
                             for i in range(d.instances)},
        }

    def _supervise(self) -> None:
        delays: dict[str, float] = {}
        while not self._stopping:
            time.sleep(0.5)
            for p in list(self.processes):
                if self._stopping or p.alive():
                    continue
                code = p.proc.returncode if p.proc else None
                if time.monotonic() - p.started_at > 60:
                    delays.pop(p.name, None)  # it ran well for a while: start the backoff over
                delay = min(delays.get(p.name, 0.5) * 2, 30.0)
                delays[p.name] = delay
                sys.stderr.write(f"cmg: {p.name} exited with code {code}; restarting in {delay:.1f} s\n")
                time.sleep(delay)
                if self._stopping:
                    return
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
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    def stop(self, timeout: float = 30.0) -> None:
        """Drain and stop: connection points, then instances, then the site."""
        self._stopping = True
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
            if p.proc and p.proc.stdout:
                p.proc.stdout.close()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pump_lines(proc: subprocess.Popen[str], lines: "queue.Queue[str]") -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
    except (ValueError, OSError):
        pass
    lines.put(None)  # type: ignore[arg-type]
