"""The processes a scenario runs: the nginx backend and proxies, sshd and ``ssh -R``.

Each process starts in its own session (its own process group) and is stopped by
signalling that group: SIGTERM, then SIGKILL after a grace period. The CMG itself is
started by the one launcher (``cmg.launcher.Stack``), never here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cmg.launcher import free_port

from . import nginx_conf, ssh_conf
from .nginx_conf import TLSFiles

MiB = 1024 * 1024


class ServerError(Exception):
    """A server of the benchmark did not start; the message says which and why."""


@dataclass
class Managed:
    """One started program and its process group."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None
    extra_pids: list[int] = field(default_factory=list)

    def start(self, cwd: Path) -> "Managed":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         cwd=cwd, start_new_session=True, env=self.env)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                # The leader is gone; make sure no member of its group stays behind.
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            except subprocess.TimeoutExpired:
                continue

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("\n  " + "\n  ".join(text)) if text else ""


def wait_port(port: int, proc: Managed, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ServerError(f"{proc.name} exited with code {proc.proc.returncode if proc.proc else '?'}{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f} s{proc.tail()}")


def write_content(root: Path, large_size: int) -> dict[str, Path]:
    """The backend's files: 1 KiB and the large file (random bytes, written once)."""
    base = root / nginx_conf.CONTENT_PREFIX.lstrip("/")
    base.mkdir(parents=True, exist_ok=True)
    (base / nginx_conf.UPLOAD_DIR).mkdir(exist_ok=True)
    # nginx's workers run as an unprivileged user: they read the tree and write uploads.
    for d in (root, *root.rglob("*")):
        if d.is_dir():
            os.chmod(d, 0o755)
    os.chmod(base / nginx_conf.UPLOAD_DIR, 0o777)
    small = base / nginx_conf.SMALL_FILE
    if not small.exists() or small.stat().st_size != 1024:
        small.write_bytes(os.urandom(1024))
    large = base / nginx_conf.LARGE_FILE
    if not large.exists() or large.stat().st_size != large_size:
        block = os.urandom(MiB)
        with open(large, "wb") as out:
            left = large_size
            while left > 0:
                n = min(left, MiB)
                out.write(block[:n])
                left -= n
    for f in (small, large):
        os.chmod(f, 0o644)
    return {"small": small, "large": large}


class Nginx:
    """One nginx master (backend or proxy) with its own configuration file."""

    def __init__(self, nginx: str, workdir: Path, name: str, conf_text: str, ports: list[int]) -> None:
        self.workdir = workdir
        self.name = name
        self.ports = ports
        conf = workdir / f"{name}.conf"
        conf.write_text(conf_text)
        tmp = workdir / f"{name}-tmp"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        self.proc = Managed(name, [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / f"{name}-error.log")],
                            workdir / f"{name}.out")

    def start(self) -> "Nginx":
        self.proc.start(self.workdir)
        for port in self.ports:
            wait_port(port, self.proc)
        return self

    def stop(self) -> None:
        # nginx's master stops its workers on SIGTERM (fast shutdown).
        self.proc.stop()


class Backend:
    """The cheap, identical backend: nginx static files over HTTP and HTTPS."""

    def __init__(self, nginx: str, workdir: Path, tls: TLSFiles, large_size: int, workers: int = 2) -> None:
        self.root = workdir / "www"
        self.files = write_content(self.root, large_size)
        self.http_port = free_port()
        self.https_port = free_port()
        text = nginx_conf.backend_conf(workdir, self.root, self.http_port, self.https_port, tls, workers)
        self.nginx = Nginx(nginx, workdir, "backend", text, [self.http_port, self.https_port])

    def start(self) -> "Backend":
        self.nginx.start()
        return self

    def stop(self) -> None:
        self.nginx.stop()


class MockSite:
    """The emulator's mock ConfigMgr site (``python -m mock_site``) on its own, for the
    scenarios without a CMG that run the ConfigMgr mix: its MP behind their proxy.

    ``site`` is the ``[site]`` table of the CMG scenarios' overrides (the same roles and
    ports scheme), so the MP is the same code with the same logging as behind the CMG.
    """

    def __init__(self, workdir: Path, name: str, certs: Path, site: dict[str, object]) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mp_port = int(site["mp_port"])  # type: ignore[call-overload]
        conf = self.dir / "site.json"
        conf.write_text(json.dumps({
            "certificates": {"dir": str(certs)},
            "logging": {"dir": str(self.dir / "logs")},
            "site": {**site, "data_dir": str(self.dir / "data")},
        }, indent=2))
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        self.proc = Managed(name, [sys.executable, "-m", "mock_site", "--config", str(conf), "--dir", str(self.dir)],
                            self.dir / "mock_site.out", env=env)

    def start(self) -> "MockSite":
        self.proc.start(self.dir)
        wait_port(self.mp_port, self.proc, timeout=30)
        return self

    def stop(self) -> None:
        self.proc.stop()


class SshTunnel:
    """sshd on loopback ("cloud") and ``ssh -tt -R`` dialled to it from "on-prem".

    The remote forward listens on ``self.remote_port`` on the sshd side; connections
    to it cross the one SSH connection to the backend.
    """

    def __init__(self, sshd: str, ssh: str, keygen: str, workdir: Path, backend_port: int,
                 hold_seconds: int = 7200, mp_port: int | None = None) -> None:
        self.dir = workdir / "ssh"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.port = free_port()
        self.remote_port = free_port()
        # The mock site's MP ("on-prem" too) over the same SSH connection, when given.
        self.remote_mp_port = free_port() if mp_port is not None else None
        more = ((self.remote_mp_port, mp_port),) if mp_port is not None and self.remote_mp_port else ()
        user = _user()
        host_key = self.dir / "host_ed25519"
        client_key = self.dir / "client_ed25519"
        for key in (host_key, client_key):
            if not key.exists():
                subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)],
                               check=True, stdout=subprocess.DEVNULL, timeout=30)
        authorized = self.dir / "authorized_keys"
        authorized.write_text((client_key.with_suffix(".pub")).read_text())
        known = self.dir / "known_hosts"
        known.write_text(f"[127.0.0.1]:{self.port} {host_key.with_suffix('.pub').read_text().split(' ', 2)[0]} "
                         f"{host_key.with_suffix('.pub').read_text().split(' ', 2)[1]}\n")
        conf = self.dir / "sshd_config"
        conf.write_text(ssh_conf.sshd_config(self.dir, self.port, host_key, authorized, user))
        # Debian's sshd wants its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.sshd = Managed("sshd", [sshd, "-D", "-e", "-f", str(conf)], self.dir / "sshd.log")
        self.ssh = Managed("ssh", ssh_conf.ssh_reverse_argv(ssh, self.port, client_key, known, user,
                                                            self.remote_port, backend_port, hold_seconds,
                                                            more),
                           self.dir / "ssh.log")

    def start(self) -> "SshTunnel":
        self.sshd.start(self.dir)
        wait_port(self.port, self.sshd)
        self.ssh.start(self.dir)
        wait_port(self.remote_port, self.ssh, timeout=20)
        if self.remote_mp_port is not None:
            wait_port(self.remote_mp_port, self.ssh, timeout=20)
        return self

    def stop(self) -> None:
        self.ssh.stop()
        self.sshd.stop()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
