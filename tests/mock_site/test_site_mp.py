"""The management point: .sms_aut, messaging endpoints, policy bodies, ccmsetup.cab, admin."""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

from cryptography import x509

from cmg.messaging import parse_xml
from clientsim import payloads
from mock_site import start_site
from site_helpers import DP_ID, MP_ID, SERVICE, SUP_ID, bearer, ccm_post, site_config

INTERNET_MP = f"https://{SERVICE}/CCM_Proxy_MutualAuth/{MP_ID}"


async def test_mplist_lists_the_internet_mp_through_the_cmg(site, http):
    async with http.get(site.url("mp") + "/SMS_MP/.sms_aut?MPLIST") as r:
        assert r.status == 200
        root = parse_xml(await r.read())
    assert root.tag == "MPList"
    (mp,) = root.findall("MP")
    assert mp.get("URL") == INTERNET_MP
    assert mp.get("Name") == f"{SERVICE}/CCM_Proxy_MutualAuth/{MP_ID}"
    assert mp.get("Type") == "Internet"
    assert mp.get("SiteCode") == "PS1"
    assert mp.findtext("Version") == "9128"
    props = {p.get("Name"): p.get("Value") for p in mp.find("Capabilities")}
    assert props["SSLState"] == "63"


async def test_mplist2_and_case_insensitive_paths(site, http):
    async with http.get(site.url("mp") + "/sms_mp/.SMS_AUT?mplist2") as r:
        assert r.status == 200
        mp = parse_xml(await r.read()).find("MP")
    assert mp.findtext("RoleID") == str(MP_ID)
    assert mp.find("Site").get("Code") == "PS1"


async def test_client_port_other_than_443_appears_in_urls(tmp_path, http):
    runner = await start_site(site_config(tmp_path, client_port=8443))
    try:
        async with http.get(runner.url("mp") + "/SMS_MP/.sms_aut?MPLIST") as r:
            mp = parse_xml(await r.read()).find("MP")
        assert mp.get("URL") == f"https://{SERVICE}:8443/CCM_Proxy_MutualAuth/{MP_ID}"
    finally:
        await runner.close()


async def test_signing_certificates_are_hex_der_and_stable_across_restarts(tmp_path, http):
    seen = []
    for _ in range(2):
        runner = await start_site(site_config(tmp_path))
        try:
            got = {}
            for what in ("MPCERT", "SITESIGNCERT"):
                async with http.get(runner.url("mp") + f"/SMS_MP/.sms_aut?{what}") as r:
                    assert r.status == 200
                    got[what] = (await r.text()).strip()
                    cert = x509.load_der_x509_certificate(bytes.fromhex(got[what]))
                    assert cert.public_key().key_size == 2048
            async with http.get(runner.url("mp") + "/SMS_MP/.sms_aut?MPKEYINFORMATION") as r:
                info = parse_xml(await r.read())
            assert info.findtext("SITECODE") == "PS1"
            assert info.findtext("SIGNINGCERTIFICATE") == got["MPCERT"]
            seen.append(got)
        finally:
            await runner.close()
    assert seen[0] == seen[1]
    assert seen[0]["MPCERT"] != seen[0]["SITESIGNCERT"]


async def test_unknown_sms_aut_request_is_400(site, http):
    async with http.get(site.url("mp") + "/SMS_MP/.sms_aut?NOPE") as r:
        assert r.status == 400
        assert "unknown .sms_aut request" in r.reason


async def test_location_enumerate_mp_lists_internet_and_intranet(site, http):
    resp, reply, _ = await ccm_post(http, site, "MP_LocationManager",
                                    payloads.location_request("EnumerateMPLocationRequest", "PS1"))
    assert resp.status == 200
    records = parse_xml(reply.body).findall(".//LocationRecord")
    by_type = {r.get("Type"): r for r in records}
    assert by_type["Internet"].get("URL") == INTERNET_MP
    assert by_type["Intranet"].get("URL") == site.url("mp")


async def test_location_site_information_wsus_and_content(site, http):
    _, reply, _ = await ccm_post(http, site, "MP_LocationManager", payloads.location_request("SiteInformationRequest"))
    info = parse_xml(reply.body).find("SiteInformation")
    assert info.get("SiteCode") == "PS1" and info.get("Version").startswith("5.00.")

    _, reply, _ = await ccm_post(http, site, "MP_LocationManager", payloads.location_request("WSUSLocationRequest"))
    (rec,) = parse_xml(reply.body).iter("LocationRecord")
    assert rec.get("WSUSURL") == f"https://{SERVICE}/CCM_Proxy_MutualAuth/{SUP_ID}"

    _, reply, _ = await ccm_post(http, site, "MP_LocationManager",
                                 payloads.location_request("ContentLocationRequest", "PS1", "PS100042.3"))
    (url,) = parse_xml(reply.body).iter("URL")
    assert url.get("Name") == f"https://{SERVICE}/CCM_Proxy_MutualAuth/{DP_ID}/SMS_DP_SMSPKG$/PS100042.3"


