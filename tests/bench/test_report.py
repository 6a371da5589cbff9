"""bench.report: ratios, the JSON shape, the table; bench.load's wrk summary parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report, scenarios, workloads
from bench.load import GeneratorError, WrkResult, parse_wrk
from bench.workloads import Row

REQUIRED = {"scenario", "workload", "connections", "rps", "p50_ms", "p99_ms", "mb_per_s", "rss_kb_per_conn"}


def _rows() -> list[Row]:
    return [
        Row("direct", "get-1k", 64, 3, rps=20000.0, p50_ms=1.0, p99_ms=5.0, p999_ms=9.0, mb_per_s=25.0),
        Row("nginx", "get-1k", 64, 3, rps=10000.0, p50_ms=2.0, p99_ms=8.0, p999_ms=12.0, mb_per_s=12.5),
        Row("cmg-2i2c", "get-1k", 64, 3, rps=2500.0, p50_ms=20.0, p99_ms=60.0, p999_ms=90.0, mb_per_s=3.0,
            cpu_s_per_1k_req={"gateway": 0.5, "connector": 0.4, "wrk": 0.02},
            peak_rss_kb={"gateway": 120000, "connector": 80000}),
        Row("direct", "download-100m", 1, 3, p50_ms=0.5, p99_ms=3.0, mb_per_s=800.0, latency_source="probe"),
        Row("nginx", "download-100m", 1, 3, p50_ms=0.7, p99_ms=4.0, mb_per_s=400.0, latency_source="probe"),
        Row("cmg-2i2c", "download-100m", 1, 3, p50_ms=9.0, p99_ms=30.0, mb_per_s=200.0, latency_source="probe"),
    ]


def test_ratios_compare_the_same_workload_and_connections() -> None:
    rows = _rows()
    report.add_ratios(rows)
    by = {(r.scenario, r.workload): r for r in rows}
    assert by[("cmg-2i2c", "get-1k")].vs_nginx == 0.25
    assert by[("cmg-2i2c", "get-1k")].vs_direct == 0.125
    assert by[("nginx", "get-1k")].vs_nginx == 1.0
    # bulk transfers compare MB/s, not requests/s
    assert by[("cmg-2i2c", "download-100m")].vs_nginx == 0.5
    assert by[("cmg-2i2c", "download-100m")].vs_direct == 0.25


def test_ratio_is_null_without_a_reference_row() -> None:
    rows = [Row("cmg-1i1c", "get-1k", 16, 3, rps=100.0)]
    report.add_ratios(rows)
    assert rows[0].vs_nginx is None and rows[0].vs_direct is None


def test_json_is_a_list_of_objects_with_the_required_keys(tmp_path: Path) -> None:
    rows = _rows()
    report.add_ratios(rows)
    out = tmp_path / "bench.json"
    report.write_json(rows, out)
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == len(rows)
    for obj in data:
        assert REQUIRED <= obj.keys()
        assert isinstance(obj["connections"], int)
        assert obj["rss_kb_per_conn"] is None
    bulk = next(o for o in data if o["workload"] == "download-100m" and o["scenario"] == "cmg-2i2c")
    assert bulk["rps"] is None and bulk["mb_per_s"] == 200.0


def test_nan_becomes_null_in_json() -> None:
    data = report.to_json([Row("x", "get-1k", 1, 1, rps=float("nan"))])
    assert data[0]["rps"] is None


def test_table_has_a_row_per_result_and_the_ratio_columns() -> None:
    rows = _rows()
    report.add_ratios(rows)
    text = report.format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "x nginx" in lines[0] and "x direct" in lines[0] and "p99.9 ms" in lines[0]
    cmg = next(line for line in lines if line.startswith("| cmg-2i2c") and "get-1k" in line)
    assert "2,500" in cmg and "0.25" in cmg and "gw 0.500 cp 0.400" in cmg
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_parse_wrk_reads_the_summary_line() -> None:
    out = ("Running 2s test @ https://127.0.0.1:1/x\n"
           'BENCHJSON {"requests":2000,"duration_us":2000000,"bytes":2500000,"connect":0,"read":1,'
           '"write":0,"status":10,"timeout":0,"p50_us":500.0,"p99_us":2000.0,"p999_us":4000.0,'
           '"mean_us":600.0,"max_us":5000.0}\n')
    raw = parse_wrk(out)
    assert raw["requests"] == 2000 and raw["p999_us"] == 4000.0
    r = WrkResult(requests=2000, seconds=2.0, bytes=2500000, errors=1, non_2xx=10, p50_ms=0.5,
                  p99_ms=2.0, p999_ms=4.0, generator_cpu_s=0.1)
    assert r.ok == 1990 and r.rps == 995.0 and r.mb_per_s == 1.25
    with pytest.raises(GeneratorError):
        parse_wrk("wrk: connection refused\n")


def test_scenario_and_workload_selection() -> None:
    assert scenarios.select(None) == list(scenarios.SCENARIOS)
    assert scenarios.select("cmg") == ["cmg-1i1c", "cmg-2i2c"]
    assert scenarios.select("nginx,direct") == ["direct", "nginx"]
    with pytest.raises(ValueError, match="unknown scenario"):
        scenarios.select("haproxy")
    assert workloads.select("upload-100m,get-1k") == ("get-1k", "upload-100m")
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.select("idle")
