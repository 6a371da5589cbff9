"""``python -m mock_site`` as a process: ports file, logs, clean stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def test_runs_as_a_process_and_stops_on_sigterm(tmp_path: Path):
    cfg = tmp_path / "deployment.toml"
    cfg.write_text("[site]\nmp_port = 0\nsup_port = 0\ndp_port = 0\nentra_port = 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "mock_site", "--config", str(cfg), "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    try:
        ports_file = tmp_path / "site-ports.json"
        deadline = time.monotonic() + 30
        while not ports_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ports = json.loads(ports_file.read_text())
        assert set(ports) == {"mp", "sup", "dp", "entra"} and all(p > 0 for p in ports.values())
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['entra']}/contoso.onmicrosoft.com/v2.0/"
                                    ".well-known/openid-configuration", timeout=10) as r:
            assert json.loads(r.read())["jwks_uri"] == (f"http://127.0.0.1:{ports['entra']}/contoso.onmicrosoft.com"
                                                        "/discovery/v2.0/keys")
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['mp']}/SMS_MP/.sms_aut?MPLIST", timeout=10) as r:
            assert b"CCM_Proxy_MutualAuth/72057594037927939" in r.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        first = proc.stdout.readline()
        assert first.startswith("READY ") and json.loads(first[6:])["ports"] == ports
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert {"MP_Location.log", "MP_RegistrationManager.log", "MP_Policy.log", "mock_site.log"} <= logs
    assert "Mock site stopped" in (tmp_path / "logs" / "mock_site.log").read_text()


def test_bad_config_names_the_key(tmp_path: Path):
    cfg = tmp_path / "deployment.toml"
    cfg.write_text("[site]\nmp_prot = 1\n")
    res = subprocess.run([sys.executable, "-m", "mock_site", "--config", str(cfg)], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path, env=ENV)
    assert res.returncode == 2 and "site.mp_prot" in res.stderr