async def test_reply_has_the_message_shape(site, http):
    resp, reply, raw = await ccm_post(http, site, "MP_LocationManager",
                                      payloads.location_request("SiteInformationRequest"))
    assert resp.headers["Content-Type"] == 'multipart/mixed; boundary="aAbBcCdDv1234567890VxXyYzZ"'
    assert reply.header.compression == "zlib"
    assert reply.header.correlation_id.startswith("{")
    assert reply.header.target_host == "CLIENT01"


async def test_unknown_location_request_and_bad_site_code(site, http):
    resp, _, _ = await ccm_post(http, site, "MP_LocationManager", "<LocationRequest><Nope/></LocationRequest>")
    assert resp.status == 400 and "unknown location request <Nope>" in resp.reason
    resp, _, _ = await ccm_post(http, site, "MP_LocationManager", payloads.location_request("SiteInformationRequest", "XYZ"))
    assert resp.status == 404


async def _register(http, site, host="CLIENT01", thumbprint=None):
    headers = {"X-CMG-Client-Certificate-Thumbprint": thumbprint,
               "X-CMG-Client-Certificate-Subject": f"CN={host}"} if thumbprint else {}
    resp, reply, _ = await ccm_post(http, site, "MP_ClientRegistration",
                                    payloads.registration_request(host, host + ".contoso.com"),
                                    source_host=host, headers=headers)
    assert resp.status == 200
    return parse_xml(reply.body).get("SMSID")


async def test_registration_issues_stable_smsids(site, http):
    a = await _register(http, site, "CLIENT01", "AA" * 20)
    assert re.fullmatch(r"GUID:[0-9A-F-]{36}", a)
    assert await _register(http, site, "CLIENT01", "AA" * 20) == a
    assert await _register(http, site, "client01", "aa" * 20) == a
    assert await _register(http, site, "CLIENT01", "BB" * 20) != a
    assert await _register(http, site, "CLIENT02", "AA" * 20) != a
    async with http.get(site.url("mp") + "/_mock/clients") as r:
        clients = await r.json()
    mine = [c for c in clients if c["smsid"] == a]
    assert mine[0]["count"] == 3 and mine[0]["identity_kind"] == "client-certificate"
    assert mine[0]["certificate_subject"] == "CN=client01"  # the latest registration's
    log = (site.ctx.config.logs_dir / "MP_RegistrationManager.log").read_text()
    assert f"as {a}" in log and 'component="MP_RegistrationManager"' in log


async def test_registrations_survive_a_restart(tmp_path, http):
    runner = await start_site(site_config(tmp_path))
    try:
        first = await _register(http, runner, "CLIENT07", "CC" * 20)
    finally:
        await runner.close()
    runner = await start_site(site_config(tmp_path))
    try:
        assert await _register(http, runner, "CLIENT07", "CC" * 20) == first
    finally:
        await runner.close()


async def test_policy_assignments_and_body_hash(site, http):
    smsid = await _register(http, site, "CLIENT01", "AA" * 20)
    resp, reply, _ = await ccm_post(http, site, "MP_PolicyManager",
                                    payloads.request_assignments(smsid, "CLIENT01", "PS1"), source_id=smsid)
    assert resp.status == 200
    root = parse_xml(reply.body)
    assert root.tag == "ReplyAssignments"
    assert root.findtext("Identification/Machine/ClientID") == smsid
    locations = list(root.iter("PolicyLocation"))
    assert len(locations) == 3
    for loc in locations:
        m = re.fullmatch(r"http://<mp>/SMS_MP/\.sms_pol\?(\{[0-9A-F-]{36}\})\.SHA256:([0-9A-F]{64})", loc.text)
        assert m, loc.text
        assert loc.get("PolicyHash") == f"SHA256:{m.group(2)}"
        async with http.get(site.url("mp") + "/SMS_MP/.sms_pol?" + loc.text.split("?", 1)[1]) as r:
            assert r.status == 200
            body = await r.read()
        assert hashlib.sha256(body).hexdigest().upper() == m.group(2)
        assert body.startswith(b"\xff\xfe")
        assert parse_xml(body.decode("utf-16")).tag == "Policy"
    # the client's own policy carries its SMSID
    bodies = []
    for loc in locations:
        async with http.get(site.url("mp") + "/SMS_MP/.sms_pol?" + loc.text.split("?", 1)[1]) as r:
            bodies.append((await r.read()).decode("utf-16"))
    assert any(smsid in b for b in bodies)
    assert any(INTERNET_MP in b for b in bodies)


