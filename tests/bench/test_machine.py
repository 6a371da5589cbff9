"""What a run was measured on: the parsing is pure; describe() runs on this machine."""

from __future__ import annotations

import os

from bench import machine, report
from bench.workloads import Row

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC  9B45
cpu MHz\t\t: 2000.000

processor\t: 1
model name\t: AMD EPYC  9B45
"""


def test_cpu_model_is_the_first_model_name_with_spaces_folded() -> None:
    assert machine.cpu_model(CPUINFO) == "AMD EPYC 9B45"
    assert machine.cpu_model("processor\t: 0\nvendor_id\t: ARM\n") == ""


def test_tool_versions_are_picked_out_of_what_the_tools_print() -> None:
    nginx = "nginx version: nginx/1.22.1\n"
    ssh = "OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15 3 Sep 2024\n"
    wrk = "wrk 4.1.0 [epoll] Copyright (C) 2012 Will Glozer\nUsage: wrk <options> <url>\n"
    assert machine.tool_version(nginx, machine._VERSION["nginx"][1]) == "1.22.1"
    assert machine.tool_version(ssh, machine._VERSION["ssh"][1]) == "OpenSSH_9.2p1"
    assert machine.tool_version(wrk, machine._VERSION["wrk"][1]) == "4.1.0"
    assert machine.tool_version("command not found", machine._VERSION["wrk"][1]) == ""


def test_describe_names_this_machine_and_skips_tools_it_was_not_given() -> None:
    info = machine.describe({})
    assert info["cpus"] == os.cpu_count()
    assert info["python"] and info["kernel"] and "OpenSSL" in str(info["openssl"])
    assert "nginx" not in info
    line = machine.summary(info)
    assert f"cpus {os.cpu_count()}" in line and "python " in line


def test_a_tool_that_cannot_run_gives_an_empty_version() -> None:
    assert machine.describe({"wrk": "/nonexistent/wrk"})["wrk"] == ""


def test_every_json_row_carries_the_machine() -> None:
    info = {"cpu": "X", "cpus": 2}
    data = report.to_json([Row("a", "get-1k", 1, 1), Row("b", "get-1k", 1, 1)], info)
    assert [d["machine"] for d in data] == [info, info]
    assert "machine" not in report.to_json([Row("a", "get-1k", 1, 1)])[0]
