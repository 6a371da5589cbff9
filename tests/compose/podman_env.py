"""Running docker-compose.yml for real on a machine with no Docker engine: podman.

The recipe of ``../shared/CONTAINERS.md``, as code: install podman, runc, debootstrap
and docker-compose (v1) with apt-get when missing (as root), write podman's own
configuration under a folder of ours (``/var/tmp/cmg-podman`` by default, or
``$CMG_PODMAN_DIR``), build a stand-in for ``python:3.11-slim`` with debootstrap (no
registry is reachable here) and keep it in that folder's image store, so later runs
start in seconds. :class:`PodmanService` runs ``podman system service`` on a socket of
ours, gives the environment ``docker-compose`` needs, and runs the healthchecks podman
does not run without systemd.

Nothing here touches the machine's own podman or Docker configuration: every podman
call gets ``CONTAINERS_CONF`` and ``CONTAINERS_STORAGE_CONF`` pointing into the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

BASE_IMAGE = "docker.io/library/python:3.11-slim"
PACKAGES = ("podman", "runc", "debootstrap")
ROOT = Path(os.environ.get("CMG_PODMAN_DIR", "/var/tmp/cmg-podman"))


class Unavailable(Exception):
    """podman cannot run here; the message says why (the test skips with it)."""


def say(msg: str) -> None:
    print(f"[podman-env] {msg}", flush=True)


def ensure_packages() -> None:
    missing = [p for p in PACKAGES if not shutil.which(p)]
    compose_missing = not shutil.which("docker-compose")
    if not missing and not compose_missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"missing {', '.join(missing + (['docker-compose'] if compose_missing else []))} "
                          "and cannot install them (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    say(f"installing {' '.join(missing)} {'docker-compose' if compose_missing else ''} with apt-get")
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env, stdout=subprocess.DEVNULL)
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    if compose_missing:
        # v1; without recommends it does not pull in a Docker daemon.
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker-compose"],
                       check=True, env=env, stdout=subprocess.DEVNULL)


def write_config(root: Path = ROOT) -> dict[str, str]:
    """podman's configuration for this machine; returns the environment to use."""
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "containers.conf"
    conf.write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'          # crun refuses this kernel's hybrid cgroup layout
        'cgroup_manager = "cgroupfs"\n'  # no systemd
        'events_logger = "file"\n'
        f'events_logfile_path = "{root}/events.log"\n'
        f'tmp_dir = "{root}/tmp"\n'
        "[network]\n"
        f'network_config_dir = "{root}/networks"\n',
        encoding="utf-8",
    )
    storage = root / "storage.conf"
    storage.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{root}/storage"\n'
        f'runroot = "{root}/run"\n',
        encoding="utf-8",
    )
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(conf)
    env["CONTAINERS_STORAGE_CONF"] = str(storage)
    return env


