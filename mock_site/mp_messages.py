"""The MP's messaging endpoints: a decoded request message in, a reply body out.

``MP_LocationManager`` answers location requests (MPs, site information, software
update points, content) with URLs through the CMG; ``MP_ClientRegistration`` issues
SMSIDs; ``MP_PolicyManager`` answers ``RequestAssignments``.

On ``ccm_system_tokenauth`` each endpoint also gets the validated token. Registration
with a bulk registration token (or a client token, to renew it) answers, beside the
SMSID, the client's own token (90 days, ``sub`` = the SMSID) as a child of the reply::

    <ClientRegistrationResponse SMSID="GUID:..." ...>
      <ClientToken Type="ClientToken" ExpiresOn="2025-01-01T00:00:00Z">eyJ...</ClientToken>
    </ClientRegistrationResponse>

Registration with a CCM token (an Entra ID client) takes the Entra device id as the
client's identity and answers no client token (the client keeps using CCM tokens). Every reply is built from
the request and the site's state. A request the client got wrong raises
:class:`EndpointError` with a 400-class status and a reason.
"""

from __future__ import annotations

import hashlib
import time
import xml.etree.ElementTree as ET
from typing import Awaitable, Callable

from cmg.messaging import Message, XMLFormatError, parse_xml
from cmg.site_tokens import SigningKeyMissing
from cmg.tokens import CLIENT_TOKEN_LIFETIME, TYPE_BULK_REGISTRATION, TYPE_CCM, TYPE_CLIENT, ValidToken
from mock_site.context import SITE_BUILD, SITE_VERSION, SiteContext


class EndpointError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _body_root(msg: Message) -> ET.Element:
    if not msg.body.strip():
        raise EndpointError(400, f"{msg.header.target_endpoint} message has an empty body")
    try:
        return parse_xml(msg.body)
    except XMLFormatError as exc:
        raise EndpointError(400, f"{msg.header.target_endpoint} message body: {exc}") from None


def _xml(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, attrs)
    if text is not None:
        e.text = text
    return e


# --- MP_LocationManager -----------------------------------------------------------


def _mp_site(parent: ET.Element, ctx: SiteContext) -> None:
    _el(parent, "MPSite", SiteCode=ctx.site_code, MasterSiteCode=ctx.site_code, SiteLocality="LOCAL",
        IISPreferedPort="80", IISSSLPreferedPort="443")


def _enumerate_mp(ctx: SiteContext, req: ET.Element) -> ET.Element:
    reply = ET.Element("EnumerateMPLocationReply", SchemaVersion="1.00")
    site = _el(_el(reply, "Sites"), "Site")
    _mp_site(site, ctx)
    records = _el(site, "LocationRecords")
    for role in ctx.roles_of("MP"):
        cmg = ctx.cmg_url(role.role_id)
        _el(records, "LocationRecord", Name=ctx.cmg_host(role.role_id), FQDN=ctx.cmg_host(role.role_id),
            URL=cmg, Type="Internet", Version=SITE_BUILD, SiteCode=ctx.site_code, Capabilities="SSL")
        intranet = ctx.intranet_url(role)
        host = intranet.split("://", 1)[-1].split("/", 1)[0]
        _el(records, "LocationRecord", Name=role.name, FQDN=host, URL=intranet, Type="Intranet",
            Version=SITE_BUILD, SiteCode=ctx.site_code, Capabilities="")
    return reply


def _site_information(ctx: SiteContext, req: ET.Element) -> ET.Element:
    asked = req.find("SiteCode")
    if asked is not None and asked.get("Name") and asked.get("Name", "").upper() != ctx.site_code:
        raise EndpointError(404, f"site {asked.get('Name')} is not known to this management point")
    reply = ET.Element("SiteInformationReply", SchemaVersion="1.00")
    _el(reply, "SiteInformation", SiteCode=ctx.site_code, Version=SITE_VERSION, BuildNumber=SITE_BUILD,
        CMGServiceName=ctx.config.service_name, InternetMP=ctx.internet_mp_url)
    return reply


def _wsus_location(ctx: SiteContext, req: ET.Element) -> ET.Element:
    reply = ET.Element("WSUSLocationReply", SchemaVersion="1.00")
    site = _el(_el(reply, "Sites"), "Site")
    _mp_site(site, ctx)
    records = _el(site, "LocationRecords")
    for role in ctx.roles_of("SUP"):
        _el(records, "LocationRecord", WSUSURL=ctx.cmg_url(role.role_id), ServerName=role.name,
            Type="Internet", RoleID=str(role.role_id))
    return reply


