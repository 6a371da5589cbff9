"""BITS uploads to the MP (``BITS_POST /CCM_Incoming/{GUID}``), the IIS BITS server
extension's upload protocol.

Packets (``BITS-Packet-Type``): Ping, Create-Session, Fragment, Close-Session,
Cancel-Session; every reply is ``BITS-Packet-Type: Ack``. Fragments carry
``Content-Range: bytes a-b/total`` and are streamed to ``data_dir/incoming/`` while
hashed, never held whole in memory. A fragment must start where the received bytes end:

- one that starts beyond (a gap) is refused with 416 and ``BITS-Received-Content-Range``
  saying where to resume;
- one that starts before (a retransmission whose ack was lost) is accepted and its
  already-received bytes skipped, as the real server does;
- one whose body is shorter or longer than its range is refused (400) and rolled back:
  the file is truncated and the hash restored to the previous fragment's end.

Close-Session commits the file (renames it in place, records size and SHA-256) only
when bytes 0..total-1 all arrived; otherwise it is refused and nothing is complete.
Error codes (``BITS-Error-Code``, HRESULTs; the emulator's choice, the real server's are
undocumented): 0x80070057 bad request, 0x80070490 unknown session, 0x80070026 short
fragment, 0x8007139F close before all bytes arrived, 0x80070070 upload too large.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from mock_site.context import SiteContext, client_identity

BITS_PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
E_INVALIDARG = "0x80070057"
E_NOT_FOUND = "0x80070490"
E_HANDLE_EOF = "0x80070026"
E_INVALID_STATE = "0x8007139F"
E_DISK_FULL = "0x80070070"
ERROR_CONTEXT_REMOTE_FILE = "0x5"

_NAME_RE = re.compile(r"^[A-Za-z0-9{}_-][A-Za-z0-9{}._-]{0,127}$")
_RANGE_RE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+)$")
_READ_CHUNK = 256 * 1024
_WRITE_BATCH = 1024 * 1024


class BitsError(Exception):
    def __init__(self, status: int, code: str, reason: str, received: int | None = None) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason, self.received = status, code, reason, received


@dataclass(frozen=True)
class UploadRecord:
    name: str
    size: int
    sha256: str
    complete: bool
    identity: dict[str, str]
    session_id: str
    updated: float


@dataclass
class UploadSession:
    session_id: str
    name: str
    part: Path
    identity: dict[str, str]
    total: int | None = None
    received: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    created: float = field(default_factory=time.time)

    def record(self) -> UploadRecord:
        return UploadRecord(self.name, self.received, self.hasher.hexdigest(), False, dict(self.identity),
                            self.session_id, time.time())


class UploadStore:
    """Open BITS sessions and committed uploads, in ``folder``."""

    def __init__(self, ctx: SiteContext, folder: Path, *, max_size: int = 16 * 1024**3,
                 max_sessions: int = 10000) -> None:
        self.ctx = ctx
        self.folder = folder
        self.max_size = max_size
        self.max_sessions = max_sessions
        self.sessions: dict[str, UploadSession] = {}
        self.records: dict[str, UploadRecord] = {}

    def load(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for meta in self.folder.glob("*.upload.json"):
            try:
                rec = UploadRecord(**json.loads(meta.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                continue
            self.records[rec.name] = rec
        for stale in self.folder.glob("*.part"):  # sessions do not survive a restart
            stale.unlink(missing_ok=True)

    def uploads(self) -> list[dict[str, Any]]:
        out = [asdict(r) for r in self.records.values()]
        out += [asdict(s.record()) for s in self.sessions.values()]
        return sorted(out, key=lambda r: r["updated"])

    def upload(self, name: str) -> dict[str, Any] | None:
        if name in self.records:
            return asdict(self.records[name])
        for s in self.sessions.values():
            if s.name == name:
                return asdict(s.record())
        return None

    # --- the protocol ---

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.path.rstrip("/").rsplit("/", 1)[-1]
        packet = request.headers.get("BITS-Packet-Type", "")
        session_id = request.headers.get("BITS-Session-Id", "")
        log = self.ctx.logs.relay
        try:
            if not _NAME_RE.match(name):
                raise BitsError(400, E_INVALIDARG, f"bad upload name {name!r}")
            kind = packet.lower()
            if kind == "ping":
                return self._ack()
            if kind == "create-session":
                return self._create(request, name)
            session = self.sessions.get(session_id)
            if session is None or session.name != name:
                raise BitsError(400, E_NOT_FOUND, f"no BITS session {session_id or '(none)'} for {name}")
            if kind == "fragment":
                return await self._fragment(request, session)
            if kind == "close-session":
                return await self._close(session)
            if kind == "cancel-session":
                return await self._cancel(session)
            raise BitsError(400, E_INVALIDARG, f"unknown BITS-Packet-Type {packet!r}")
        except BitsError as exc:
            log.warning(f"BITS {packet or '(no packet type)'} for {name} refused: {exc.status} {exc.reason}")
            headers = {"BITS-Packet-Type": "Ack", "BITS-Error-Code": exc.code,
                       "BITS-Error-Context": ERROR_CONTEXT_REMOTE_FILE}
            if session_id:
                headers["BITS-Session-Id"] = session_id
            if exc.received is not None:
                headers["BITS-Received-Content-Range"] = str(exc.received)
            resp = web.Response(status=exc.status, reason=exc.reason[:200].replace("\n", " "), headers=headers)
            if request.can_read_body and not request.content.at_eof():
                resp.force_close()  # an unread fragment body must not be parsed as a request
            return resp

    @staticmethod
    def _ack(**headers: str) -> web.Response:
        return web.Response(status=200, headers={"BITS-Packet-Type": "Ack", **headers})

    def _create(self, request: web.Request, name: str) -> web.Response:
        offered = [p.strip().lower() for p in request.headers.get("BITS-Supported-Protocols", "").split(" ") if p.strip()]
        if BITS_PROTOCOL not in offered:
            raise BitsError(400, E_INVALIDARG, f"no supported protocol offered (this server speaks {BITS_PROTOCOL})")
        if len(self.sessions) >= self.max_sessions:
            raise BitsError(503, E_INVALID_STATE, "too many open BITS sessions")
        sid = "{" + str(uuid.uuid4()).upper() + "}"
        session = UploadSession(sid, name, self.folder / f"{name}.{sid[1:-1]}.part", client_identity(request.headers))
        self.sessions[sid] = session
        self.ctx.logs.relay.info(f"BITS session {sid} created for {name}")
        return self._ack(**{"BITS-Protocol": BITS_PROTOCOL, "BITS-Session-Id": sid, "Accept-Encoding": "Identity"})

    async def _fragment(self, request: web.Request, s: UploadSession) -> web.Response:
        m = _RANGE_RE.match(request.headers.get("Content-Range", "").strip())
        if not m:
            raise BitsError(400, E_INVALIDARG, "fragment needs Content-Range: bytes a-b/total")
        first, last, total = (int(g) for g in m.groups())
        if last < first or last >= total:
            raise BitsError(400, E_INVALIDARG, f"bad Content-Range bytes {first}-{last}/{total}")
        if total > self.max_size:
            raise BitsError(413, E_DISK_FULL, f"upload of {total} bytes is larger than {self.max_size}")
        length = last - first + 1
        declared = request.content_length
        if declared is not None and declared != length:
            raise BitsError(400, E_HANDLE_EOF if declared < length else E_INVALIDARG,
                            f"fragment body is {declared} bytes but its range holds {length}", s.received)
        async with s.lock:
            if s.total is not None and total != s.total:
                raise BitsError(400, E_INVALIDARG, f"fragment total {total} differs from the session's {s.total}")
            if first > s.received:
                raise BitsError(416, E_INVALIDARG, f"fragment starts at {first}, expected {s.received}", s.received)
            s.total = total
            s.identity.update(client_identity(request.headers))
            await self._stream_in(request, s, length, s.received - first, first + length)
            self.ctx.logs.relay.info(f"BITS session {s.session_id}: bytes {first}-{last}/{total} received")
            return self._ack(**{"BITS-Session-Id": s.session_id, "BITS-Received-Content-Range": str(s.received)})

    async def _stream_in(self, request: web.Request, s: UploadSession, length: int, skip: int,
                         end: int) -> None:
        """Append the fragment's new bytes (after ``skip`` already-received ones) to the part
        file; the session then holds bytes up to ``end``. On any failure, roll back."""
        loop = asyncio.get_running_loop()
        start = s.received
        saved = s.hasher.copy()
        f = await loop.run_in_executor(None, _open_at, s.part, start)
        got = 0
        batch: list[bytes] = []
        batched = 0

        def write(chunks: list[bytes]) -> None:
            for c in chunks:
                f.write(c)
                s.hasher.update(c)

        try:
            while got < length:
                try:
                    chunk = await request.content.read(min(_READ_CHUNK, length - got))
                except (OSError, RequestPayloadError, HttpProcessingError) as exc:  # the client went away mid-body
                    raise BitsError(400, E_HANDLE_EOF, f"fragment body broke off after {got} of {length} bytes: "
                                                       f"{type(exc).__name__}", start) from None
                if not chunk:
                    raise BitsError(400, E_HANDLE_EOF, f"fragment body ended after {got} of {length} bytes", start)
                got += len(chunk)
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                if skip:
                    chunk, skip = chunk[skip:], 0
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    await loop.run_in_executor(None, write, batch)
                    batch, batched = [], 0
            if await request.content.read(1):
                raise BitsError(400, E_INVALIDARG, f"fragment body is longer than its range ({length} bytes)", start)
            if batch:
                await loop.run_in_executor(None, write, batch)
            await loop.run_in_executor(None, f.close)
            s.received = max(start, end)
        except BaseException:
            s.hasher = saved
            await loop.run_in_executor(None, _truncate_close, f, start)
            raise

    async def _close(self, s: UploadSession) -> web.Response:
        async with s.lock:
            if s.total is None or s.received != s.total:
                have = f"{s.received} of {s.total}" if s.total is not None else "no"
                raise BitsError(400, E_INVALID_STATE, f"cannot close session {s.session_id}: {have} bytes received",
                                s.received)
            record = UploadRecord(s.name, s.received, s.hasher.hexdigest(), True, dict(s.identity),
                                  s.session_id, time.time())
            final = self.folder / s.name
            meta = self.folder / f"{s.name}.upload.json"
            await asyncio.get_running_loop().run_in_executor(None, _commit, s.part, final, meta, record)
            self.records[s.name] = record
            del self.sessions[s.session_id]
        self.ctx.logs.relay.info(f"BITS session {s.session_id} closed: {s.name} committed, "
                                 f"{record.size} bytes, SHA256 {record.sha256.upper()}")
        return self._ack(**{"BITS-Session-Id": s.session_id})

    async def _cancel(self, s: UploadSession) -> web.Response:
        async with s.lock:
            self.sessions.pop(s.session_id, None)
            await asyncio.get_running_loop().run_in_executor(None, lambda: s.part.unlink(missing_ok=True))
        self.ctx.logs.relay.info(f"BITS session {s.session_id} cancelled ({s.name})")
        return self._ack(**{"BITS-Session-Id": s.session_id})

    async def close(self) -> None:
        for s in list(self.sessions.values()):
            s.part.unlink(missing_ok=True)
        self.sessions.clear()


def _open_at(path: Path, offset: int) -> Any:
    f = open(path, "r+b" if path.exists() else "w+b")
    f.truncate(offset)
    f.seek(offset)
    return f


def _truncate_close(f: Any, offset: int) -> None:
    try:
        f.truncate(offset)
    finally:
        f.close()


def _commit(part: Path, final: Path, meta: Path, record: UploadRecord) -> None:
    if not part.exists():  # a zero-byte upload never opened its part file
        part.touch()
    os.replace(part, final)
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)), encoding="utf-8")
    os.replace(tmp, meta)
