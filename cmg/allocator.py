"""The memory allocator the stack's processes run with: mimalloc when installed, else glibc's.

Why: after a gateway has held thousands of client connections, glibc's ``malloc`` stays
slower for good. The TLS sessions kept in the instance's session cache (for resumption)
are scattered over the memory the closed connections freed, and every allocation glibc
serves from its bins (Python's objects over 512 bytes: a 1 KiB body, a tunnel message)
then walks through those holes: ``_int_malloc`` went from 1 % to 10 % of a gateway's CPU
after 6,000 idle connections came and went, and throughput fell by ~10 %.
mimalloc (Microsoft's allocator, Debian package ``libmimalloc2.0``) keeps no such
lists; with it preloaded that slowdown is gone (``docs/performance.md``).

The launcher, and the container's entry point, start every component with
``LD_PRELOAD`` naming the library, as chosen by ``CMG_ALLOCATOR``:

- ``auto`` (the default): mimalloc when it is installed, glibc's malloc otherwise;
- ``mimalloc``: mimalloc, and a start-up error when it is not installed;
- ``glibc``: never preload.

Each component reports what it runs with on its ``READY`` line (``allocator``).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Mapping, MutableMapping

ENV = "CMG_ALLOCATOR"
CHOICES = ("auto", "mimalloc", "glibc")
PACKAGE = "libmimalloc2.0"  # Debian's
_NAMES = ("libmimalloc.so.2", "libmimalloc.so")


class AllocatorError(ValueError):
    """``CMG_ALLOCATOR`` names an unknown allocator, or one that is not installed."""


def _library_dirs() -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{multiarch}", f"/lib/{multiarch}"] if multiarch else []
    dirs += ["/usr/local/lib", "/usr/lib64", "/usr/lib"]
    return [Path(d) for d in dirs]


def library_candidates(dirs: list[Path] | None = None) -> tuple[str, ...]:
    """Where mimalloc's shared library is looked for, in order."""
    return tuple(str(d / name) for d in (dirs if dirs is not None else _library_dirs()) for name in _NAMES)


def find_mimalloc(dirs: list[Path] | None = None) -> str | None:
    """The path of the installed mimalloc shared library, or None."""
    return next((p for p in library_candidates(dirs) if os.path.isfile(p)), None)


def choice(env: Mapping[str, str]) -> str:
    value = env.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise AllocatorError(f"{ENV}={env.get(ENV)!r}: expected one of {', '.join(CHOICES)}")
    return value


def environment(env: MutableMapping[str, str], library: str | None = None) -> MutableMapping[str, str]:
    """``env`` (changed in place and returned) for a component process: ``LD_PRELOAD``
    gains mimalloc unless ``CMG_ALLOCATOR`` says ``glibc`` or it is not installed.
    ``library`` is where mimalloc is (default: looked for)."""
    wanted = choice(env)
    if wanted == "glibc":
        return env
    path = library or find_mimalloc()
    if path is None:
        if wanted == "mimalloc":
            raise AllocatorError(f"{ENV}=mimalloc, but mimalloc is not installed (apt-get install {PACKAGE})")
        return env
    preloaded = env.get("LD_PRELOAD", "").replace(":", " ").split()
    if path not in preloaded:
        env["LD_PRELOAD"] = " ".join([path, *preloaded])
    return env


def in_use(maps: str | None = None) -> str:
    """``mimalloc`` when it is mapped into this process (``/proc/self/maps``, or the text
    given), else ``glibc``."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "glibc"
    return "mimalloc" if "libmimalloc" in maps else "glibc"


def describe(env: Mapping[str, str] | None = None) -> str:
    """One line for a user: what the components will run with, and how to change it."""
    env = os.environ if env is None else env
    wanted = choice(env)
    path = find_mimalloc()
    if wanted == "glibc":
        return f"memory allocator: glibc's malloc ({ENV}=glibc)"
    if path is None:
        return (f"memory allocator: glibc's malloc (mimalloc is not installed: apt-get install {PACKAGE}; "
                "a gateway runs slower after many connections without it)")
    return f"memory allocator: mimalloc ({path})"
