"""The workloads and how one is measured against a running scenario (repetitions, medians)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import nginx_conf
from .idle import IdleConnections
from .load import Generators, GeneratorError, Probe, WrkResult
from .procstat import Monitor, Usage
from .scenarios import Running
from .stats import median, percentile

SMALL = f"{nginx_conf.CONTENT_PREFIX}/{nginx_conf.SMALL_FILE}"
LARGE = f"{nginx_conf.CONTENT_PREFIX}/{nginx_conf.LARGE_FILE}"
UPLOAD = f"{nginx_conf.CONTENT_PREFIX}/{nginx_conf.UPLOAD_DIR}/upload.bin"

WORKLOADS = ("get-1k", "handshake-full", "handshake-resumed", "handshake-full-nocert",
             "handshake-resumed-nocert", "cmgmix", "download-100m", "upload-100m", "idle-6000")
DEFAULT_CONNECTIONS = (1, 16, 64, 256)
HANDSHAKE_CONNECTIONS = 16
MIX_CONNECTIONS = 16
IDLE_CONNECTIONS = 6000
QUICK_IDLE_CONNECTIONS = 300
HANDSHAKE_MODES = {"get-1k": None, "handshake-full": "full", "handshake-resumed": "resumed",
                   "handshake-full-nocert": "full", "handshake-resumed-nocert": "resumed"}


@dataclass(frozen=True)
class Settings:
    seconds: float  # one wrk run
    reps: int  # repetitions; headline figures are their medians
    bulk_reps: int
    connections: tuple[int, ...] = DEFAULT_CONNECTIONS
    workloads: tuple[str, ...] = WORKLOADS
    probe_interval: float = 0.01
    # The workloads added last are kept short in --quick (one repetition each).
    extra_reps: int | None = None
    extra_seconds: float | None = None  # their run length (default: seconds)
    idle_connections: int = IDLE_CONNECTIONS
    idle_settle: float = 1.0  # seconds the server is left before its RSS is read
    large_size: int = 100 * 1024 * 1024  # the file the mix's Range reads address

    @property
    def new_reps(self) -> int:
        return self.extra_reps or self.reps

    @property
    def new_seconds(self) -> float:
        return self.extra_seconds or self.seconds


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
    # per process group, the share of its CPU time that was system (kernel) time
    cpu_kernel_share: dict[str, float] = field(default_factory=dict)
    peak_rss_kb: dict[str, int] = field(default_factory=dict)
    latency_source: str = "wrk"
    rps_reps: list[float] = field(default_factory=list)
    # cmgmix: completed operations per kind (ccm_post, policy_get, bits_upload, range_read)
    op_counts: dict[str, int] = field(default_factory=dict)
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
    """One scenario's row for a wrk workload (1 KiB GETs, or a handshake workload)."""
    return run_gets(gen, [run], s, workload, connections, progress)[0]


def run_gets(gen: Generators, runs: Sequence[Running], s: Settings, workload: str, connections: int,
             progress: Progress) -> list[Row]:
    """A wrk workload on several running scenarios, interleaved: repetition 1 on each in
    turn, then repetition 2, and so on. The machine's speed drifts by tens of per cent
    over minutes (other tenants of the VM host); scenarios measured side by side in the
    same minutes share the drift, so their ratios do not carry it. Each wrk run is
    measured on its own (CPU, RSS), and a row adds up its runs."""
    mode = HANDSHAKE_MODES[workload]
    nocert = workload.endswith("-nocert")
    targets = [run.nocert if nocert else run.target for run in runs]
    for run, target in zip(runs, targets):
        if target is None:
            raise GeneratorError(f"{run.name} has no target without a client certificate")
    reps = s.new_reps if nocert else s.reps
    seconds = s.new_seconds if nocert else s.seconds
    results: list[list[WrkResult]] = [[] for _ in runs]
    usages: list[list[Usage]] = [[] for _ in runs]
    for rep in range(reps):
        for i, (run, target) in enumerate(zip(runs, targets)):
            with Monitor(run.groups) as mon:
                r = gen.wrk_get(target, SMALL, connections, seconds, new_connection=mode)
            assert mon.usage is not None
            results[i].append(r)
            usages[i].append(mon.usage)
            bad = f", {r.non_2xx} non-2xx, {r.errors} socket errors" if (r.non_2xx or r.errors) else ""
            progress(f"{run.name} {workload} c={connections} rep {rep + 1}/{reps}: "
                     f"{r.rps:,.0f} req/s p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms{bad}")
    rows = []
    for run, run_results, run_usages in zip(runs, results, usages):
        row = _get_row(run, workload, connections, reps, run_results, Usage.combined(run_usages))
        if len(runs) > 1:
            row.note = "; ".join(filter(None, [row.note, INTERLEAVED]))
        rows.append(row)
    return rows