async def test_policy_body_needs_the_right_hash(site, http):
    smsid = await _register(http, site)
    _, reply, _ = await ccm_post(http, site, "MP_PolicyManager", payloads.request_assignments(smsid, "CLIENT01", "PS1"))
    where = next(parse_xml(reply.body).iter("PolicyLocation")).text
    pid = where.split("?", 1)[1].split(".SHA256:")[0]
    async with http.get(site.url("mp") + f"/SMS_MP/.sms_pol?{pid}.SHA256:{'0' * 64}") as r:
        assert r.status == 404 and "has no version with SHA256" in r.reason
    async with http.get(site.url("mp") + f"/SMS_MP/.sms_pol?{{{'1' * 8}-1111-1111-1111-{'1' * 12}}}.SHA256:{'0' * 64}") as r:
        assert r.status == 404
    async with http.get(site.url("mp") + "/SMS_MP/.sms_pol?garbage") as r:
        assert r.status == 400
    # percent-encoded braces (what yarl sends) work too
    async with http.get(site.url("mp") + "/SMS_MP/.sms_pol?" + where.split("?", 1)[1].replace("{", "%7B").replace("}", "%7D")) as r:
        assert r.status == 200


async def test_policy_for_unregistered_client_is_refused(site, http):
    resp, _, _ = await ccm_post(http, site, "MP_PolicyManager",
                                payloads.request_assignments("GUID:00000000-0000-0000-0000-000000000000", "X", "PS1"))
    assert resp.status == 403 and "is not registered" in resp.reason


async def test_malformed_messages_and_unknown_endpoints(site, http):
    async with http.request("CCM_POST", site.url("mp") + "/ccm_system/request", data=b"junk",
                            headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 400 and r.reason.startswith("malformed message: content type must be multipart/mixed")
    resp, _, _ = await ccm_post(http, site, "MP_Nonexistent", "<x/>")
    assert resp.status == 404 and resp.reason == "unknown target endpoint MP_Nonexistent"
    resp, _, _ = await ccm_post(http, site, "MP_ClientRegistration", "<not-closed>")
    assert resp.status == 400 and "not well-formed" in resp.reason
    resp, _, _ = await ccm_post(http, site, "MP_ClientRegistration", "")
    assert resp.status == 400
    async with http.get(site.url("mp") + "/ccm_system/request") as r:
        assert r.status == 405 and "CCM_POST" in r.headers["Allow"]


async def test_tokenauth_path_and_case_insensitive_messaging(site, http):
    ccm = site.ctx.token_signer().ccm_token("00000000-0000-0000-0000-0000000000aa")
    for path, headers in (("/ccm_system_tokenauth/request", bearer(ccm)),
                          ("/CCM_System_TokenAuth/Request", bearer(ccm)), ("/CCM_System/Request", {})):
        resp, reply, _ = await ccm_post(http, site, "MP_LocationManager",
                                        payloads.location_request("SiteInformationRequest"), path=path,
                                        headers=headers)
        assert resp.status == 200 and "SiteInformationReply" in reply.body
    resp, _, _ = await ccm_post(http, site, "MP_LocationManager", payloads.location_request("SiteInformationRequest"),
                                path="/ccm_system_tokenauth/request")
    assert resp.status == 401 and resp.reason.startswith("ccm_system_tokenauth needs Authorization: Bearer")


async def test_requests_are_recorded_with_client_identity(site, http):
    headers = {"X-CMG-Client-Certificate-Thumbprint": "AB" * 20, "X-CMG-Client-Certificate-Subject": "CN=CLIENT09"}
    async with http.get(site.url("mp") + "/SMS_MP/.sms_aut?MPLIST", headers=headers) as r:
        assert r.status == 200
    async with http.get(site.url("mp") + "/_mock/requests") as r:
        entries = await r.json()
    entry = entries[-1]
    assert entry["method"] == "GET" and entry["path"] == "/SMS_MP/.sms_aut" and entry["query"] == "MPLIST"
    assert entry["status"] == 200 and entry["role"] == "mp"
    assert entry["client_identity"] == headers
    assert all(not e["path"].startswith("/_mock") for e in entries)


async def test_ccmsetup_cab_is_a_cabinet(site, http):
    async with http.get(site.url("mp") + "/CCM_Client/ccmsetup.cab") as r:
        assert r.status == 200
        cab = await r.read()
    assert cab[:4] == b"MSCF"
    assert struct.unpack_from("<I", cab, 8)[0] == len(cab)
    assert b"CCM_Proxy_MutualAuth" in cab
    async with http.head(site.url("mp") + "/ccm_client/CCMSETUP.CAB") as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(cab)


async def test_mp_logs_are_cmtrace(site, http):
    await ccm_post(http, site, "MP_LocationManager", payloads.location_request("SiteInformationRequest"))
    line = (Path(site.ctx.config.logs_dir) / "MP_Location.log").read_text().splitlines()[-1]
    assert re.fullmatch(r'<!\[LOG\[SiteInformationRequest from CLIENT01 .*\]LOG\]!><time="\d\d:\d\d:\d\d\.\d{3}\+000" '
                        r'date="\d\d-\d\d-\d{4}" component="MP_LocationManager" context="" type="1" thread="\d+" file="">',
                        line)
