"""What every role of the mock site shares: configuration, bound ports, URLs, state."""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from cmg.config import RoleConfig, SiteConfig
from cmg.site_tokens import TokenSigner, load_signer
from mock_site.logs import SiteLogs
from mock_site.policy import PolicyCatalog, make_policy, policy_id
from mock_site.registry import ClientRegistry
from mock_site.signing import SigningCertificates

if TYPE_CHECKING:
    from mock_site.entra import EntraTenant

SITE_VERSION = "5.00.9128.1000"  # ConfigMgr current branch 2403
SITE_BUILD = "9128"
CLIENT_IDENTITY_HEADERS = ("X-CMG-Client-Certificate-Thumbprint", "X-CMG-Client-Certificate-Subject")


class RequestLog:
    """The last requests the roles received (for ``/_mock/requests``)."""

    def __init__(self, size: int = 2000) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)

    def record(self, entry: dict[str, Any]) -> None:
        self._entries.append(entry)

    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries)


def client_identity(headers: Any) -> dict[str, str]:
    """Every ``X-CMG-Client-*`` header the gateway passed on (names as received)."""
    return {k: v for k, v in headers.items() if k.lower().startswith("x-cmg-client-")}


@dataclass
class SiteContext:
    config: SiteConfig
    ports: dict[str, int]
    logs: SiteLogs
    certs: SigningCertificates
    clients: ClientRegistry
    requests: RequestLog = field(default_factory=RequestLog)
    started: float = field(default_factory=time.time)
    entra: "EntraTenant | None" = None  # the mock Entra ID tenant (same process), when enabled
    policies: PolicyCatalog = field(init=False)
    _signer: TokenSigner | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.policies = PolicyCatalog(self.config.site_code, self._site_wide_policies())

    # --- tokens ---

    def token_signer(self) -> TokenSigner:
        """The site's token-signing key; :class:`cmg.site_tokens.SigningKeyMissing` until
        ``certs/token-signing.pem`` / ``.key`` exist (read again on the next call)."""
        if self._signer is None:
            self._signer = load_signer(self.config)
        return self._signer

    @property
    def clock_skew(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.config.client_auth.clock_skew)

    # --- roles and URLs ---

    @property
    def site_code(self) -> str:
        return self.config.site_code

    def roles_of(self, kind: str) -> list[RoleConfig]:
        return [r for r in self.config.roles if r.kind == kind]

    @property
    def mp_role(self) -> RoleConfig | None:
        mps = self.roles_of("MP")
        return mps[0] if mps else None

    @property
    def cmg_base(self) -> str:
        port = self.config.client_port
        return f"https://{self.config.service_name}" + ("" if port == 443 else f":{port}")

    def cmg_url(self, role_id: int) -> str:
        """A role's URL through the CMG (PKI client authentication)."""
        return f"{self.cmg_base}/CCM_Proxy_MutualAuth/{role_id}"

    def cmg_host(self, role_id: int) -> str:
        """The name a client sees for a role through the CMG (no scheme)."""
        return self.cmg_url(role_id).split("://", 1)[1]

    @property
    def internet_mp_url(self) -> str:
        mp = self.mp_role
        return self.cmg_url(mp.role_id) if mp else ""

    def intranet_url(self, role: RoleConfig) -> str:
        """The role's on-prem URL; a configured port 0 is replaced by the bound one."""
        parts = urlsplit(role.internal_url)
        if parts.port == 0:
            kind = {"MP": "mp", "SUP": "sup", "DP": "dp"}.get(role.kind)
            if kind in self.ports:
                host = parts.hostname or "127.0.0.1"
                return urlunsplit((parts.scheme, f"{host}:{self.ports[kind]}", parts.path, "", ""))
        return role.internal_url

    # --- site-wide policies, built from the configuration ---

    def _site_wide_policies(self) -> list:
        code = self.site_code
        sups = self.roles_of("SUP")
        return [
            make_policy(policy_id(code, "CloudClientConfig"), code, "ClientSettings", "CCM_CloudClientConfig", {
                "AllowCloudManagementGateway": True,
                "CloudManagementGatewayServiceName": self.config.service_name,
                "InternetManagementPoint": self.internet_mp_url,
                "ClientAlwaysOnInternet": True,
            }),
            make_policy(policy_id(code, "SoftwareUpdatesClientConfig"), code, "ClientSettings",
                        "CCM_SoftwareUpdatesClientConfig", {
                            "Enabled": True,
                            "WSUSLocation": self.cmg_url(sups[0].role_id) if sups else "",
                            "ScanScheduleMinutes": 10080,
                        }),
        ]