INTERLEAVED = "repetitions interleaved with the other scenarios'"


def _get_row(run: Running, workload: str, connections: int, reps: int, results: list[WrkResult],
             usage: Usage) -> Row:
    mode = HANDSHAKE_MODES[workload]
    nocert = workload.endswith("-nocert")
    row = Row(run.name, workload, connections, reps)
    gen_cpu = sum(r.generator_cpu_s for r in results)
    row.rps_reps = [round(r.rps, 1) for r in results]
    row.rps = median(r.rps for r in results)
    row.p50_ms = median(r.p50_ms for r in results)
    row.p99_ms = median(r.p99_ms for r in results)
    row.p999_ms = median(r.p999_ms for r in results)
    row.mb_per_s = median(r.mb_per_s for r in results)
    row.requests = sum(r.ok for r in results)
    row.errors = sum(r.non_2xx + r.errors for r in results)
    row.other_cores = _other_cores(usage, gen_cpu)
    cpu = dict(usage.cpu_s)
    cpu["wrk"] = gen_cpu
    row.cpu_s_per_1k_req = _per_1k(cpu, row.requests)
    row.peak_rss_kb = usage.peak_rss_kb
    row.cpu_kernel_share = usage.kernel_share()
    if mode:
        row.note = "latency excludes the handshake (wrk starts the clock at the request)"
    if nocert:
        row.note += ("; no client certificate" + ("; CCM_Proxy_ServerAuth with a site-issued CCM token "
                                                   "(Authorization: Bearer), checked by the gateway"
                                                   if run.name.startswith("cmg") else ""))
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
    row.cpu_kernel_share = mon.usage.kernel_share()
    row.note = "p50/p99: the concurrent 1 KiB probe (one GET every 10 ms on its own connection)"
    return row


def _mix_config(run: Running, s: Settings, seconds: float) -> dict[str, Any]:
    t = run.target
    host, port = t.address
    return {"host": host, "port": port, "server_name": t.host, "ca": str(t.ca),
            "cert": str(t.client_cert) if t.client_cert else None,
            "key": str(t.client_key) if t.client_key else None,
            "content_path": t.path(LARGE), "content_size": s.large_size,
            "mp_prefix": run.mp_prefix, "connections": MIX_CONNECTIONS, "seconds": seconds}


MIX_SKIPPED = ("skipped: no ConfigMgr site behind this scenario (the mix's CCM_POST, BITS_POST and "
               "policy requests need a management point)")
MIX_CEILING = ("the mix generator's ceiling, not the mix: Range reads only (64 KiB at random offsets of the "
               "large file), since there is no management point behind the backend; no ratios")


