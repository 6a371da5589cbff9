"""The site's policies: bodies, their SHA-256, and who is assigned what.

A policy body is the XML a client downloads from ``/SMS_MP/.sms_pol?{ID}.SHA256:<hash>``,
served as UTF-16 with a BOM; the hash is the SHA-256 of exactly those bytes. Site-wide
policies (client settings) go to every registered client; one machine policy per client
carries its SMSID. All are built from the site's configuration, never canned.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from mock_site.registry import Registration

_NAMESPACE = uuid.UUID("6f6d0c52-3a1b-4c5e-9c1e-434d47504f4c")
POLICY_URL_PREFIX = "http://<mp>/SMS_MP/.sms_pol?"
_QUERY_RE = re.compile(r"^\{([0-9A-Fa-f-]{36})\}\.SHA256:([0-9A-Fa-f]{64})$")


@dataclass(frozen=True)
class Policy:
    policy_id: str  # "{GUID}"
    version: str
    category: str
    body: bytes
    sha256: str  # upper-case hex, as in the policy location

    @property
    def location(self) -> str:
        """The policy location as the MP hands it out; the client substitutes ``<mp>``."""
        return f"{POLICY_URL_PREFIX}{self.policy_id}.SHA256:{self.sha256}"


def parse_policy_query(query: str) -> tuple[str, str] | None:
    """``{GUID}.SHA256:<hex>`` -> (``{GUID}`` upper case, hex upper case), or None."""
    m = _QUERY_RE.match(query.strip())
    if not m:
        return None
    return "{" + m.group(1).upper() + "}", m.group(2).upper()


def _instance(cls: str, props: dict[str, str | int | bool]) -> str:
    out = [f"<instance class={quoteattr(cls)}>"]
    for name, value in props.items():
        if isinstance(value, bool):
            kind, text = 11, "true" if value else "false"
        elif isinstance(value, int):
            kind, text = 19, str(value)
        else:
            kind, text = 8, value
        out.append(f"<property name={quoteattr(name)} type=\"{kind}\"><value>{escape(text)}</value></property>")
    out.append("</instance>")
    return "".join(out).replace("]]>", "]]&gt;")


def make_policy(policy_id: str, site_code: str, category: str, cls: str,
                props: dict[str, str | int | bool], version: str = "1.00") -> Policy:
    rule_id = "{" + str(uuid.uuid5(_NAMESPACE, policy_id + "/rule")).upper() + "}"
    xml = (
        '<?xml version="1.0" encoding="utf-16"?>\r\n'
        f'<Policy PolicyType="Machine" PolicyID={quoteattr(policy_id)} PolicyVersion={quoteattr(version)} '
        f'PolicySource="SMS:{site_code}" PolicyCategory={quoteattr(category)}>'
        f'<PolicyRule PolicyRuleID="{rule_id}"><PolicyAction PolicyActionType="WMI-XML">'
        f"<![CDATA[{_instance(cls, props)}]]></PolicyAction></PolicyRule></Policy>"
    )
    body = xml.encode("utf-16")
    return Policy(policy_id, version, category, body, hashlib.sha256(body).hexdigest().upper())


def policy_id(*parts: str) -> str:
    return "{" + str(uuid.uuid5(_NAMESPACE, "/".join(parts))).upper() + "}"


class PolicyCatalog:
    """Every policy the MP can serve, by id; the site-wide ones fixed at start-up."""

    def __init__(self, site_code: str, site_wide: list[Policy]) -> None:
        self.site_code = site_code
        self._site_wide = list(site_wide)
        self._by_id: dict[str, Policy] = {p.policy_id: p for p in site_wide}

    def client_policy(self, reg: Registration) -> Policy:
        pid = policy_id(self.site_code, "client", reg.smsid.upper())
        policy = make_policy(pid, self.site_code, "Machine", "CCM_ClientIdentity", {
            "ClientId": reg.smsid,
            "NetBIOSName": reg.netbios_name,
            "FQDN": reg.fqdn,
            "IdentityKind": reg.identity_kind,
            "SiteCode": self.site_code,
        })
        self._by_id[pid] = policy
        return policy

    def assignments_for(self, reg: Registration) -> list[Policy]:
        return [*self._site_wide, self.client_policy(reg)]

    def lookup(self, pid: str, sha256: str) -> tuple[Policy | None, str]:
        """(policy, "") when id and hash match; (None, reason) otherwise."""
        policy = self._by_id.get(pid.upper())
        if policy is None:
            return None, f"no policy {pid}"
        if policy.sha256 != sha256.upper():
            return None, f"policy {pid} has no version with SHA256 {sha256.upper()}"
        return policy, ""
