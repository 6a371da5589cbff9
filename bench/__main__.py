"""``python -m bench`` / ``cmg bench``: run the scenarios, print the table, write JSON and PNG."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from cmg import allocator
from tunnel import compiled

from . import hops
from . import profile as profiling
from . import machine, report, scenarios, sysdeps, workloads
from .idle import raise_nofile
from .load import GeneratorError, Generators, build_shim
from .servers import Backend, ServerError

MiB = 1024 * 1024


def tunnel_core() -> str:
    """How the measured processes run the tunnel core: compiled (built now if need be) or not."""
    if os.environ.get(compiled.PURE_ENV, "") not in ("", "0"):
        return f"pure Python ({compiled.PURE_ENV} is set)"
    folder = compiled.build()
    return f"compiled by mypyc ({folder})" if folder is not None else "pure Python (no mypyc build)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmg bench", description=(
        "Benchmark the CMG path against direct HTTPS, an nginx TLS proxy and an SSH reverse "
        "tunnel, all in front of the same nginx backend on loopback."))
    p.add_argument("--quick", action="store_true", help="short runs (the whole run in under 5 minutes)")
    p.add_argument("--json", type=Path, help="write the results as a JSON list to FILE")
    p.add_argument("--plot", type=Path, help="write a PNG plot to FILE (needs matplotlib)")
    p.add_argument("--only", help=f"comma-separated scenarios ({', '.join(scenarios.SCENARIOS)}; "
                                  "'cmg' = every cmg variant)")
    p.add_argument("--workloads", help=f"comma-separated workloads ({', '.join(workloads.WORKLOADS)})")
    p.add_argument("--connections", help="keep-alive connection counts for get-1k (default 1,16,64,256)")
    p.add_argument("--seconds", type=float, help="seconds per wrk run (default 10, --quick 1.5)")
    p.add_argument("--reps", type=int, help="repetitions per measurement (default 3)")
    p.add_argument("--generator-cpus", default="1",
                   help="CPU list the load generators are pinned to with taskset ('' = no pinning; default 1)")
    p.add_argument("--large-mib", type=int, default=100, help="size of the bulk transfer file in MiB (default 100)")
    p.add_argument("--idle-connections", type=int,
                   help=f"idle TLS connections for idle-6000 (default {workloads.IDLE_CONNECTIONS:,}; "
                        f"--quick {workloads.QUICK_IDLE_CONNECTIONS:,})")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy the gateway and connection points during an extra run")
    p.add_argument("--profile-connections", type=int, default=64, metavar="N",
                   help="keep-alive connections of the profiled run (default 64)")
    p.add_argument("--profile-gil", action="store_true",
                   help="count only samples holding the GIL (Python's own work, and uvloop's system "
                        "calls, which hold it; OpenSSL calls through cffi release it) instead of wall time")
    p.add_argument("--hops", type=Path, metavar="DIR",
                   help="time each hop of a request through the CMG (gateway in/out, connection point "
                        "in/out, backend) at 1 connection from loopback packet timestamps (tcpdump) "
                        "during an extra run; medians in DIR/<scenario>-hops.txt and .json")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs) afterwards")
    return p


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    try:
        names = scenarios.select(args.only)
        chosen = workloads.select(args.workloads)
        conns = tuple(int(c) for c in args.connections.split(",")) if args.connections else workloads.DEFAULT_CONNECTIONS
        alloc = allocator.choice(os.environ)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    settings = workloads.Settings(
        seconds=args.seconds or (1.5 if args.quick else 10.0),
        reps=args.reps or 3,
        bulk_reps=args.reps or 3,
        connections=conns,
        workloads=chosen,
        # The mix, the handshakes without a client certificate and idle-6000 are kept
        # short in --quick: one repetition each, fewer idle connections.
        extra_reps=args.reps or (1 if args.quick else None),
        extra_seconds=args.seconds or (1.0 if args.quick else None),
        idle_settle=0.4 if args.quick else 1.0,
        idle_connections=args.idle_connections or (workloads.QUICK_IDLE_CONNECTIONS if args.quick
                                                   else workloads.IDLE_CONNECTIONS),
        large_size=args.large_mib * MiB,
    )
    if settings.idle_connections < 1:
        print("bench: --idle-connections must be at least 1", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("bench: --plot needs matplotlib: pip install matplotlib (or the 'bench' extra)", file=sys.stderr)
            return 2

    needed = ["nginx", "wrk", "curl", "gcc", "taskset"]
    if args.hops:
        needed.append("tcpdump")
    if "ssh-tunnel" in names:
        needed += ["sshd", "ssh", "ssh-keygen"]
    if any(n.startswith("cmg") for n in names) and alloc != "glibc":
        needed.append("mimalloc")  # what the stack runs with when it is installed (cmg/allocator.py)
    try:
        tools = sysdeps.ensure(needed, log=progress)
    except sysdeps.MissingTool as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    py_spy = None
    if args.profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.access(py_spy, os.X_OK):
            print("bench: --profile needs py-spy: pip install py-spy", file=sys.stderr)
            return 2

    if "idle-6000" in chosen:
        # The generator holds every idle connection, and the servers started below
        # inherit this limit (nginx raises its own: worker_rlimit_nofile).
        limit = raise_nofile(settings.idle_connections + 4096)
        if limit < settings.idle_connections + 256:
            print(f"bench: the open-files limit is {limit}, too low for {settings.idle_connections:,} idle "
                  "connections; lower --idle-connections or raise ulimit -n", file=sys.stderr)
            return 2
    previous = signal.signal(signal.SIGTERM, _sigterm)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = Path(tempfile.mkdtemp(prefix="cmg-bench-", dir=base))
    # nginx's workers (an unprivileged user) read the files under it.
    workdir.chmod(0o755)
    rows: list[workloads.Row] = []
    backend: Backend | None = None
    measured_on = machine.describe(tools)
    try:
        progress(f"work folder {workdir}; scenarios {', '.join(names)}; workloads {', '.join(chosen)}; "
                 f"{settings.seconds:g} s x {settings.reps} per measurement")
        progress(f"machine: {machine.summary(measured_on)}")
        progress(f"tunnel core: {tunnel_core()}")
        certs = workdir / "certs"
        scenarios.init_pki(certs)
        shim = build_shim(tools["gcc"], workdir / "wrk_clientcert.so")
        backend = Backend(tools["nginx"], workdir, scenarios.server_tls(certs), args.large_mib * MiB).start()
        progress(f"backend nginx: http :{backend.http_port}, https :{backend.https_port}")
        shared = scenarios.Shared(tools, workdir, certs, backend,
                                  max_client_connections=max(20000, settings.idle_connections + 2000),
                                  mix_site="cmgmix" in chosen)
        gen = Generators(tools["wrk"], tools["curl"], workdir, tools["taskset"], args.generator_cpus or None, shim)
        extra = []
        if py_spy:
            extra.append(_profiler(py_spy, gen, settings, args.profile, progress,
                                   args.profile_connections, args.profile_gil))
        if args.hops:
            extra.append(_hop_timer(tools["tcpdump"], gen, settings, args.hops, backend.http_port, progress))
        # Every scenario runs from start to end, side by side (idle between its own
        # measurements), so that the 1 KiB GETs can be measured interleaved.
        with contextlib.ExitStack() as running:
            runs = []
            for name in names:
                progress(f"starting {name}")
                run = running.enter_context(scenarios.open_scenario(name, shared))
                progress(f"{name}: {run.description}")
                runs.append(run)
            rows.extend(workloads.run_all(gen, runs, settings, backend.files["large"], progress,
                                          after_gets=_each(extra)))
            progress(f"stopping {', '.join(names)}")
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
        return 130
    except (ServerError, GeneratorError, sysdeps.MissingTool) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if backend is not None:
            backend.stop()
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            print(f"bench: work folder kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report.add_ratios(rows)
    print()
    print(report.format_table(rows))
    print()
    print("x nginx / x direct: req/s (MB/s for the 100 MiB transfers) relative to the same workload "
          "through nginx / straight to the backend.")
    if args.json:
        report.write_json(rows, args.json, measured_on)
        print(f"JSON: {args.json}")
    if args.plot:
        from .plot import plot

        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    print(f"bench: done in {time.monotonic() - t0:.0f} s")
    return 0


def _each(callbacks: list):
    """One after_gets callback running every one of ``callbacks`` on the CMG scenarios
    (None when there is none)."""
    if not callbacks:
        return None

    def on_cmg(run: scenarios.Running) -> None:
        if run.name.startswith("cmg"):
            for callback in callbacks:
                callback(run)

    return on_cmg


def _hop_timer(tcpdump: str, gen: Generators, s: workloads.Settings, out: Path, backend_port: int, progress):
    """An extra, unrecorded run of 1 KiB GETs on one connection under tcpdump: per-hop medians."""

    def run_timed(run: scenarios.Running) -> None:
        out.mkdir(parents=True, exist_ok=True)
        seconds = max(3.0, s.seconds)
        capture = hops.Capture(tcpdump, out / f"{run.name}-hops.pcap.txt").start()
        time.sleep(0.3)
        r = gen.wrk_get(run.target, workloads.SMALL, 1, seconds)
        lines = capture.stop()
        client_port = urlsplit(run.target.url).port
        assert client_port is not None
        timed = hops.parse(lines, client_port, backend_port)
        medians = hops.medians(timed)
        (out / f"{run.name}-hops.txt").write_text(f"{r.rps:,.0f} req/s at 1 connection while captured\n"
                                                  f"{hops.summarise(timed)}\n")
        (out / f"{run.name}-hops.json").write_text(json.dumps(medians, indent=1) + "\n")
        progress(f"{run.name}: hops at 1 connection (us, medians): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in medians.items()))

    return run_timed


def _profiler(py_spy: str, gen: Generators, s: workloads.Settings, out: Path, progress, connections: int,
              gil: bool):
    """An extra, unrecorded run of 1 KiB GETs with py-spy attached to every CMG process."""

    def run_profiled(run: scenarios.Running) -> None:
        seconds = max(4.0, s.seconds * 2)
        targets = {}
        for kind in ("gateway", "connector"):
            for i, pid in enumerate(run.groups[kind]()):
                targets[f"{run.name}-{kind}-{i}"] = pid
        progress(f"{run.name}: profiling {', '.join(targets)} during {seconds:g} s at {connections} connections")
        rec = profiling.Recorder(py_spy, out, targets, seconds, gil)
        time.sleep(0.3)
        r = gen.wrk_get(run.target, workloads.SMALL, connections, seconds)
        profiles = rec.finish()
        text = profiling.format_profiles(profiles)
        (out / f"{run.name}-top.txt").write_text(f"{r.rps:,.0f} req/s at {connections} connections while profiled"
                                                 f"{' (GIL-held samples)' if gil else ' (wall time)'}\n{text}\n")
        progress(f"{run.name}: profiled run {r.rps:,.0f} req/s; summary in {out / (run.name + '-top.txt')}")

    return run_profiled


if __name__ == "__main__":
    sys.exit(main())