def run_mix(gen: Generators, run: Running, s: Settings, progress: Progress) -> Row:
    """The ConfigMgr mix through the CMG (MP on the mock site, DP = the backend), by the
    asyncio generator in :mod:`bench.mix`; on ``direct`` the generator's ceiling (Range
    reads only); skipped (a row with a note) where there is no site behind the proxy."""
    reps = s.new_reps
    row = Row(run.name, "cmgmix", MIX_CONNECTIONS, reps, latency_source="mix")
    if run.mp_prefix is None and run.name != "direct":
        row.reps = 0
        row.note = MIX_SKIPPED
        progress(f"{run.name} cmgmix: {MIX_SKIPPED}")
        return row
    results: list[dict[str, Any]] = []
    gen_cpu = 0.0
    with Monitor({**run.groups, **run.mix_groups}) as mon:
        for rep in range(reps):
            r, _ = gen.mix(_mix_config(run, s, s.new_seconds), timeout=s.new_seconds + 120)
            results.append(r)
            gen_cpu += float(r["cpu_s"])
            ops = " ".join(f"{k} {v}" for k, v in r["ops"].items() if v)
            bad = f", {r['errors']} errors ({'; '.join(r['error_samples'][:2])})" if r["errors"] else ""
            progress(f"{run.name} cmgmix c={MIX_CONNECTIONS} rep {rep + 1}/{reps}: {r['rps']:,.0f} req/s "
                     f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms; ops: {ops}; generator "
                     f"{float(r['cpu_s']) / max(float(r['seconds']), 1e-9):.2f} cores{bad}")
    assert mon.usage is not None
    row.rps_reps = [round(float(r["rps"]), 1) for r in results]
    row.rps = median(float(r["rps"]) for r in results)
    row.p50_ms = median(float(r["p50_ms"]) for r in results)
    row.p99_ms = median(float(r["p99_ms"]) for r in results)
    row.p999_ms = median(float(r["p999_ms"]) for r in results)
    seconds = sum(float(r["seconds"]) for r in results)
    row.mb_per_s = median((float(r["bytes_in"]) + float(r["bytes_out"])) / float(r["seconds"]) / 1e6
                          for r in results if float(r["seconds"]) > 0)
    row.requests = sum(int(r["ok"]) for r in results)
    row.errors = sum(int(r["errors"]) for r in results)
    row.op_counts = {op: sum(int(r["ops"][op]) for r in results) for op in results[0]["ops"]}
    row.other_cores = _other_cores(mon.usage, gen_cpu)
    # The servers also answered the generator's set-up and warm-up requests (the same
    # schedule) inside the monitored window; the generator's CPU is its measured run's.
    served = row.requests + sum(int(r["unmeasured"]) for r in results)
    row.cpu_s_per_1k_req = {**_per_1k(dict(mon.usage.cpu_s), served), **_per_1k({"mix": gen_cpu}, row.requests)}
    row.peak_rss_kb = mon.usage.peak_rss_kb
    row.cpu_kernel_share = mon.usage.kernel_share()
    gen_cores = gen_cpu / seconds if seconds else 0.0
    ops = ", ".join(f"{k} {v}" for k, v in row.op_counts.items())
    op_p50 = ", ".join(f"{k} {v:.1f}" for k, v in results[-1]["op_p50_ms"].items())
    if run.mp_prefix is None:
        row.note = f"{MIX_CEILING}; generator {gen_cores:.2f} cores"
    else:
        where = ("through the CMG: MP on the mock site (via the connection point), Range reads from the DP "
                 "role (the backend)" if run.name.startswith("cmg") else
                 "the same requests: the MP's paths proxied by nginx" + (" over the SSH tunnel" if run.name ==
                                                                          "ssh-tunnel" else "")
                 + " to the same mock site code (started for this scenario), Range reads from the backend")
        row.note = (f"ConfigMgr mix {where}; site = the mock site's process; ops {ops}; p50 per op (ms, last "
                    f"rep) {op_p50}; a BITS upload is 3 requests; MB/s counts both directions; generator "
                    f"{gen_cores:.2f} cores (asyncio+uvloop, pinned)")
    return row


