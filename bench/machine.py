"""What a run's figures were measured on: the CPU, the kernel, and the versions of what ran.

Ratios are comparable within one run only; figures from two runs are comparable only
when this description is the same (a new VM can change every absolute figure).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from typing import Mapping

# What each tool prints its version with, and the pattern that picks the version out.
_VERSION = {
    "nginx": (["-v"], r"nginx/(\S+)"),
    "ssh": (["-V"], r"(OpenSSH_[^\s,]+)"),
    "wrk": (["-v"], r"wrk (\S+)"),
}


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` of /proc/cpuinfo's text ("" when there is none)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return " ".join(value.split())
    return ""


def tool_version(output: str, pattern: str) -> str:
    """The version a tool printed (to stdout or stderr), or "" when the pattern is not in it."""
    m = re.search(pattern, output)
    return m.group(1) if m else ""


def _run_version(path: str, args: list[str]) -> str:
    try:
        done = subprocess.run([path, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def _openssl() -> str:
    from cryptography.hazmat.backends.openssl.backend import backend
    return backend.openssl_version_text()


def _uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return ""
    return uvloop.__version__


def describe(tools: Mapping[str, str]) -> dict[str, object]:
    """The machine and software of this run, for the progress output and every JSON row."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = cpu_model(f.read())
    except OSError:
        cpu = ""
    out: dict[str, object] = {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": _uvloop(),
        "openssl": _openssl(),
    }
    for name, (args, pattern) in _VERSION.items():
        if name in tools:
            out[name] = tool_version(_run_version(tools[name], args), pattern)
    return out


def summary(info: Mapping[str, object]) -> str:
    """One line for the progress output."""
    return "; ".join(f"{k} {v}" for k, v in info.items() if v not in ("", None))
