"""The 1 KiB GETs measured interleaved across scenarios (bench.workloads.run_gets/run_all):
the order of the runs, and rows that add up each scenario's own runs only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import workloads
from bench.load import Target, WrkResult
from bench.scenarios import Running

# A child that burns CPU only while told to (a line on stdin), then says it is done.
WORKER = ("import sys, time\n"
          "for line in sys.stdin:\n"
          "    t = time.process_time()\n"
          "    while time.process_time() - t < float(line): sum(range(1000))\n"
          "    print('done', flush=True)\n")


class FakeGenerators:
    """wrk's stand-in: each run makes the scenario's own process work, and answers with
    a request count that tells the runs apart."""

    def __init__(self, workers: dict[str, subprocess.Popen[str]], busy: dict[str, float]) -> None:
        self.workers = workers
        self.busy = busy
        self.calls: list[tuple[str, int]] = []

    def wrk_get(self, target: Target, path: str, connections: int, seconds: float,
                new_connection: str | None = None) -> WrkResult:
        name = target.host
        self.calls.append((name, connections))
        worker = self.workers[name]
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(f"{self.busy[name]}\n")
        worker.stdin.flush()
        assert worker.stdout.readline() == "done\n"
        n = sum(1 for called, _ in self.calls if called == name)  # this scenario's n-th run
        return WrkResult(requests=1000 * n, seconds=1.0, bytes=1024 * 1000 * n, errors=0, non_2xx=0,
                         p50_ms=float(n), p99_ms=2.0 * n, p999_ms=3.0 * n, generator_cpu_s=0.01)


@pytest.fixture
def two_scenarios(tmp_path: Path):
    workers = {name: subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
               for name in ("a", "b")}
    runs = []
    for name, proc in workers.items():
        target = Target(url=f"https://{name}:1", host=name, prefix="", ca=tmp_path / "ca.pem",
                        client_cert=None, client_key=None)
        runs.append(Running(name, target, {"server": lambda pid=proc.pid: [pid]}, f"scenario {name}"))
    yield runs, FakeGenerators(workers, {"a": 0.05, "b": 0.25})
    for proc in workers.values():
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)


def test_repetitions_alternate_between_the_scenarios(two_scenarios) -> None:
    runs, gen = two_scenarios
    s = workloads.Settings(seconds=1, reps=3, bulk_reps=1, connections=(1, 64), workloads=("get-1k",))
    rows = workloads.run_all(gen, runs, s, Path("/nonexistent"), lambda _: None)
    # The warm-up on each, then for each connection count: rep 1 of a, of b, rep 2 ...
    assert gen.calls == [("a", 16), ("b", 16)] + [(name, c) for c in (1, 64) for _ in range(3) for name in "ab"]
    assert [(r.scenario, r.connections) for r in rows] == [("a", 1), ("a", 64), ("b", 1), ("b", 64)]
    a1 = rows[0]
    # a's runs at one connection were its 2nd to 4th (the warm-up was the first).
    assert a1.rps_reps == [2000.0, 3000.0, 4000.0] and a1.rps == 3000.0 and a1.p50_ms == 3.0
    assert a1.requests == 9000
    assert workloads.INTERLEAVED in a1.note


def test_each_row_counts_its_own_scenarios_cpu_only(two_scenarios) -> None:
    runs, gen = two_scenarios
    s = workloads.Settings(seconds=1, reps=2, bulk_reps=1, connections=(4,), workloads=("get-1k",))
    a, b = workloads.run_gets(gen, runs, s, "get-1k", 4, lambda _: None)
    # a's process worked 2 x 0.05 s and b's 2 x 0.25 s; b's work ran between a's runs
    # and is not a's.
    assert 0.09 <= a.cpu_s_per_1k_req["server"] * a.requests / 1000 < 0.2
    assert 0.45 <= b.cpu_s_per_1k_req["server"] * b.requests / 1000 < 0.7
    assert a.cpu_s_per_1k_req["wrk"] == round(0.02 * 1000 / a.requests, 4)


def test_one_scenario_is_not_called_interleaved(two_scenarios) -> None:
    runs, gen = two_scenarios
    s = workloads.Settings(seconds=1, reps=1, bulk_reps=1, connections=(4,), workloads=("get-1k",))
    row = workloads.run_get(gen, runs[0], s, "get-1k", 4, lambda _: None)
    assert workloads.INTERLEAVED not in row.note and row.rps == 1000.0