def run_idle(run: Running, s: Settings, progress: Progress) -> Row:
    """``idle-6000``: N idle keep-alive TLS connections (client certificate, one request
    each); RSS of the serving process group before and after; then one more request on each."""
    n = s.idle_connections
    row = Row(run.name, "idle-6000", n, 1, latency_source="idle-check")
    group = run.serving_group
    # A few connections first (not counted): the path's first-request allocations
    # (upstream pools, caches) are not the idle connections' cost.
    with IdleConnections(run.target, SMALL, 8, threads=2) as warm:
        warm.open()
    time.sleep(s.idle_settle / 2)
    before = _group_rss(run)
    with IdleConnections(run.target, SMALL, n) as idle:
        opened = idle.open()
        progress(f"{run.name} idle-6000: {opened.opened:,}/{n:,} connections open in {opened.seconds:.1f} s "
                 f"({opened.resumed:,} resumed handshakes, {opened.errors} errors)")
        time.sleep(s.idle_settle)  # the server settles (allocator, buffers) before RSS is read
        after = _group_rss(run)
        check = idle.check()
    per_conn = ((after[group] - before[group]) / opened.opened) if opened.opened else None
    row.rss_kb_per_conn = round(per_conn, 2) if per_conn is not None else None
    row.requests = check.served
    row.errors = opened.errors + check.errors + (n - opened.opened - opened.errors)
    if check.latencies_ms:
        row.p50_ms = percentile(check.latencies_ms, 50)
        row.p99_ms = percentile(check.latencies_ms, 99)
        row.p999_ms = percentile(check.latencies_ms, 99.9)
    row.peak_rss_kb = after
    deltas = ", ".join(f"{k} {(after[k] - before.get(k, 0)) / 1024:+.1f} MiB" for k in after)
    served = "all served" if check.served == n else f"NOT all served: {check.served:,}/{n:,}"
    samples = "; ".join((opened.error_samples + check.error_samples)[:2])
    row.note = (f"{served}; rss_kb_per_conn = RSS delta of {group} / {opened.opened:,} open connections; "
                f"RSS delta per group: {deltas}; set-up {opened.seconds:.1f} s ({opened.resumed:,} resumed), "
                f"check {check.seconds:.1f} s; p50/p99: the second request on each connection"
                + (f"; errors: {samples}" if samples else ""))
    if run.name.startswith("cmg-") and len(run.groups["gateway"]()) > 1:
        row.note += "; the connections are spread over the instances (SO_REUSEPORT)"
    progress(f"{run.name} idle-6000: {served}; {group} {row.rss_kb_per_conn} KiB per connection "
             f"({deltas}); check p50 {row.p50_ms or float('nan'):.2f} ms")
    return row


def _group_rss(run: Running) -> dict[str, int]:
    from .procstat import group_rss_kb

    return {name: group_rss_kb(pids()) for name, pids in run.groups.items()}


def run_all(gen: Generators, runs: Sequence[Running], s: Settings, upload_file: Path,
            progress: Progress, after_gets: Callable[[Running], None] | None = None) -> list[Row]:
    """Every selected workload on every scenario, all of them running side by side.

    ``idle-6000`` first, on each scenario's servers before they have served anything else:
    memory they freed but kept (allocator arenas, buffers) would otherwise be reused by the
    idle connections and hide their cost. Then the 1 KiB GETs, interleaved across the
    scenarios (:func:`run_gets`: the headline ratios), ``after_gets`` on each scenario (the
    profiler's and the hop timer's unrecorded extra runs), and the other workloads one
    scenario at a time. Rows come back in the table's order: by scenario, then workload."""
    rows: list[Row] = []
    if "idle-6000" in s.workloads:
        for run in runs:
            rows.append(run_idle(run, s, progress))
    rest = [w for w in s.workloads if w != "idle-6000"]
    if rest:
        for run in runs:  # warm-up, not recorded: connections, pools and caches on every hop
            gen.wrk_get(run.target, SMALL, 16, 1)
    if "get-1k" in rest:
        for c in s.connections:
            rows.extend(run_gets(gen, runs, s, "get-1k", c, progress))
        if after_gets is not None:
            for run in runs:
                after_gets(run)
    for run in runs:
        for workload in rest:
            if workload == "get-1k":
                continue
            if workload in HANDSHAKE_MODES:
                rows.append(run_get(gen, run, s, workload, HANDSHAKE_CONNECTIONS, progress))
            elif workload == "cmgmix":
                rows.append(run_mix(gen, run, s, progress))
            elif workload in ("download-100m", "upload-100m"):
                rows.append(run_bulk(gen, run, s, workload, upload_file, progress))
            else:
                raise ValueError(f"unknown workload {workload!r} (known: {', '.join(WORKLOADS)})")
    order = {run.name: i for i, run in enumerate(runs)}
    return sorted(rows, key=lambda r: (order[r.scenario], WORKLOADS.index(r.workload)))


def select(spec: str | None) -> tuple[str, ...]:
    """Workload names for ``--workloads a,b``; raises ``ValueError`` on an unknown one."""
    if not spec:
        return WORKLOADS
    chosen = [w.strip() for w in spec.split(",") if w.strip()]
    for w in chosen:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    return tuple(w for w in WORKLOADS if w in chosen)
