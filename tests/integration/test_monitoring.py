"""Monitoring as the console shows it: health, readiness, metrics, the status page
(rendered in headless Chromium, with a screenshot), and `cmg status`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("CMG_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def chromium() -> str:
    """Debian's chromium, installed by the test set-up when missing (as root)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=1200)
        path = shutil.which("chromium")
        if path:
            return path
    pytest.skip("Chromium is not installed and cannot be installed here (not root, or no apt-get)")


def browse(url: str, *, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a screenshot), from headless Chromium."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={ARTIFACTS / 'chromium-profile'}", "--virtual-time-budget=4000",
            "--window-size=1100,800"]
    if screenshot is not None:
        r = subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
        assert screenshot.exists(), r.stderr[-2000:]
    r = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return r.stdout


def test_health_readiness_and_metrics(single):
    d = single.data
    base = d["status_url"].rsplit("/", 1)[0]
    status, body = get(f"{base}/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = get(d["ready_url"])
    assert status == 200 and json.loads(body)["ready"] is True
    r = subprocess.run([sys.executable, "-m", "cmg", "client", "--deployment", str(single.dir / "deployment.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    subprocess.run([sys.executable, "-m", "cmg", "client", "--no-cert", "--deployment",
                    str(single.dir / "deployment.json")], capture_output=True, text=True, timeout=120)
    status, body = get(d["metrics_urls"]["gateway-0"])
    text = body.decode()
    assert status == 200
    mp = single.role("MP")["role_id"]
    for family in ("cmg_gateway_requests_total", "cmg_gateway_request_bytes_total", "cmg_gateway_response_bytes_total",
                   "cmg_gateway_request_duration_seconds_bucket", "cmg_gateway_streams_in_flight",
                   "cmg_gateway_tunnels", "cmg_gateway_tunnel_rtt_seconds", "cmg_gateway_tunnel_connects_total"):
        assert family in text, family
    assert f'cmg_gateway_requests_total{{endpoint="ccm_system",instance="0",role="{mp}"}}' in text
    assert 'cmg_gateway_errors_total{error="CMGConnector_Clientcertificaterequired",instance="0"}' in text
    assert 'cmg_gateway_tunnels{connection_point="CMGCP01",instance="0"} 1.0' in text


def test_readiness_follows_the_connection_points(stack_factory):
    dep = stack_factory("ready", instances=1, connectors=1,
                        overrides={"tunnel": {"ping_interval": 0.5, "ping_timeout": 2.0}})
    proc = dep.stack.process("connector-CMGCP01")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while get(dep.data["ready_url"])[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = json.loads(get(dep.data["ready_url"])[1])
        assert body["status"] == "Error" and body["missing_roles"]
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while get(dep.data["ready_url"])[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


async def test_status_page_in_a_browser_and_in_the_terminal(pair):
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with await pair.request(s, "GET", pair.mp_path("SMS_MP/.sms_aut?MPLIST")) as r:
                assert r.status == 200
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "cmg-status-page.png"
    shot.unlink(missing_ok=True)
    dom = browse(pair.data["status_url"], screenshot=shot)
    assert shot.stat().st_size > 10_000
    assert "GraniteFalls.WestUS.CloudApp.Azure.Com" in dom
    assert 'class="badge Ready">Ready<' in dom  # rendered by the page's script, not static text
    for name in ("ProxyService_IN_0", "ProxyService_IN_1", "CMGCP01", "CMGCP02"):
        assert name in dom
    assert dom.count('class="badge Connected">Connected<') == 4  # 2 connection points x 2 instances
    r = subprocess.run([sys.executable, "-m", "cmg", "status", "--deployment", str(pair.dir / "deployment.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    assert "Cloud Management Gateway GraniteFalls.WestUS.CloudApp.Azure.Com (site PS1): Ready" in r.stdout
    assert r.stdout.count("Connected") == 4
    mp = pair.role("MP")["role_id"]
    served = [line.split() for line in r.stdout.splitlines() if f"MP {mp}" in line]
    assert served and sum(int(cols[3]) for cols in served) >= 5  # TotalRequests per connection point
    assert f"MP {mp}" in dom.replace("</td><td>", " ").replace("<td>", "")


def test_role_ids_survive_javascript(pair):
    """2^56 + n is not exact in a JavaScript number: the page must show the real ids."""
    dom = browse(pair.data["status_url"])
    for role in pair.data["roles"]:
        assert f"<td>{role['role_id']}</td>" in dom, role


def test_connection_point_metrics_and_traffic_reports(stack_factory):
    dep = stack_factory("cp-traffic", instances=1, connectors=1,
                        overrides={"connection_point": {"traffic_report_interval": 1}})
    r = subprocess.run([sys.executable, "-m", "cmg", "client", "--auth", "token", "--deployment",
                        str(dep.dir / "deployment.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    status, body = get(dep.data["metrics_urls"]["connector-CMGCP01"])
    text = body.decode()
    mp = dep.role("MP")["role_id"]
    assert status == 200
    assert f'cmg_connector_requests_total{{connection_point="CMGCP01",endpoint="ccm_system_tokenauth",role="{mp}"}}' in text
    for family in ("cmg_connector_request_duration_seconds_bucket", "cmg_connector_response_bytes_total",
                   "cmg_connector_tunnels", "cmg_connector_tunnel_connects_total", "cmg_connector_streams_in_flight"):
        assert family in text, family
    log = dep.path("logs_dir") / "SMS_Cloud_ProxyConnector_CMGCP01.log"
    deadline = time.monotonic() + 10
    while "ProxyTrafficStateDetails: EndpointName: ccm_system_tokenauth" not in log.read_text():
        assert time.monotonic() < deadline, "no traffic report"
        time.sleep(0.2)
    line = next(l for l in log.read_text().splitlines() if "EndpointName: ccm_system_tokenauth TotalRequests:" in l)
    assert "TotalRequestsWithBearerToken:" in line and "FailedRequests: 0" in line and "MaxConcurrentRequests:" in line
    requests = int(line.split("TotalRequests: ")[1].split()[0])
    bearer = int(line.split("TotalRequestsWithBearerToken: ")[1].split()[0])
    assert requests >= 3 and bearer == requests  # every token client request carries its token
    status, body = get(dep.data["metrics_urls"]["connector-CMGCP01"].replace("/metrics", "/readyz"))
    assert status == 200 and json.loads(body)["ready"] is True
