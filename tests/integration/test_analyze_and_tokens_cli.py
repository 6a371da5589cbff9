"""`cmg analyze`, `cmg token new` and `cmg client --auth` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import jwt
import pytest

pytestmark = pytest.mark.integration


def cmg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cmg", *args], capture_output=True, text=True, timeout=timeout)


def test_analyze_passes_on_a_healthy_deployment(single):
    r = cmg("analyze", "--deployment", str(single.dir / "deployment.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    for check in ("Server certificate CN", "Enforce TLS 1.2", "CMGCP01 -> ProxyService_IN_0", "Entra tenant metadata",
                  "Entra app registrations", "CMG AADAuthInfo", "MP 72057594037927939 with a client certificate",
                  "MP 72057594037927939 with a token", "DP 72057594037927942 with a token"):
        assert f"[PASS] {check}" in r.stdout, (check, r.stdout)
    assert "[FAIL]" not in r.stdout


def broken_copy(single, tmp_path, **changes):
    d = json.loads((single.dir / "deployment.json").read_text())
    for key in ("ca_cert", "client_cert", "client_key", "config", "client_ca_cert", "client_ca_key"):
        d[key] = str(single.path(key))
    d.update(changes)
    path = tmp_path / f"deployment-{len(changes)}-{sorted(changes)[0]}.json"
    path.write_text(json.dumps(d))
    return path


def test_analyze_names_a_missing_connection_point_and_the_fix(single, tmp_path):
    r = cmg("analyze", "--deployment", str(broken_copy(single, tmp_path, connection_points=["CMGCP01", "CMGCP99"])))
    assert r.returncode == 1
    assert "[PASS] CMGCP01 -> ProxyService_IN_0: connected" in r.stdout
    assert "[FAIL] CMGCP99 -> ProxyService_IN_0: not connected" in r.stdout
    assert "Fix: start the connection point (CMGCP99)" in r.stdout


def test_analyze_names_a_certificate_that_is_not_for_the_service_name(single, tmp_path):
    r = cmg("analyze", "--deployment", str(broken_copy(single, tmp_path, service_name="Other.WestUS.CloudApp.Azure.Com")))
    assert r.returncode == 1
    assert ("[FAIL] Server certificate CN: CN 'GraniteFalls.WestUS.CloudApp.Azure.Com', "
            "service name 'Other.WestUS.CloudApp.Azure.Com'") in r.stdout
    assert "Fix: issue the server certificate with CN = the service name exactly" in r.stdout


def test_token_new_makes_a_bulk_registration_token_and_refuses_long_ones(single):
    r = cmg("token", "new", "--deployment", str(single.dir / "deployment.json"), "--lifetime", "60")
    assert r.returncode == 0, r.stderr
    claims = jwt.decode(r.stdout.strip(), options={"verify_signature": False})
    assert claims["type"] == "BulkRegistration" and claims["aud"] == "urn:sccm:service"
    assert claims["iss"].startswith("urn:sccm:oauth2:") and claims["exp"] - claims["iat"] == 3600
    r = cmg("token", "new", "--deployment", str(single.dir / "deployment.json"), "--lifetime", "10081")
    assert r.returncode == 2 and "10080" in r.stderr


@pytest.mark.parametrize("auth, steps", [("entra", "9/9"), ("token", "7/7")])
def test_client_cycle_with_each_token_method(single, auth, steps):
    r = cmg("client", "--auth", auth, "--deployment", str(single.dir / "deployment.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{steps} steps OK" in r.stdout and "CCM_Proxy_ServerAuth" in r.stdout
