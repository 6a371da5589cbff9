"""cmg.testing: the stack as sync and async context manager, clients, the site's view,
fault injection, and that nothing outlives a stack (processes, ports, files)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import time

import psutil
import pytest

from cmg.launcher import can_bind
from cmg.testing import CMGStack, LaunchError, role

pytestmark = pytest.mark.integration


def ports_of(cmg: CMGStack) -> list[int]:
    d = cmg.deployment
    ports = [cmg.port, *d["tunnel_ports"]]
    ports += [int(r["internal_url"].rsplit(":", 1)[1]) for r in d["roles"]]
    ports.append(int(d["entra"]["authority"].rsplit(":", 1)[1]))
    return ports


def assert_nothing_left(pids: list[int], ports: list[int], directory) -> None:
    deadline = time.monotonic() + 5
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        busy = [p for p in ports if not can_bind("127.0.0.1", p)]
        if not alive and not busy:
            break
        assert time.monotonic() < deadline, f"left behind: processes {alive}, ports {busy}"
        time.sleep(0.1)
    assert not directory.exists(), f"{directory} was not removed"


def test_sync_context_manager_starts_a_working_stack_and_leaves_nothing():
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    with CMGStack() as cmg:
        assert cmg.running and cmg.healthy()
        pids = [p["pid"] for p in cmg.deployment["processes"]]
        assert len(pids) == 3 and all(psutil.pid_exists(p) for p in pids)
        ports, directory = ports_of(cmg), cmg.directory
        assert all(cmg.path(k).exists() for k in ("ca_cert", "client_cert", "client_key", "config"))
        with cmg.client() as client:
            result = client.run_cycle()
        assert result.ok, [(s.name, s.detail) for s in result.steps]
    assert not cmg.running
    assert_nothing_left(pids, ports, directory)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children_before


async def test_async_context_manager_and_async_client():
    async with CMGStack(instances=2, connectors=2) as cmg:
        assert cmg.connection_status() == {0: {"CMGCP01", "CMGCP02"}, 1: {"CMGCP01", "CMGCP02"}}
        async with cmg.aclient(auth="entra") as client:
            mplist = await client.mplist()
            assert mplist.tag == "MPList"
            assert (await client.download(file="payload-4096.bin"))[0] == 200
        pids = [p["pid"] for p in cmg.deployment["processes"]]
        ports, directory = ports_of(cmg), cmg.directory
    assert_nothing_left(pids, ports, directory)


def test_a_stack_that_cannot_start_says_why_and_leaves_nothing(tmp_path):
    before = set(os.listdir(tmp_path.parent))
    with pytest.raises(Exception, match="service.instances|instances"):
        CMGStack(instances=99).start()
    assert set(os.listdir(tmp_path.parent)) == before


def test_site_requests_carry_method_url_headers_identity_and_body_hash():
    body = os.urandom(300_000)
    with CMGStack() as cmg:
        with cmg.client(client_name="HASHPC") as client:
            upload = client.upload("{HASH-TEST}", body, fragment_size=100_000)
            r = client.request("GET", cmg.mp_path("SMS_MP/.sms_aut?MPCERT"),
                               headers={"X-Custom": "kept", "X-CMG-Client-Certificate-Subject": "CN=forged"})
        assert upload.sha256 == hashlib.sha256(body).hexdigest() and r.status == 200
        fragments = [s for s in cmg.site_requests(method="BITS_POST") if s.header("BITS-Packet-Type") == "Fragment"]
        assert [f.body_size for f in fragments] == [100_000] * 3
        assert [f.body_sha256 for f in fragments] == [hashlib.sha256(body[i:i + 100_000]).hexdigest()
                                                      for i in range(0, 300_000, 100_000)]
        assert all(f.body_complete for f in fragments)
        [cert] = cmg.site_requests(path="/SMS_MP/.sms_aut")
        assert cert.url == f"{cmg.role('MP')['internal_url']}/SMS_MP/.sms_aut?MPCERT"
        assert cert.header("x-custom") == "kept"
        # the gateway's identity, not the client's forgery
        assert cert.identity["X-CMG-Client-Certificate-Subject"] == "CN=CLIENT01.corp.contoso.com"
        assert cert.client_auth == "MutualAuth" and cert.body_size == 0
        # since= / mark()
        m = cmg.mark()
        assert cmg.site_requests(since=m) == []
        assert len(cmg.site_requests()) == len(cmg.site_requests(since=0))


def test_token_headers_are_recorded_without_the_token():
    with CMGStack() as cmg:
        with cmg.client(auth="token") as client:
            client.register()  # with the bulk token; the MP answers with the client's own token
            client.location()  # sent with the client token
            token = client.access_token
        registration, last = cmg.site_requests(method="CCM_POST")
        assert (registration.client_auth, last.client_auth) == ("BulkRegistration", "ClientToken")
        assert last.authorization == {"scheme": "Bearer", "token_sha256": hashlib.sha256(token.encode()).hexdigest()}
        assert all(token not in v for _, v in last.headers)
        assert last.header("Authorization").startswith("Bearer sha256:")


def test_extra_role_reaches_a_service_of_the_test_and_kind_is_checked():
    with pytest.raises(ValueError):
        role("Webhook", "http://127.0.0.1:1")
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            n = int(self.headers["Content-Length"])
            data = self.rfile.read(n)
            self.send_response(201)
            self.send_header("Content-Length", "64")
            self.end_headers()
            self.wfile.write(hashlib.sha256(data).hexdigest().encode())

        def log_message(self, *a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        svc = role("AdminService", f"http://127.0.0.1:{srv.server_port}", name="SMSPROV")
        with CMGStack(extra_roles=[svc]) as cmg:
            assert cmg.role("SMSPROV")["role_id"] == svc["role_id"]
            for auth in ("pki", "entra", "token"):
                with cmg.client(auth) as client:
                    r = client.request("PUT", "AdminService/v1.0/Thing", role="SMSPROV", body=b"abc")
                    assert (r.status, r.text) == (201, hashlib.sha256(b"abc").hexdigest()), auth
    finally:
        srv.shutdown()
        srv.server_close()


def test_fault_injection_kill_restart_pause_and_stall():
    with CMGStack(overrides={"connection_point": {"request_timeout": 2}}) as cmg:
        with cmg.client() as client:
            def status() -> tuple[int, str]:
                r = client.request("GET", "SMS_MP/.sms_aut?MPLIST", role="MP")
                return r.status, r.reason

            old = cmg.kill("CMGCP01")
            assert cmg.faulted
            assert status() in {(503, "CMGConnector_ServiceUnavailable"), (502, "CMGConnector_BadGateway")}
            cmg.wait_restarted("CMGCP01", old)
            assert status() == (200, "OK")

            gw = cmg.pid("gateway-0")
            cmg.restart("gateway-0")
            assert cmg.pid("gateway-0") != gw and cmg.healthy()
            assert status() == (200, "OK")

            cmg.stall("SUP")  # only the SUP: the MP answers
            assert status() == (200, "OK")
            cmg.unstall("SUP")

            cmg.stall("site")  # the whole site process is stopped
            assert status() == (504, "CMGConnector_GatewayTimeout")
            cmg.unstall("site")
            assert status() == (200, "OK")

            cmg.pause("CMGCP01")
            assert not cmg.healthy()
            cmg.resume("CMGCP01")
            cmg.wait_healthy(30)
        with pytest.raises(KeyError):
            cmg.kill("gateway-7")


def test_a_paused_component_does_not_hold_up_stop():
    cmg = CMGStack().start()
    cmg.pause("gateway-0")
    cmg.pause("mock_site")
    t0 = time.monotonic()
    cmg.stop()
    assert time.monotonic() - t0 < 10


def test_startup_time_of_a_default_stack(record_property):
    """The figure in docs/testing.md: a default stack (1 instance, 1 connection point),
    certificates already generated in this process."""
    CMGStack().start().stop()  # certificates made once per process
    times = []
    for _ in range(3):
        cmg = CMGStack().start()
        times.append(cmg.startup_seconds)
        cmg.stop()
    median = statistics.median(times)
    record_property("cmg_startup_seconds", median)
    print(f"\ndefault stack start-up: median {median:.2f} s of {[round(t, 2) for t in times]}")
    assert median < 15


def test_docs_show_the_example_files_exactly():
    from pathlib import Path

    here = Path(__file__).parent
    doc = (here.parents[1] / "docs" / "testing.md").read_text()
    for name in ("test_example_client_library.py", "test_example_mp_extension.py", "test_example_fault_injection.py"):
        assert f"```python\n{(here / name).read_text()}```" in doc, f"docs/testing.md does not show {name} as it is"


def test_a_stalled_role_does_not_hold_up_stop():
    import threading

    cmg = CMGStack(overrides={"connection_point": {"request_timeout": 30}}).start()
    client = cmg.client()
    answered: list[object] = []

    def held() -> None:
        try:
            answered.append(client.request("GET", "SMS_MP/.sms_aut?MPLIST", role="MP").status)
        except Exception as exc:  # the client is closed under it when the stack stops
            answered.append(exc)

    cmg.stall("MP")
    worker = threading.Thread(target=held, daemon=True)
    worker.start()
    time.sleep(1.0)
    assert answered == []  # held at the MP
    t0 = time.monotonic()
    cmg.stop()
    assert time.monotonic() - t0 < 5
    worker.join(10)
    assert answered
