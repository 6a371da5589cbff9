"""One short real run of the cmg scenario (whole stack, nginx backend, wrk) through main()."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import sysdeps
from bench.__main__ import main

pytestmark = pytest.mark.integration


def test_cmg_scenario_tiny_workload(tmp_path: Path) -> None:
    try:
        sysdeps.ensure(["nginx", "wrk", "curl", "gcc", "taskset"], log=lambda _: None)
    except sysdeps.MissingTool as exc:
        pytest.skip(str(exc))
    out = tmp_path / "bench.json"
    t0 = time.monotonic()
    code = main(["--only", "cmg-1i1c", "--workloads", "get-1k,download-100m", "--connections", "4",
                 "--seconds", "1", "--reps", "1", "--large-mib", "4", "--json", str(out)])
    assert code == 0
    assert time.monotonic() - t0 < 30
    rows = json.loads(out.read_text())
    assert [(r["scenario"], r["workload"], r["connections"]) for r in rows] == [
        ("cmg-1i1c", "get-1k", 4), ("cmg-1i1c", "download-100m", 1)]
    get, down = rows
    assert get["rps"] > 0 and get["errors"] == 0 and get["p50_ms"] <= get["p99_ms"]
    assert set(get["cpu_s_per_1k_req"]) >= {"gateway", "connector", "backend", "wrk"}
    assert down["mb_per_s"] > 0 and down["rps"] is None and down["rss_kb_per_conn"] is None
