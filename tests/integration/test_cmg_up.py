"""The user's path: `cmg up` in a terminal, `cmg client` beside it, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from clientsim.client import InternetClient
from cmg import allocator

pytestmark = pytest.mark.integration


def test_cmg_up_serves_a_client_cycle_and_stops_cleanly_on_ctrl_c(tmp_path):
    up = subprocess.Popen([sys.executable, "-m", "cmg", "up", "--dir", str(tmp_path), "--port", "0",
                           "--instances", "2", "--connectors", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deployment = tmp_path / "deployment.json"
        deadline = time.monotonic() + 90
        while not deployment.exists():
            assert up.poll() is None, up.stdout.read()
            assert time.monotonic() < deadline, "deployment.json never appeared"
            time.sleep(0.2)
        d = json.loads(deployment.read_text())
        for key in ("service_name", "listen", "client_url", "ca_cert", "client_cert", "client_key",
                    "client_ca_cert", "client_ca_key", "roles", "logs_dir", "processes"):
            assert key in d, key
        assert {p["kind"] for p in d["processes"]} == {"site", "gateway", "connector"}
        assert len(d["processes"]) == 1 + 2 + 2
        assert d["client_url"].endswith("/CCM_Proxy_MutualAuth/72057594037927939")
        assert (tmp_path / d["ca_cert"]).exists() and (tmp_path / d["client_ca_key"]).exists()
        assert oct((tmp_path / d["client_key"]).stat().st_mode & 0o777) == "0o600"

        client = subprocess.run([sys.executable, "-m", "cmg", "client", "--deployment", str(deployment)],
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stdout + client.stderr
        assert 'Type="Internet"' in client.stdout and "7/7 steps OK" in client.stdout
        for step in ("MPLIST", "Location", "Registration", "Policy", "Upload", "UpdateScan", "Content"):
            assert f"[ OK ] {step}" in client.stdout

        pids = [p["pid"] for p in d["processes"]]
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
        assert up.returncode == 0, out
        assert "stopped" in out
        assert f"cmg: {allocator.describe()}" in out  # what the components run with, said once
        time.sleep(0.2)
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        logs = [(tmp_path / d["logs_dir"] / f"CMGService_IN_{i}.log").read_text() for i in range(2)]
        assert all("stopped" in log for log in logs)
        # The per-URI traffic summaries, flushed at the latest when an instance stops.
        summaries = [l for log in logs for l in log.splitlines() if "RequestUri: " in l]
        assert any("RequestUri: /CCM_Proxy_MutualAuth/72057594037927939/SMS_MP/.sms_aut RequestCount: " in l
                   for l in summaries), summaries
        line = summaries[0]
        assert line.startswith("<![LOG[RequestUri: /CCM_Proxy_MutualAuth/") and "Bytes ResponseCount: " in line
        assert "Bytes AverageElapsedTime: " in line and 'component="CMGService"' in line
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_every_component_says_which_allocator_it_runs_with(single):
    """mimalloc when installed (and CMG_ALLOCATOR is not glibc), from /proc/self/maps."""
    expected = "mimalloc" if "mimalloc" in allocator.environment(dict(os.environ)).get("LD_PRELOAD", "") else "glibc"
    said = {p.name: p.ready.get("allocator") for p in single.stack.processes}
    assert set(said) >= {"mock_site", "connector-CMGCP01"} and set(said.values()) == {expected}, said


async def test_client_cycle_in_process_and_refused_without_certificate(single):
    mp = single.role("MP")["role_id"]
    async with InternetClient(single.service_name, (single.host, single.port), mp, single.path("ca_cert"),
                              single.path("client_cert"), single.path("client_key")) as client:
        result = await client.run_cycle()
    assert result.ok, [(s.name, s.detail) for s in result.steps]
    assert result.sms_active_mp_candidate  # the internet MP, through the CMG
    async with InternetClient(single.service_name, (single.host, single.port), mp, single.path("ca_cert"),
                              None, None) as client:
        result = await client.run_cycle()
    assert not result.ok
    assert "403 CMGConnector_Clientcertificaterequired" in result.steps[0].detail


def test_cmg_client_exit_code_is_nonzero_on_failure(single):
    r = subprocess.run([sys.executable, "-m", "cmg", "client", "--deployment",
                        str(single.dir / "deployment.json"), "--no-cert"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "CMGConnector_Clientcertificaterequired" in r.stdout
