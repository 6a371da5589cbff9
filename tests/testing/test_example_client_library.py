"""Example: testing a client library against the CMG emulator.

``fetch_mp_list`` stands for your library: it reaches the internet MP through the CMG
with its own HTTP stack (here the standard library), the way your tool would in
production. The test points it at the ``cmg_stack`` fixture's deployment and checks
both sides: what the library returned, and what the management point received.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest


# --- the library under test (in real life: `from mytool import fetch_mp_list`) ---

class CMGRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason = status, reason


def fetch_mp_list(service_name: str, address: tuple[str, int], mp_role_id: int, ca: Path,
                  cert: Path | None = None, key: Path | None = None) -> list[str]:
    """The internet MPs the CMG lists (``SMS_MP/.sms_aut?MPLIST``)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    with socket.create_connection(address, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=service_name) as tls:
            conn = http.client.HTTPConnection(service_name)
            conn.sock = tls  # the service name for SNI and Host, the gateway's address for TCP
            conn.request("GET", f"/CCM_Proxy_MutualAuth/{mp_role_id}/SMS_MP/.sms_aut?MPLIST",
                         headers={"User-Agent": "mytool/1.0"})
            resp = conn.getresponse()
            body = resp.read()
    if resp.status != 200:
        raise CMGRefused(resp.status, resp.reason)
    return [mp.get("URL") or mp.get("FQDN", "") for mp in ET.fromstring(body).iter("MP")]


# --- the tests ---

def library_args(cmg_stack, **kw):
    return dict(service_name=cmg_stack.service_name, address=cmg_stack.address,
                mp_role_id=cmg_stack.role("MP")["role_id"], ca=cmg_stack.path("ca_cert"), **kw)


def test_lists_the_internet_mp_and_the_mp_sees_the_certificate(cmg_stack):
    mps = fetch_mp_list(**library_args(cmg_stack, cert=cmg_stack.path("client_cert"),
                                       key=cmg_stack.path("client_key")))

    assert mps == [cmg_stack.deployment["client_url"]]
    # The on-premises side: one request, with the identity the gateway vouched for.
    [seen] = cmg_stack.site_requests(path="/SMS_MP/.sms_aut")
    assert (seen.method, seen.query, seen.role) == ("GET", "MPLIST", "mp")
    assert seen.header("User-Agent") == "mytool/1.0"
    assert seen.client_auth == "MutualAuth"
    assert seen.identity["X-CMG-Client-Certificate-Subject"].startswith("CN=CLIENT01")


def test_without_a_client_certificate_the_library_reports_the_cmg_error(cmg_stack):
    with pytest.raises(CMGRefused) as refused:
        fetch_mp_list(**library_args(cmg_stack))

    assert (refused.value.status, refused.value.reason) == (403, "CMGConnector_Clientcertificaterequired")
    assert cmg_stack.site_requests() == []  # refused at the cloud edge: nothing reached the MP


@pytest.mark.parametrize("auth", ["pki", "entra", "token"])
def test_the_simulated_client_registers_with_each_auth_method(cmg_stack, auth):
    # The same stack serves the whole module: only the first test paid for the start-up.
    with cmg_stack.client(auth=auth) as client:
        smsid = client.register()
        reply = client.policy()

    assert smsid.startswith("GUID:") and reply.tag == "ReplyAssignments"
    expected = {"pki": "MutualAuth", "entra": "CCMToken", "token": "ClientToken"}[auth]
    messages = cmg_stack.site_requests(method="CCM_POST")  # only this test's requests
    assert messages[-1].client_auth == expected  # the policy request, as the MP saw it
    assert all(m.body_size > 0 and len(m.body_sha256) == 64 for m in messages)
