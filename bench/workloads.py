"""The workloads and how one is measured against a running scenario (repetitions, medians)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import nginx_conf
from .load import Generators, GeneratorError, Probe
from .procstat import Monitor
from .scenarios import Running
from .stats import median, percentile

SMALL = f"{nginx_conf.CONTENT_PREFIX}/{nginx_conf.SMALL_FILE}"
LARGE = f"{nginx_conf.CONTENT_PREFIX}/{nginx_conf.LARGE_FILE}"
UPLOAD = f"{nginx_conf.CONTENT_PREFIX}/{nginx_conf.UPLOAD_DIR}/upload.bin"

WORKLOADS = ("get-1k", "handshake-full", "handshake-resumed", "download-100m", "upload-100m")
DEFAULT_CONNECTIONS = (1, 16, 64, 256)
HANDSHAKE_CONNECTIONS = 16


@dataclass(frozen=True)
class Settings:
    seconds: float  # one wrk run
    reps: int  # repetitions; headline figures are their medians
    bulk_reps: int
    connections: tuple[int, ...] = DEFAULT_CONNECTIONS
    workloads: tuple[str, ...] = WORKLOADS
    probe_interval: float = 0.01


@dataclass
class Row:
    """One measured (scenario, workload, connections): the JSON object and a table row."""

    scenario: str
    workload: str
    connections: int
    reps: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    mb_per_s: float | None = None
    rss_kb_per_conn: float | None = None
    errors: int = 0
    requests: int = 0
    cpu_s_per_1k_req: dict[str, float] = field(default_factory=dict)
    cpu_s_per_gib: dict[str, float] = field(default_factory=dict)
    peak_rss_kb: dict[str, int] = field(default_factory=dict)
    latency_source: str = "wrk"
    rps_reps: list[float] = field(default_factory=list)
    mb_per_s_reps: list[float] = field(default_factory=list)
    # CPU cores kept busy by processes outside the benchmark during the measurement
    # (other work on the machine): above ~0.1 the figures are disturbed.
    other_cores: float | None = None
    vs_nginx: float | None = None
    vs_direct: float | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


Progress = Callable[[str], None]


def _per_1k(cpu: dict[str, float], requests: int) -> dict[str, float]:
    return {k: round(v * 1000.0 / requests, 4) for k, v in cpu.items()} if requests else {}


def _other_cores(usage, generator_cpu: float) -> float | None:
    if usage.wall_s <= 0:
        return None
    ours = sum(usage.cpu_s.values()) + generator_cpu
    return round(max(0.0, usage.system_busy_s - ours) / usage.wall_s, 2)


def run_get(gen: Generators, run: Running, s: Settings, workload: str, connections: int,
            progress: Progress) -> Row:
    mode = {"get-1k": None, "handshake-full": "full", "handshake-resumed": "resumed"}[workload]
    row = Row(run.name, workload, connections, s.reps)
    results = []
    gen_cpu = 0.0
    with Monitor(run.groups) as mon:
        for rep in range(s.reps):
            r = gen.wrk_get(run.target, SMALL, connections, s.seconds, new_connection=mode)
            results.append(r)
            gen_cpu += r.generator_cpu_s
            bad = f", {r.non_2xx} non-2xx, {r.errors} socket errors" if (r.non_2xx or r.errors) else ""
            progress(f"{run.name} {workload} c={connections} rep {rep + 1}/{s.reps}: "
                     f"{r.rps:,.0f} req/s p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms{bad}")
    assert mon.usage is not None
    row.rps_reps = [round(r.rps, 1) for r in results]
    row.rps = median(r.rps for r in results)
    row.p50_ms = median(r.p50_ms for r in results)
    row.p99_ms = median(r.p99_ms for r in results)
    row.p999_ms = median(r.p999_ms for r in results)
    row.mb_per_s = median(r.mb_per_s for r in results)
    row.requests = sum(r.ok for r in results)
    row.errors = sum(r.non_2xx + r.errors for r in results)
    row.other_cores = _other_cores(mon.usage, gen_cpu)
    cpu = dict(mon.usage.cpu_s)
    cpu["wrk"] = gen_cpu
    row.cpu_s_per_1k_req = _per_1k(cpu, row.requests)
    row.peak_rss_kb = mon.usage.peak_rss_kb
    if mode:
        row.note = "latency excludes the handshake (wrk starts the clock at the request)"
    return row


def run_bulk(gen: Generators, run: Running, s: Settings, workload: str, upload_file: Path,
             progress: Progress) -> Row:
    """100 MiB transfers one at a time (curl), with a small-GET probe on its own connection.

    MB/s of a repetition = bytes / time spent in transfers (curl's own total time, from
    connect to the last byte), so the gaps between curl runs do not count.
    """
    row = Row(run.name, workload, 1, s.bulk_reps, latency_source="probe")
    rates: list[float] = []
    probe_ms: list[float] = []
    probe_errors = 0
    total_bytes = 0
    gen_cpu = 0.0
    with Monitor(run.groups) as mon:
        for rep in range(s.bulk_reps):
            # One repetition: transfers back to back for at least s.seconds (at least one),
            # so the probe gathers enough samples even where a transfer takes 0.1 s.
            done_bytes = 0
            busy = 0.0
            transfers = 0
            with Probe(run.target, SMALL, interval=s.probe_interval) as probe:
                time.sleep(0.05)  # the probe's connection is up before the first transfer
                while transfers == 0 or busy < s.seconds:
                    if workload == "download-100m":
                        status, size, seconds, cpu_s = gen.curl_transfer(run.target, LARGE)
                    else:
                        status, size, seconds, cpu_s = gen.curl_transfer(run.target, UPLOAD, upload=upload_file)
                    gen_cpu += cpu_s
                    if not 200 <= status < 300:
                        raise GeneratorError(f"{run.name} {workload}: HTTP {status}")
                    done_bytes += size
                    busy += seconds
                    transfers += 1
            rate = done_bytes / busy / 1e6
            rates.append(rate)
            total_bytes += done_bytes
            probe_ms.extend(probe.latencies_ms)
            probe_errors += probe.errors
            p99 = percentile(probe.latencies_ms, 99) if probe.latencies_ms else float("nan")
            progress(f"{run.name} {workload} rep {rep + 1}/{s.bulk_reps}: {rate:,.0f} MB/s "
                     f"({transfers} x {size / 2**20:.0f} MiB in {busy:.2f} s), "
                     f"probe {len(probe.latencies_ms)} GETs p99 {p99:.1f} ms"
                     + (f", {probe.errors} probe errors" if probe.errors else ""))
    assert mon.usage is not None
    row.mb_per_s_reps = [round(r, 1) for r in rates]
    row.mb_per_s = median(rates)
    if probe_ms:
        row.p50_ms = percentile(probe_ms, 50)
        row.p99_ms = percentile(probe_ms, 99)
        row.p999_ms = percentile(probe_ms, 99.9)
    row.requests = len(probe_ms)
    row.errors = probe_errors
    row.other_cores = _other_cores(mon.usage, gen_cpu)
    cpu = dict(mon.usage.cpu_s)
    cpu["curl"] = gen_cpu
    gib = total_bytes / 1024**3
    row.cpu_s_per_gib = {k: round(v / gib, 3) for k, v in cpu.items()} if gib else {}
    row.peak_rss_kb = mon.usage.peak_rss_kb
    row.note = "p50/p99: the concurrent 1 KiB probe (one GET every 10 ms on its own connection)"
    return row


def run_scenario(gen: Generators, run: Running, s: Settings, upload_file: Path,
                 progress: Progress, after_gets: Callable[[Running], None] | None = None) -> list[Row]:
    """Every selected workload on one scenario; ``after_gets`` runs after the 1 KiB GETs
    (the profiler's unrecorded extra run)."""
    rows: list[Row] = []
    # Warm-up (not recorded): connections, pools and caches on every hop.
    gen.wrk_get(run.target, SMALL, 16, 1)
    for workload in s.workloads:
        if workload == "get-1k":
            for c in s.connections:
                rows.append(run_get(gen, run, s, workload, c, progress))
            if after_gets is not None:
                after_gets(run)
        elif workload in ("handshake-full", "handshake-resumed"):
            rows.append(run_get(gen, run, s, workload, HANDSHAKE_CONNECTIONS, progress))
        elif workload in ("download-100m", "upload-100m"):
            rows.append(run_bulk(gen, run, s, workload, upload_file, progress))
        else:
            raise ValueError(f"unknown workload {workload!r} (known: {', '.join(WORKLOADS)})")
    return rows


def select(spec: str | None) -> tuple[str, ...]:
    """Workload names for ``--workloads a,b``; raises ``ValueError`` on an unknown one."""
    if not spec:
        return WORKLOADS
    chosen = [w.strip() for w in spec.split(",") if w.strip()]
    for w in chosen:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    return tuple(w for w in WORKLOADS if w in chosen)