def podman(env: dict[str, str], *args: str, check: bool = True, timeout: float = 600,
           capture: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["podman", *args], env=env, text=True, timeout=timeout,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.PIPE if capture else None)
    if check and r.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def ensure_base_image(env: dict[str, str], root: Path = ROOT) -> float:
    """The python:3.11-slim stand-in (debootstrap bookworm), built once; returns seconds spent."""
    if podman(env, "image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return 0.0
    t0 = time.monotonic()
    rootfs = root / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    say("building the stand-in for python:3.11-slim with debootstrap (once; about a minute)")
    subprocess.run(["debootstrap", "--variant=minbase",
                    # libmimalloc2.0: the Dockerfile installs it with apt-get when the base lacks it
                    # (the official image); here it comes with the base, so the build needs no apt.
                    "--include=python3,python3-venv,python3-pip,ca-certificates,libmimalloc2.0",
                    "bookworm", str(rootfs), "http://deb.debian.org/debian"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    # Make it look like the official image where the Dockerfile cares: python and pip on
    # PATH, and pip allowed to install into the system interpreter (no PEP 668 marker).
    for name, target in (("python", "python3"), ("pip", "pip3")):
        link = rootfs / "usr/bin" / name
        if not link.exists():
            link.symlink_to(target)
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    # This network inspects HTTPS: the host's extra CAs, so pip inside a build trusts it.
    extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    if extra:
        dest = rootfs / "usr/local/share/ca-certificates"
        dest.mkdir(parents=True, exist_ok=True)
        for crt in extra:
            shutil.copy2(crt, dest / crt.name)
        subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    r = subprocess.run(["podman", "import", "--change", "CMD [\"python3\"]", "-", BASE_IMAGE],
                       stdin=tar.stdout, env=env, text=True, capture_output=True, timeout=600)
    tar.wait()
    if r.returncode != 0:
        raise RuntimeError(f"podman import failed: {r.stderr.strip()}")
    shutil.rmtree(rootfs, ignore_errors=True)
    return time.monotonic() - t0


def prepare(root: Path = ROOT) -> dict[str, str]:
    """Packages, configuration and base image; raises :class:`Unavailable` when podman cannot run."""
    ensure_packages()
    env = write_config(root)
    r = podman(env, "info", "--format", "json", check=False, timeout=120)
    if r.returncode != 0:
        raise Unavailable(f"podman info fails here: {r.stderr.strip()[-500:]}")
    ensure_base_image(env, root)
    return env


def remove_project(env: dict[str, str], project: str) -> list[str]:
    """Remove what is left of a compose project (by its label); returns what was found."""
    label = f"label=com.docker.compose.project={project}"
    found: list[str] = []
    for kind, listing, remove in (
        ("container", ["ps", "-a", "-q", "--filter", label], ["rm", "-f", "-t", "0"]),
        ("network", ["network", "ls", "-q", "--filter", label], ["network", "rm", "-f"]),
        ("volume", ["volume", "ls", "-q", "--filter", label], ["volume", "rm", "-f"]),
    ):
        ids = podman(env, *listing, check=False).stdout.split()
        if ids:
            found += [f"{kind} {i}" for i in ids]
            podman(env, *remove, *ids, check=False)
    podman(env, "image", "prune", "-f", check=False)  # superseded builds only
    return found


class PodmanService:
    """``podman system service`` on a socket of ours, plus the healthcheck loop."""

    def __init__(self, env: dict[str, str], root: Path = ROOT) -> None:
        self.root = root
        self.socket = root / "podman.sock"
        self.env = dict(env)
        self.env["DOCKER_HOST"] = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._health: threading.Thread | None = None

    def start(self) -> "PodmanService":
        self._serve()
        self._health = threading.Thread(target=self._healthchecks, daemon=True)
        self._health.start()
        return self

    def ensure_running(self) -> None:
        """Start the API service again if it ended or lost its socket (seen once here)."""
        if self.proc is not None and self.proc.poll() is None and self.socket.exists():
            return
        say(f"podman system service ended (exit {self.proc.poll() if self.proc else None}) "
            f"or lost its socket: starting it again")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self._serve()

    def _serve(self) -> None:
        if self.socket.exists():
            self.socket.unlink()
        log = open(self.root / "service.log", "ab")
        self.proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
                                     env=self.env, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"podman system service did not start (see {self.root / 'service.log'})")
            time.sleep(0.1)

    def _healthchecks(self) -> None:
        # Without systemd podman never runs HEALTHCHECKs, and compose's
        # `condition: service_healthy` would wait for ever: run them every 2 s.
        while not self._stop.wait(2.0):
            try:
                r = podman(self.env, "ps", "--format", "json", check=False, timeout=30)
                for c in json.loads(r.stdout or "[]"):
                    if c.get("State") == "running":
                        podman(self.env, "healthcheck", "run", c["Id"], check=False, timeout=30)
            except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError):
                continue

    def stop(self) -> None:
        self._stop.set()
        if self._health:
            self._health.join(timeout=40)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.socket.exists():
            self.socket.unlink()

    def compose(self, compose_file: Path, *args: str, project: str, timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        self.ensure_running()
        r = subprocess.run(["docker-compose", "-f", str(compose_file), "-p", project, *args],
                           env=self.env, text=True, capture_output=True, timeout=timeout,
                           cwd=compose_file.parent)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r
