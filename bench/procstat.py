"""CPU time and resident memory of the processes under test, per named group."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import psutil


@dataclass(frozen=True)
class Usage:
    cpu_s: dict[str, float]  # CPU seconds (user + system) used per group during the run
    peak_rss_kb: dict[str, int]  # highest summed RSS per group seen during the run
    wall_s: float = 0.0
    system_busy_s: float = 0.0  # busy CPU seconds of the machine (all cores), minus this process
    kernel_s: dict[str, float] = field(default_factory=dict)  # the system (kernel) part of cpu_s

    def kernel_share(self) -> dict[str, float]:
        """Per group, the share of its CPU time spent in the kernel (system time)."""
        return {k: round(self.kernel_s.get(k, 0.0) / v, 2) for k, v in self.cpu_s.items() if v > 0}

    @staticmethod
    def combined(usages: Sequence[Usage]) -> Usage:
        """Several measured runs as one: times added up, the highest peak RSS."""
        cpu: dict[str, float] = {}
        kernel: dict[str, float] = {}
        peak: dict[str, int] = {}
        for u in usages:
            for k, v in u.cpu_s.items():
                cpu[k] = cpu.get(k, 0.0) + v
            for k, v in u.kernel_s.items():
                kernel[k] = kernel.get(k, 0.0) + v
            for k, rss in u.peak_rss_kb.items():
                peak[k] = max(peak.get(k, 0), rss)
        return Usage(cpu, peak, sum(u.wall_s for u in usages), sum(u.system_busy_s for u in usages), kernel)


def system_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (everything but idle and iowait)."""
    t = psutil.cpu_times()
    return float(sum(getattr(t, f) for f in ("user", "nice", "system", "irq", "softirq", "steal")
                     if hasattr(t, f)))


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _cpu(procs: list[psutil.Process]) -> tuple[float, float]:
    """(user + system, system) CPU seconds of ``procs``."""
    total = kernel = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
            kernel += t.system
        except psutil.Error:
            pass
    return total, kernel


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total // 1024


def group_rss_kb(pids: list[int]) -> int:
    """Summed RSS (KiB) of the process trees rooted at ``pids`` now."""
    procs: list[psutil.Process] = []
    for pid in pids:
        procs.extend(_tree(pid))
    return _rss(procs)


def _own_cpu() -> float:
    # The benchmark's own process (probe thread, this sampler) is not "other" work.
    t = psutil.Process().cpu_times()
    return t.user + t.system


class Monitor:
    """Measures groups of process trees over one run: ``with Monitor(groups) as m: ...``.

    ``groups`` maps a name (``gateway``, ``connector``, ``backend``...) to a function
    returning the root pids of that group now (restarted processes are picked up).
    CPU is the difference of the trees' CPU times at the end and at the start; RSS is
    sampled every ``interval`` seconds in a thread.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]], interval: float = 0.2) -> None:
        self._groups = groups
        self._interval = interval
        self._start: dict[str, dict[int, tuple[float, float]]] = {}
        self._peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.usage: Usage | None = None

    def _procs(self, name: str) -> list[psutil.Process]:
        out: list[psutil.Process] = []
        for pid in self._groups[name]():
            out.extend(_tree(pid))
        return out

    def _per_pid_cpu(self, name: str) -> dict[int, tuple[float, float]]:
        out = {}
        for p in self._procs(name):
            out[p.pid] = _cpu([p])
        return out

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            for name in self._groups:
                self._peak[name] = max(self._peak.get(name, 0), _rss(self._procs(name)))

    def __enter__(self) -> "Monitor":
        self._t0 = time.monotonic()
        self._busy0 = system_busy() - _own_cpu()
        self._start = {name: self._per_pid_cpu(name) for name in self._groups}
        self._peak = {name: _rss(self._procs(name)) for name in self._groups}
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        cpu: dict[str, float] = {}
        kernel: dict[str, float] = {}
        for name in self._groups:
            end = self._per_pid_cpu(name)
            before = self._start.get(name, {})
            # A process born during the run counts from zero.
            cpu[name] = sum(max(0.0, t - before.get(pid, (0.0, 0.0))[0]) for pid, (t, _) in end.items())
            kernel[name] = sum(max(0.0, k - before.get(pid, (0.0, 0.0))[1]) for pid, (_, k) in end.items())
            self._peak[name] = max(self._peak.get(name, 0), _rss(self._procs(name)))
        self.usage = Usage(cpu, dict(self._peak), time.monotonic() - self._t0,
                           system_busy() - _own_cpu() - self._busy0, kernel)
