"""Client registrations: SMSIDs issued by the MP, kept in ``data_dir/clients.jsonl``.

A client is the pair (NetBIOS name, identity); the identity is the client-certificate
thumbprint the CMG passed on, else the signing certificate in the registration request,
else nothing. Registering the same pair again returns the same SMSID, as a real site
does when a client re-registers with the same certificate. The file is append-only
(one JSON object per registration, the last line for a key wins) so thousands of
clients do not rewrite it each time.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Registration:
    smsid: str
    netbios_name: str
    fqdn: str
    identity: str
    identity_kind: str  # "client-certificate" | "signing-certificate" | "none"
    certificate_subject: str
    registered: float
    last_seen: float
    count: int


class ClientRegistry:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._by_key: dict[tuple[str, str], Registration] = {}
        self._by_smsid: dict[str, Registration] = {}
        self._lock = asyncio.Lock()

    def load(self) -> int:
        """Read earlier registrations; a damaged line is skipped (a crash mid-append)."""
        if not self._path.exists():
            return 0
        with self._path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    reg = Registration(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                self._remember(reg)
        return len(self._by_smsid)

    def _remember(self, reg: Registration) -> None:
        self._by_key[(reg.netbios_name.upper(), reg.identity)] = reg
        self._by_smsid[reg.smsid.upper()] = reg

    def get(self, smsid: str) -> Registration | None:
        return self._by_smsid.get(smsid.upper())

    def all(self) -> list[Registration]:
        return sorted(self._by_smsid.values(), key=lambda r: r.registered)

    async def register(self, netbios_name: str, fqdn: str, identity: str, identity_kind: str,
                       certificate_subject: str) -> tuple[Registration, bool]:
        """Register (or re-register) a client; returns the registration and whether it is new."""
        async with self._lock:
            now = time.time()
            old = self._by_key.get((netbios_name.upper(), identity))
            if old is not None:
                reg = Registration(old.smsid, netbios_name, fqdn or old.fqdn, identity, identity_kind,
                                   certificate_subject or old.certificate_subject, old.registered, now,
                                   old.count + 1)
            else:
                reg = Registration("GUID:" + str(uuid.uuid4()).upper(), netbios_name, fqdn, identity,
                                   identity_kind, certificate_subject, now, now, 1)
            line = json.dumps(asdict(reg)) + "\n"
            await asyncio.get_running_loop().run_in_executor(None, self._append, line)
            self._remember(reg)
            return reg, old is None

    def _append(self, line: str) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("a", encoding="utf-8") as f:
            f.write(line)