def _content_location(ctx: SiteContext, req: ET.Element) -> ET.Element:
    package = req.find("Package")
    content_id = package.get("ID", "") if package is not None else ""
    if not content_id:
        raise EndpointError(400, "ContentLocationRequest names no <Package ID>")
    if content_id.upper().startswith("UID:"):
        content_id = content_id[4:]
    reply = ET.Element("ContentLocationReply", SchemaVersion="1.00")
    _el(reply, "ContentInfo", PackageFlags="0", ContentID=content_id)
    site = _el(_el(reply, "Sites"), "Site")
    _mp_site(site, ctx)
    records = _el(site, "LocationRecords")
    for role in ctx.roles_of("DP"):
        record = _el(records, "LocationRecord")
        _el(record, "URL", Name=f"{ctx.cmg_url(role.role_id)}/SMS_DP_SMSPKG$/{content_id}", Signature="")
        _el(record, "ServerRemoteName", ctx.cmg_host(role.role_id))
        _el(record, "DPType", "CLOUD")
        _el(record, "Locality", "INTERNET")
        _el(record, "RoleID", str(role.role_id))
    return reply


_LOCATION_REQUESTS: dict[str, Callable[[SiteContext, ET.Element], ET.Element]] = {
    "EnumerateMPLocationRequest": _enumerate_mp,
    "SiteInformationRequest": _site_information,
    "WSUSLocationRequest": _wsus_location,
    "ContentLocationRequest": _content_location,
}


async def location_manager(ctx: SiteContext, msg: Message, identity: dict[str, str],
                           token: ValidToken | None = None) -> str:
    root = _body_root(msg)
    request = root
    if root.tag == "LocationRequest":  # a wrapper holding one request
        children = list(root)
        if len(children) != 1:
            raise EndpointError(400, "LocationRequest must hold exactly one request element")
        request = children[0]
    handler = _LOCATION_REQUESTS.get(request.tag)
    if handler is None:
        raise EndpointError(400, f"unknown location request <{request.tag}> "
                                 f"(known: {', '.join(_LOCATION_REQUESTS)})")
    reply = handler(ctx, request)
    ctx.logs.location.info(f"{request.tag} from {msg.header.source_host or '?'} "
                           f"({msg.header.source_id or 'unregistered'}): replied {reply.tag}")
    return _xml(reply)


# --- MP_ClientRegistration -------------------------------------------------------


async def client_registration(ctx: SiteContext, msg: Message, identity: dict[str, str],
                              token: ValidToken | None = None) -> str:
    root = _body_root(msg)
    if root.tag != "ClientRegistrationRequest":
        raise EndpointError(400, f"MP_ClientRegistration expects <ClientRegistrationRequest>, not <{root.tag}>")
    data = root.find("Data")
    request_type = data.get("RequestType", "Registration") if data is not None else "Registration"
    props = {p.get("Name", ""): p.get("Value", "") for p in root.iter("Property")}
    netbios = props.get("Netbios Name") or msg.header.source_host
    if not netbios:
        raise EndpointError(400, "registration names no client (no 'Netbios Name' property, no SourceHost)")
    fqdn = props.get("FQ Name", "")
    lowered = {k.lower(): v for k, v in identity.items()}
    thumbprint = lowered.get("x-cmg-client-certificate-thumbprint", "").strip().upper()
    subject = lowered.get("x-cmg-client-certificate-subject", "")
    signing = root.find("Data/Certificates/Signing")
    renewed = ctx.clients.get(token.subject) if token is not None and token.kind == TYPE_CLIENT else None
    if renewed is not None:  # a registered client renewing its token: the same registration
        ident, kind = renewed.identity, renewed.identity_kind
    elif token is not None and token.kind == TYPE_CCM:
        ident = str(token.claims.get("deviceid") or token.subject)
        kind = "entra-device" if token.claims.get("deviceid") else "entra-user"
    elif thumbprint:
        ident, kind = thumbprint, "client-certificate"
    elif signing is not None and (signing.text or "").strip():
        try:
            der = bytes.fromhex((signing.text or "").strip())
        except ValueError:
            raise EndpointError(400, "registration <Signing> certificate is not hex") from None
        ident, kind = hashlib.sha1(der).hexdigest().upper(), "signing-certificate"
    elif token is not None and token.kind == TYPE_BULK_REGISTRATION:
        ident, kind = f"bulk:{token.claims.get('jti', '')}", "bulk-registration-token"
    else:
        ident, kind = "", "none"
    signer = None
    if token is not None and token.kind in (TYPE_BULK_REGISTRATION, TYPE_CLIENT):
        try:
            signer = ctx.token_signer()
        except SigningKeyMissing as exc:
            raise EndpointError(503, f"cannot issue a client token: {exc}") from None
    reg, new = await ctx.clients.register(netbios, fqdn, ident, kind, subject)
    via = f", with a {token.kind} token" if token is not None else ""
    ctx.logs.registration.info(
        f"{'Registered' if new else 'Re-registered'} client {netbios} as {reg.smsid} "
        f"(identity {kind} {ident or '-'}, {request_type}{via})"
    )
    now = time.time()
    reply = ET.Element("ClientRegistrationResponse", SMSID=reg.smsid, ResponseType=request_type,
                       RegistrationApprovalStatus="1", TimeStamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
    if signer is not None:
        client_token = signer.client_token(reg.smsid)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + CLIENT_TOKEN_LIFETIME.total_seconds()))
        _el(reply, "ClientToken", client_token, Type=TYPE_CLIENT, ExpiresOn=expires)
        ctx.logs.registration.info(f"Issued a client token to {reg.smsid}, valid until {expires}")
    return _xml(reply)


