"""The system programs the benchmark runs (and mimalloc, for `./cmgw` too), installed with apt-get when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from cmg import allocator


class MissingTool(Exception):
    """A program the benchmark needs is not installed and cannot be installed here."""


@dataclass(frozen=True)
class Tool:
    program: str
    package: str  # Debian package that provides it
    candidates: tuple[str, ...] = ()  # absolute paths tried when it is not on PATH
    library: bool = False  # a shared library: found among the candidates, not run


TOOLS = {
    "nginx": Tool("nginx", "nginx", ("/usr/sbin/nginx",)),
    "sshd": Tool("sshd", "openssh-server", ("/usr/sbin/sshd",)),
    "ssh": Tool("ssh", "openssh-client", ("/usr/bin/ssh",)),
    "ssh-keygen": Tool("ssh-keygen", "openssh-client", ("/usr/bin/ssh-keygen",)),
    "wrk": Tool("wrk", "wrk", ("/usr/bin/wrk",)),
    "curl": Tool("curl", "curl", ("/usr/bin/curl",)),
    "gcc": Tool("gcc", "gcc", ("/usr/bin/gcc",)),
    "taskset": Tool("taskset", "util-linux", ("/usr/bin/taskset",)),
    "tcpdump": Tool("tcpdump", "tcpdump", ("/usr/bin/tcpdump", "/usr/sbin/tcpdump")),
    # A library, not a program: the CMG stack's allocator (cmg/allocator.py).
    "mimalloc": Tool("libmimalloc.so.2", allocator.PACKAGE, allocator.library_candidates(), library=True),
}


def find(program: str) -> str | None:
    tool = TOOLS[program]
    found = None if tool.library else shutil.which(tool.program)
    if found:
        return found
    for path in tool.candidates:
        if os.path.isfile(path) if tool.library else os.access(path, os.X_OK):
            return path
    return None


def ensure(programs: list[str], log=print) -> dict[str, str]:
    """Paths of ``programs``; installs the missing ones' packages with apt-get as root.

    Raises :class:`MissingTool` naming the packages when they are missing and this
    process cannot install them (not root, or no apt-get).
    """
    missing = [p for p in programs if find(p) is None]
    if missing:
        packages = sorted({TOOLS[p].package for p in missing})
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise MissingTool(
                f"missing {', '.join(missing)}; install them first: sudo apt-get install {' '.join(packages)}"
            )
        log(f"installing {' '.join(packages)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=600)
            done = subprocess.run(install, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=600)
            if done.returncode != 0:
                raise MissingTool(f"apt-get install {' '.join(packages)} failed: {done.stderr.strip()[-400:]}")
        still = [p for p in missing if find(p) is None]
        if still:
            raise MissingTool(f"still missing after apt-get: {', '.join(still)}")
    return {p: find(p) or p for p in programs}
