"""The tunnel's core and its asyncio driver compiled to C by mypyc: building them, and
using the build only when it was built from exactly the sources on disk.

The compiled modules (:data:`MODULES`: frames, protocol, events and what they import, and
the driver, session) are plain, fully typed Python (``mypy --strict``), which mypyc
compiles as it is: the same code, the same behaviour, faster (the core about twice: one
request's round trip through both ends of the protocol, in process: 54 -> 29 us; the
driver a few per cent of each process's CPU per request; see docs/performance.md). One
rule for the driver: no ``await`` in a ``finally`` clause (compiled, one re-raised a
stale exception; ``tests/tunnel/test_session.py``). Nothing depends on the
compiled build: without it (no C compiler, no mypy, ``CMG_PURE_PYTHON=1``, or sources
edited since the build) the same modules run as Python.

Builds never go into the source tree, where a stale ``.so`` would silently shadow an
edited ``.py``. Each lives in a folder named by a hash of the sources, the Python
version and the mypy version (:func:`build_dir`); :func:`activate` (run by
``tunnel/__init__.py`` before the core is imported) puts that folder first on the
package's path only if it exists for the sources as they are now.
``./cmgw`` builds it after installing, ``cmg bench`` before it starts (:func:`build`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

#: The compiled modules: the protocol core and the modules it imports (no I/O, no
#: asyncio), and the asyncio driver that runs it over a websocket.
MODULES = ("codes", "errors", "limits", "events", "frames", "protocol", "session")
PACKAGE_DIR = Path(__file__).resolve().parent
#: Set to 1 to run the pure-Python core even when a build exists.
PURE_ENV = "CMG_PURE_PYTHON"
#: Where builds go (default: ``cmg-compiled`` in the virtualenv, else the user's cache).
DIR_ENV = "CMG_COMPILED_DIR"

#: Builds kept side by side (one per version of the sources).
KEEP_BUILDS = 4

active = False  # whether this process imports the core from a build


def _mypy_version() -> str:
    try:
        from importlib.metadata import version

        return version("mypy")
    except Exception:
        return "none"


def source_key() -> str:
    """What a build must match: the core's sources, Python's ABI and mypy's version."""
    digest = hashlib.sha256()
    for name in MODULES:
        digest.update(name.encode() + b"\0" + (PACKAGE_DIR / f"{name}.py").read_bytes() + b"\0")
    digest.update(sys.version.encode() + str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    digest.update(_mypy_version().encode())
    return digest.hexdigest()[:20]


def _root() -> Path:
    override = os.environ.get(DIR_ENV)
    if override:
        return Path(override)
    if sys.prefix != sys.base_prefix:  # a virtualenv: the build belongs to it
        return Path(sys.prefix) / "cmg-compiled"
    return Path.home() / ".cache" / "cmg-emulator" / "compiled"


def build_dir(key: str | None = None) -> Path:
    return _root() / (key or source_key())


def _complete(folder: Path) -> bool:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return all((folder / "tunnel" / f"{name}{suffix}").exists() for name in MODULES)


def activate(package_path: list[str]) -> bool:
    """Put the build for the current sources first on the package's path, if there is one."""
    global active
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return False
    try:
        folder = build_dir()
    except OSError:
        return False
    if not _complete(folder):
        return False
    package_path.insert(0, str(folder / "tunnel"))
    if str(folder) not in sys.path:
        sys.path.append(str(folder))  # mypyc's shared runtime module sits at the top
    active = True
    return True


def build() -> Path | None:
    """Compile the core for the current sources (nothing to do when the build exists);
    the build's folder, or None when it cannot be built here (the reason is printed)."""
    key = source_key()
    folder = build_dir(key)
    if _complete(folder):
        return folder
    if _mypy_version() == "none":
        print("tunnel.compiled: mypy (mypyc) is not installed: the tunnel core runs as pure Python", file=sys.stderr)
        return None
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cmg-mypyc-") as tmp:
        work = Path(tmp)
        (work / "tunnel").mkdir()
        (work / "tunnel" / "__init__.py").write_text("")
        for name in MODULES:
            shutil.copy2(PACKAGE_DIR / f"{name}.py", work / "tunnel" / f"{name}.py")
        cmd = [sys.executable, "-m", "mypyc", *(f"tunnel/{name}.py" for name in MODULES)]
        result = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            print(f"tunnel.compiled: mypyc failed; the tunnel core runs as pure Python:\n{tail}", file=sys.stderr)
            return None
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
        (staging / "tunnel").mkdir()
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        for path in work.glob(f"*{suffix}"):  # mypyc's shared runtime for the group
            shutil.move(str(path), staging / path.name)
        for name in MODULES:
            shutil.move(str(work / "tunnel" / f"{name}{suffix}"), staging / "tunnel" / f"{name}{suffix}")
        try:
            staging.rename(folder)
        except OSError:  # another process built it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    _prune(folder)
    print(f"tunnel.compiled: compiled the tunnel core ({', '.join(MODULES)}) with mypyc in "
              f"{time.monotonic() - started:.0f} s: {folder}", file=sys.stderr)
    return folder


def _prune(current: Path) -> None:
    """Remove the oldest builds of other sources, keeping ``KEEP_BUILDS`` in all: a second
    checkout or worktree on the same virtualenv has sources of its own, and its build."""
    others = sorted((old for old in current.parent.iterdir()
                     if old != current and old.is_dir() and not old.name.startswith(".")),
                    key=lambda old: old.stat().st_mtime, reverse=True)
    for old in others[KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def main(quiet: bool = False) -> None:
    """Build, saying where to (``./cmgw`` runs ``import tunnel.compiled as c; c.main()``)."""
    folder = build()
    if folder is not None and not quiet:
        print(folder)


if __name__ == "__main__":
    main()