# --- MP_PolicyManager -------------------------------------------------------------


async def policy_manager(ctx: SiteContext, msg: Message, identity: dict[str, str],
                         token: ValidToken | None = None) -> str:
    root = _body_root(msg)
    if root.tag != "RequestAssignments":
        raise EndpointError(400, f"MP_PolicyManager expects <RequestAssignments>, not <{root.tag}>")
    client_id = (root.findtext("Identification/Machine/ClientID") or msg.header.source_id or "").strip()
    if not client_id:
        raise EndpointError(400, "RequestAssignments names no ClientID")
    reg = ctx.clients.get(client_id)
    if reg is None:
        ctx.logs.policy.warning(f"RequestAssignments from unregistered client {client_id}")
        raise EndpointError(403, f"client {client_id} is not registered")
    if token is not None and token.kind == TYPE_CLIENT and token.subject.upper() != reg.smsid.upper():
        ctx.logs.policy.warning(f"RequestAssignments for {client_id} with the client token of {token.subject}")
        raise EndpointError(403, f"the client token of {token.subject} may not ask policy for {client_id}")
    resource = root.find("Resource")
    resource_type = resource.get("ResourceType", "Machine") if resource is not None else "Machine"
    policies = ctx.policies.assignments_for(reg) if resource_type == "Machine" else []

    reply = ET.Element("ReplyAssignments", SchemaVersion="1.00", ReplyType="Full")
    machine = _el(_el(reply, "Identification"), "Machine")
    _el(machine, "ClientID", reg.smsid)
    _el(machine, "NetBIOSName", reg.netbios_name)
    _el(machine, "FQDN", reg.fqdn)
    _el(reply, "PolicySource", f"SMS:{ctx.site_code}", SourceType="SMS")
    _el(reply, "Resource", ResourceType=resource_type)
    _el(reply, "ServerCookie", time.strftime("%Y%m%d%H%M%S", time.gmtime(ctx.started)))
    assignments = _el(reply, "PolicyAssignments")
    for p in policies:
        a = _el(assignments, "PolicyAssignment", PolicyAssignmentID=p.policy_id)
        pol = _el(a, "Policy", PolicyID=p.policy_id, PolicyVersion=p.version, PolicyType="Machine",
                  PolicyCategory=p.category)
        _el(pol, "PolicyLocation", p.location, PolicyHash=f"SHA256:{p.sha256}", Encrypted="false")
    ctx.logs.policy.info(f"Replied {len(policies)} {resource_type} policy assignment(s) to {reg.smsid}")
    return _xml(reply)


Endpoint = Callable[[SiteContext, Message, dict[str, str], "ValidToken | None"], Awaitable[str]]
ENDPOINTS: dict[str, Endpoint] = {
    "MP_LocationManager": location_manager,
    "MP_ClientRegistration": client_registration,
    "MP_PolicyManager": policy_manager,
}
