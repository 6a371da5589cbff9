"""What an internet client sends: message bodies, SOAP envelopes, upload payloads."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from typing import AsyncIterator
from xml.sax.saxutils import escape

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
CLIENT_NS = "http://www.microsoft.com/SoftwareDistribution/Server/ClientWebService"
SIMPLEAUTH_NS = "http://www.microsoft.com/SoftwareDistribution/Server/SimpleAuthWebService"
REPORTING_NS = "http://www.microsoft.com/SoftwareDistribution"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _xml(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def location_request(kind: str, site_code: str = "", package_id: str = "") -> str:
    """``<LocationRequest>`` holding one of EnumerateMPLocationRequest, SiteInformationRequest,
    WSUSLocationRequest, ContentLocationRequest."""
    root = ET.Element("LocationRequest", SchemaVersion="1.00")
    req = ET.SubElement(root, kind, SchemaVersion="1.00")
    if site_code:
        ET.SubElement(req, "SiteCode", Name=site_code)
    info = ET.SubElement(req, "ClientLocationInfo", LocationType="SMSInternet", UseInternetDP="1",
                         UseAzure="1", AllowHTTP="1")
    ET.SubElement(info, "ADSite", Name="")
    if package_id:
        ET.SubElement(req, "Package", ID=f"UID:{package_id}", Version="1")
    return _xml(root)


def registration_request(client_name: str, fqdn: str, signing_cert_hex: str = "") -> str:
    root = ET.Element("ClientRegistrationRequest")
    data = ET.SubElement(root, "Data", RequestType="Registration", TimeStamp=_now())
    ET.SubElement(data, "AgentInformation", AgentIdentity="CCMSetup.exe", AgentVersion="5.00.9128.1000",
                  AgentType="0")
    certs = ET.SubElement(data, "Certificates")
    if signing_cert_hex:
        ET.SubElement(certs, "Signing", Encoding="HexBinary", KeyType="1").text = signing_cert_hex
    props = ET.SubElement(data, "DiscoveryProperties")
    for name, value in (("Netbios Name", client_name), ("FQ Name", fqdn), ("Locale ID", "1033"),
                        ("InternetFlag", "1")):
        ET.SubElement(props, "Property", Name=name, Value=value)
    return _xml(root)


def request_assignments(smsid: str, client_name: str, site_code: str) -> str:
    root = ET.Element("RequestAssignments", SchemaVersion="1.00", ACK="false", RequestType="Always")
    machine = ET.SubElement(ET.SubElement(root, "Identification"), "Machine")
    ET.SubElement(machine, "ClientID").text = smsid
    ET.SubElement(machine, "FQDN").text = client_name
    ET.SubElement(machine, "NetBIOSName").text = client_name
    ET.SubElement(root, "PolicySource").text = f"SMS:{site_code}"
    ET.SubElement(root, "Resource", ResourceType="Machine")
    ET.SubElement(root, "ServerCookie")
    return _xml(root)


def soap(inner: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="{SOAP_NS}">'
            f"<soap:Body>{inner}</soap:Body></soap:Envelope>").encode("utf-8")


def get_authorization_cookie(client_id: str, dns_name: str) -> bytes:
    return soap(f'<GetAuthorizationCookie xmlns="{SIMPLEAUTH_NS}"><clientId>{escape(client_id)}</clientId>'
                f"<targetGroupName /><dnsName>{escape(dns_name)}</dnsName></GetAuthorizationCookie>")


def get_cookie(auth_cookie_data: str) -> bytes:
    return soap(f'<GetCookie xmlns="{CLIENT_NS}"><authCookies><AuthorizationCookie><PlugInId>SimpleTargeting'
                f"</PlugInId><CookieData>{escape(auth_cookie_data)}</CookieData></AuthorizationCookie>"
                f"</authCookies><oldCookie /><lastChange>{_now()}</lastChange><currentTime>{_now()}</currentTime>"
                "<protocolVersion>1.20</protocolVersion></GetCookie>")


def _cookie(expiration: str, data: str) -> str:
    return f"<cookie><Expiration>{escape(expiration)}</Expiration><EncryptedData>{escape(data)}</EncryptedData></cookie>"


def sync_updates(expiration: str, data: str, installed_non_leaf: list[int], cached: list[int]) -> bytes:
    ints = lambda ids: "".join(f"<int>{i}</int>" for i in ids)  # noqa: E731
    return soap(f'<SyncUpdates xmlns="{CLIENT_NS}">{_cookie(expiration, data)}<parameters>'
                f"<ExpressQuery>false</ExpressQuery><InstalledNonLeafUpdateIDs>{ints(installed_non_leaf)}"
                f"</InstalledNonLeafUpdateIDs><OtherCachedUpdateIDs>{ints(cached)}</OtherCachedUpdateIDs>"
                "<SkipSoftwareSync>false</SkipSoftwareSync><NeedTwoGroupOutOfScopeUpdates>true"
                "</NeedTwoGroupOutOfScopeUpdates></parameters></SyncUpdates>")


def state_message_payload(client_name: str, smsid: str, size: int) -> AsyncIterator[bytes]:
    """A state-message/inventory document of exactly ``size`` bytes, generated in chunks."""
    head = (f'<?xml version="1.0" encoding="utf-8"?><Report><ReportHeader><Identification><Machine>'
            f"<ClientInstalled>1</ClientInstalled><ClientType>1</ClientType><ClientID>{escape(smsid)}</ClientID>"
            f"<NetBIOSName>{escape(client_name)}</NetBIOSName></Machine></Identification>"
            f"<ReportDetails><ReportContent>State Message Data</ReportContent></ReportDetails></ReportHeader>"
            "<ReportBody>").encode()
    tail = b"</ReportBody></Report>"

    async def gen() -> AsyncIterator[bytes]:
        remaining = size
        if size < len(head) + len(tail):
            yield (head + tail)[:size]
            return
        yield head
        remaining -= len(head) + len(tail)
        n = 0
        block = bytearray()
        while remaining > 0:
            while len(block) < 64 * 1024:
                block += (f'<StateMessage MessageTime="{_now()}" SerialNumber="{n}"><Topic ID="{n:08d}" '
                          'Type="500" IDType="0"/><State ID="1" Criticality="0"/></StateMessage>').encode()
                n += 1
            piece = bytes(block[:remaining])
            del block[:len(piece)]
            remaining -= len(piece)
            yield piece
        yield tail

    return gen()
