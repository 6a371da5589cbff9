"""The software update point: WSUS client web services in SOAP 1.1."""

from __future__ import annotations

from clientsim import payloads
from cmg.messaging import parse_xml
from mock_site.sup import CATALOG

NS = payloads.CLIENT_NS
SOAP = payloads.SOAP_NS


async def soap(http, site, path, ns, action, envelope):
    async with http.post(site.url("sup") + path, data=envelope, headers={
            "Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{ns}/{action}"'}) as r:
        return r.status, parse_xml(await r.read())


async def server_cookie(http, site):
    status, auth = await soap(http, site, "/SimpleAuthWebService/SimpleAuth.asmx", payloads.SIMPLEAUTH_NS,
                              "GetAuthorizationCookie", payloads.get_authorization_cookie("GUID:ABC", "client01"))
    assert status == 200
    data = auth.findtext(f".//{{{payloads.SIMPLEAUTH_NS}}}CookieData")
    assert auth.findtext(f".//{{{payloads.SIMPLEAUTH_NS}}}PlugInId") == "SimpleTargeting"
    status, got = await soap(http, site, "/ClientWebService/client.asmx", NS, "GetCookie", payloads.get_cookie(data))
    assert status == 200
    return got.findtext(f".//{{{NS}}}Expiration"), got.findtext(f".//{{{NS}}}EncryptedData")


def update_ids(root):
    return [int(i.findtext(f"{{{NS}}}ID")) for i in root.iter(f"{{{NS}}}UpdateInfo")]


async def test_get_config(site, http):
    status, root = await soap(http, site, "/ClientWebService/client.asmx", NS, "GetConfig",
                              payloads.soap(f'<GetConfig xmlns="{NS}"><protocolVersion>1.20</protocolVersion></GetConfig>'))
    assert status == 200 and root.tag == f"{{{SOAP}}}Envelope"
    assert root.findtext(f".//{{{NS}}}PlugInID") == "SimpleTargeting"


async def test_cookie_round_trip_and_sync_rounds(site, http):
    exp, data = await server_cookie(http, site)
    url = "/ClientWebService/client.asmx"
    status, r1 = await soap(http, site, url, NS, "SyncUpdates", payloads.sync_updates(exp, data, [], []))
    assert status == 200
    detectoids = [u.revision_id for u in CATALOG if not u.is_leaf]
    assert update_ids(r1) == detectoids
    assert r1.findtext(f".//{{{NS}}}NewCookie/{{{NS}}}EncryptedData")
    status, r2 = await soap(http, site, url, NS, "SyncUpdates", payloads.sync_updates(exp, data, detectoids, detectoids))
    leaves = [u.revision_id for u in CATALOG if u.is_leaf]
    assert update_ids(r2) == leaves
    xml = r2.find(f".//{{{NS}}}UpdateInfo").findtext(f"{{{NS}}}Xml")
    assert f'UpdateID="{CATALOG[1].update_id}" RevisionNumber="{CATALOG[1].revision_number}"' in xml
    status, r3 = await soap(http, site, url, NS, "SyncUpdates",
                            payloads.sync_updates(exp, data, detectoids, detectoids + leaves))
    assert update_ids(r3) == []

    ints = "".join(f"<int>{i}</int>" for i in leaves)
    status, ext = await soap(http, site, url, NS, "GetExtendedUpdateInfo", payloads.soap(
        f'<GetExtendedUpdateInfo xmlns="{NS}"><cookie><Expiration>{exp}</Expiration><EncryptedData>{data}'
        f"</EncryptedData></cookie><revisionIDs>{ints}</revisionIDs></GetExtendedUpdateInfo>"))
    assert status == 200
    urls = [u.text for u in ext.iter(f"{{{NS}}}Url")]
    assert len(urls) == 3
    assert all(u.startswith("https://GraniteFalls.WestUS.CloudApp.Azure.Com/CCM_Proxy_MutualAuth/72057594037927942/SMS_DP_SMSPKG$/")
               for u in urls)

    rns = payloads.REPORTING_NS
    status, rep = await soap(http, site, "/ReportingWebService/ReportingWebService.asmx", rns, "ReportEventBatch",
                             payloads.soap(f'<ReportEventBatch xmlns="{rns}"><cookie><Expiration>{exp}</Expiration>'
                                           f"<EncryptedData>{data}</EncryptedData></cookie><eventBatch>"
                                           "<ReportingEvent/><ReportingEvent/></eventBatch></ReportEventBatch>"))
    assert status == 200 and rep.findtext(f".//{{{rns}}}ReportEventBatchResult") == "true"
    assert site.sup.events_reported == 2


async def test_faults(site, http):
    url = "/ClientWebService/client.asmx"
    status, root = await soap(http, site, url, NS, "SyncUpdates", payloads.sync_updates("x", "Zm9vYmFy", [], []))
    assert status == 500
    fault = root.find(f".//{{{SOAP}}}Fault")
    assert fault.findtext("faultcode") == "soap:Client"
    assert fault.findtext("detail/ErrorCode") == "InvalidCookie"

    status, root = await soap(http, site, url, NS, "GetCookie", payloads.get_cookie("forged"))
    assert status == 500 and root.findtext(f".//{{{SOAP}}}Fault/detail/ErrorCode") == "InvalidAuthorizationCookie"

    status, root = await soap(http, site, url, NS, "Frobnicate", payloads.soap(f'<Frobnicate xmlns="{NS}"/>'))
    assert status == 500 and "unknown action" in root.findtext(f".//{{{SOAP}}}Fault/faultstring")

    status, root = await soap(http, site, url, NS, "GetConfig", b"<soap:Envelope")
    assert status == 500 and "malformed request" in root.findtext(f".//{{{SOAP}}}Fault/faultstring")

    dtd = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'
    status, root = await soap(http, site, url, NS, "GetConfig", dtd)
    assert status == 500 and "DTD" in root.findtext(f".//{{{SOAP}}}Fault/faultstring")

    # SOAPAction naming one call and the body another
    status, root = await soap(http, site, url, NS, "GetCookie",
                              payloads.soap(f'<GetConfig xmlns="{NS}"><protocolVersion>1.20</protocolVersion></GetConfig>'))
    assert status == 500 and "does not match" in root.findtext(f".//{{{SOAP}}}Fault/faultstring")
