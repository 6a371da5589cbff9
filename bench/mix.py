"""The ConfigMgr mix (``cmgmix``): an asyncio load generator with a client certificate.

wrk cannot send this: ``CCM_POST`` messages with a multipart body, ``BITS_POST`` upload
sessions whose later packets need the session id of the first answer, policy GETs whose
paths come from a message reply, and ``Range`` reads. Each of ``connections`` keep-alive
TLS connections (client certificate, uvloop when installed, raw asyncio streams, responses
parsed by httptools) runs the same schedule of operations back to back:

- ``ccm_post``: ``CCM_POST <MP>/ccm_system/request``, a message built by
  :mod:`cmg.messaging` (the client simulator's code): RequestAssignments to
  ``MP_PolicyManager`` and SiteInformationRequest to ``MP_LocationManager``, alternately;
- ``policy_get``: ``GET <MP>/SMS_MP/.sms_pol?{ID}.SHA256:<hash>`` of the policies the MP
  assigned at set-up, SHA-256 of the body checked;
- ``bits_upload``: a 256 KiB upload as :mod:`mock_site.bits` implements BITS:
  ``BITS_POST`` Create-Session, one Fragment (``Content-Range: bytes 0-262143/262144``),
  Close-Session (three requests);
- ``range_read``: ``GET <DP>/<file>`` with ``Range: bytes=a-b`` (64 KiB at a random
  offset), 206 and the length checked.

Schedule per connection: 3 ``ccm_post``, 3 ``policy_get``, 3 ``range_read``, 1
``bits_upload`` (so 12 requests per round). Before the clock starts, the generator
registers one client through the same path (``MP_ClientRegistration``), asks for its
policy assignments and keeps the policy locations.

Through the CMG the MP is the mock site behind the connection point (``mp_prefix`` =
``/CCM_Proxy_MutualAuth/<MP role id>``); through nginx and the SSH tunnel the bench
starts the same mock site and the proxy sends the MP's paths to it (``mp_prefix`` = "").
Without an MP (``mp_prefix`` None) only ``range_read`` runs: that is the generator's
ceiling where there is no ConfigMgr site behind the server (``direct``).

Run as ``python -m bench.mix CONFIG_JSON``; prints one ``MIXJSON {...}`` line. Every loop
is bounded: the run by ``seconds`` (and ``max_requests``), each request by ``timeout``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import resource
import ssl
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import httptools

from clientsim import payloads
from cmg.messaging import (Message, MessageHeader, decode_message, encode_message, new_message_id,
                           parse_xml)

from .stats import percentile

OPS = ("ccm_post", "policy_get", "bits_upload", "range_read")
SCHEDULE = ("ccm_post", "range_read", "policy_get", "ccm_post", "range_read", "policy_get",
            "range_read", "ccm_post", "policy_get", "bits_upload")
CONTENT_ONLY = ("range_read",)
BITS_PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
USER_AGENT = "ConfigMgr Messaging HTTP Sender"
BITS_USER_AGENT = "Microsoft BITS/7.8"


@dataclass
class MixConfig:
    host: str
    port: int
    server_name: str  # SNI and Host
    ca: str
    cert: str | None
    key: str | None
    content_path: str  # full path of the file the range reads address
    content_size: int
    # The MP's path prefix: "/CCM_Proxy_MutualAuth/<MP role id>" through the CMG, "" where a
    # proxy sends the MP's own paths to it; None: no MP, content reads only.
    mp_prefix: str | None = None
    connections: int = 16
    seconds: float = 2.0
    max_requests: int = 5_000_000
    timeout: float = 30.0
    range_size: int = 64 * 1024
    upload_size: int = 256 * 1024
    client_name: str = "BENCHMIX01"
    seed: int = 1


@dataclass
class MixResult:
    requests: int = 0  # answered requests (any status)
    unmeasured: int = 0  # answered before the clock started (set-up, warm-up)
    ok: int = 0  # answered as expected
    errors: int = 0  # unexpected status, wrong body, socket errors, timeouts
    seconds: float = 0.0
    ops: dict[str, int] = field(default_factory=dict)  # completed operations
    op_errors: dict[str, int] = field(default_factory=dict)
    op_p50_ms: dict[str, float] = field(default_factory=dict)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    p999_ms: float = float("nan")
    bytes_in: int = 0
    bytes_out: int = 0
    cpu_s: float = 0.0  # the generator's own CPU during the measured run
    error_samples: list[str] = field(default_factory=list)
    setup: str = ""

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


class MixError(Exception):
    """A request of the mix got an unexpected answer (or none)."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _Parser:
    """httptools callbacks for one response at a time on a keep-alive connection."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.reset()

    def reset(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.done = False
        self.keep_alive = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        # llhttp answers should_keep_alive() only until the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        self.done = True


class Connection:
    """One keep-alive TLS connection; one request at a time."""

    def __init__(self, cfg: MixConfig, ctx: ssl.SSLContext, stats: MixResult) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.stats = stats
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.p = _Parser()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.cfg.host, self.cfg.port, ssl=self.ctx, server_hostname=self.cfg.server_name,
                                    limit=1 << 20),
            self.cfg.timeout)
        self.p = _Parser()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Response:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.cfg.server_name}"]
        if body or method != "GET":
            head.append(f"Content-Length: {len(body)}")
        head += [f"{k}: {v}" for k, v in headers.items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        self.writer.write(data + body if len(body) < 65536 else data)
        if len(body) >= 65536:
            self.writer.write(body)
        self.stats.bytes_out += len(data) + len(body)
        p = self.p
        p.reset()
        while not p.done:
            chunk = await asyncio.wait_for(self.reader.read(262144), self.cfg.timeout)
            if not chunk:
                raise MixError(f"{method} {path}: connection closed before the answer was complete")
            self.stats.bytes_in += len(chunk)
            p.parser.feed_data(chunk)
        status = p.parser.get_status_code()
        if not p.keep_alive:
            self.close()
        return Response(status, p.headers, b"".join(p.body))


class Mix:
    """The mix's operations and their bookkeeping for one run."""

    def __init__(self, cfg: MixConfig) -> None:
        self.cfg = cfg
        self.ctx = ssl.create_default_context(cafile=cfg.ca)
        if cfg.cert:
            self.ctx.load_cert_chain(cfg.cert, cfg.key)
        self.stats = MixResult(ops={o: 0 for o in OPS}, op_errors={o: 0 for o in OPS})
        self.latencies: list[float] = []
        self.op_latencies: dict[str, list[float]] = {o: [] for o in OPS}
        self.measuring = False
        self.smsid = ""
        self.site_code = ""
        self.policies: list[tuple[str, str]] = []  # (path, sha256 hex lower)
        self.upload_body = b""
        self.rng = random.Random(cfg.seed)
        self.mp_host = f"{cfg.server_name}{cfg.mp_prefix or ''}"
        self._ccm_turn = 0

    # --- one request, timed ---

    async def _timed(self, conn: Connection, method: str, path: str, headers: dict[str, str],
                     body: bytes = b"") -> Response:
        t0 = time.perf_counter()
        res = await conn.request(method, path, headers, body)
        if self.measuring:
            self.latencies.append((time.perf_counter() - t0) * 1000.0)
            self.stats.requests += 1
        else:
            self.stats.unmeasured += 1
        return res

    def _expect(self, res: Response, status: int, what: str) -> None:
        if res.status != status:
            text = res.body[:200].decode("utf-8", "replace").strip()
            raise MixError(f"{what}: HTTP {res.status} (expected {status}) {text}")

    # --- messages ---

    async def message(self, conn: Connection, endpoint: str, body_xml: str) -> Response:
        header = MessageHeader(id=new_message_id(), source_id=self.smsid, source_host=self.cfg.client_name,
                               target_endpoint=endpoint, target_host=self.mp_host)
        ctype, data = encode_message(Message(header, body_xml))
        headers = {"Content-Type": ctype, "User-Agent": USER_AGENT}
        if self.smsid:
            headers["CCMClientID"] = self.smsid
        res = await self._timed(conn, "CCM_POST", f"{self.cfg.mp_prefix}/ccm_system/request", headers, data)
        self._expect(res, 200, f"CCM_POST {endpoint}")
        return res

    async def setup(self, conn: Connection) -> None:
        """Registers the client and learns its policy locations (not measured)."""
        if self.cfg.mp_prefix is None:
            self.stats.setup = "content reads only (no management point)"
            return
        res = await self.message(conn, "MP_LocationManager", payloads.location_request("SiteInformationRequest"))
        info = parse_xml(decode_message(res.headers.get("content-type", ""), res.body).body).find("SiteInformation")
        self.site_code = info.get("SiteCode", "") if info is not None else ""
        res = await self.message(conn, "MP_ClientRegistration",
                                 payloads.registration_request(self.cfg.client_name, self.cfg.client_name))
        reply = parse_xml(decode_message(res.headers.get("content-type", ""), res.body).body)
        self.smsid = reply.get("SMSID", "")
        if not self.smsid.startswith("GUID:"):
            raise MixError(f"registration reply carries no SMSID ({reply.tag})")
        res = await self.message(conn, "MP_PolicyManager",
                                 payloads.request_assignments(self.smsid, self.cfg.client_name, self.site_code))
        reply = parse_xml(decode_message(res.headers.get("content-type", ""), res.body).body)
        for loc in reply.iter("PolicyLocation"):
            where = (loc.text or "").strip()
            if "/SMS_MP/" not in where:
                continue
            path = f"{self.cfg.mp_prefix}/SMS_MP/{where.split('/SMS_MP/', 1)[1]}"
            self.policies.append((path, where.rsplit(".SHA256:", 1)[-1].lower()))
        if not self.policies:
            raise MixError("the MP assigned no policies")
        chunks = []
        async for chunk in payloads.state_message_payload(self.cfg.client_name, self.smsid, self.cfg.upload_size):
            chunks.append(chunk)
        self.upload_body = b"".join(chunks)
        self.stats.setup = (f"registered {self.smsid} (site {self.site_code}), {len(self.policies)} policies, "
                            f"{len(self.upload_body)}-byte upload body")

    # --- the operations ---

    async def ccm_post(self, conn: Connection) -> None:
        self._ccm_turn += 1
        if self._ccm_turn % 2:
            await self.message(conn, "MP_PolicyManager",
                               payloads.request_assignments(self.smsid, self.cfg.client_name, self.site_code))
        else:
            await self.message(conn, "MP_LocationManager",
                               payloads.location_request("SiteInformationRequest", self.site_code))

    async def policy_get(self, conn: Connection) -> None:
        path, sha = self.policies[self.rng.randrange(len(self.policies))]
        res = await self._timed(conn, "GET", path, {"CCMClientID": self.smsid, "User-Agent": USER_AGENT})
        self._expect(res, 200, "policy GET")
        if hashlib.sha256(res.body).hexdigest() != sha:
            raise MixError(f"policy GET {path}: body SHA256 does not match the assignment")

    async def bits_upload(self, conn: Connection) -> None:
        name = "{" + str(uuid.UUID(int=self.rng.getrandbits(128), version=4)).upper() + "}"
        path = f"{self.cfg.mp_prefix}/CCM_Incoming/{name}"
        base = {"User-Agent": BITS_USER_AGENT, "CCMClientID": self.smsid}
        res = await self._timed(conn, "BITS_POST", path, {**base, "BITS-Packet-Type": "Create-Session",
                                                          "BITS-Supported-Protocols": BITS_PROTOCOL})
        self._expect(res, 200, "BITS Create-Session")
        sid = res.headers.get("bits-session-id", "")
        if not sid:
            raise MixError("BITS Create-Session answer carries no BITS-Session-Id")
        size = len(self.upload_body)
        res = await self._timed(conn, "BITS_POST", path, {
            **base, "BITS-Packet-Type": "Fragment", "BITS-Session-Id": sid,
            "Content-Range": f"bytes 0-{size - 1}/{size}"}, self.upload_body)
        self._expect(res, 200, "BITS Fragment")
        if res.headers.get("bits-received-content-range") != str(size):
            raise MixError(f"BITS Fragment acknowledged {res.headers.get('bits-received-content-range')}, sent {size}")
        res = await self._timed(conn, "BITS_POST", path, {**base, "BITS-Packet-Type": "Close-Session",
                                                          "BITS-Session-Id": sid})
        self._expect(res, 200, "BITS Close-Session")

    async def range_read(self, conn: Connection) -> None:
        n = min(self.cfg.range_size, self.cfg.content_size)
        start = self.rng.randrange(0, self.cfg.content_size - n + 1)
        res = await self._timed(conn, "GET", self.cfg.content_path,
                                {"Range": f"bytes={start}-{start + n - 1}", "User-Agent": BITS_USER_AGENT})
        self._expect(res, 206, "Range read")
        if len(res.body) != n or res.headers.get("content-range") != f"bytes {start}-{start + n - 1}/{self.cfg.content_size}":
            raise MixError(f"Range read {start}-{start + n - 1}: {len(res.body)} bytes, "
                           f"Content-Range {res.headers.get('content-range')}")

    # --- the run ---

    async def _worker(self, index: int, conn: Connection, deadline: float) -> None:
        schedule = SCHEDULE if self.cfg.mp_prefix is not None else CONTENT_ONLY
        turn = index  # connections start at different places in the schedule
        while time.monotonic() < deadline and self.stats.requests < self.cfg.max_requests:
            op = schedule[turn % len(schedule)]
            turn += 1
            t0 = time.perf_counter()
            try:
                await getattr(self, op)(conn)
            except (MixError, OSError, asyncio.TimeoutError, ssl.SSLError, httptools.HttpParserError,
                    ValueError) as exc:
                conn.close()  # a fresh connection for the next operation
                if not self.measuring:
                    await asyncio.sleep(0.01)
                    continue
                self.stats.errors += 1
                self.stats.op_errors[op] += 1
                if len(self.stats.error_samples) < 5:
                    self.stats.error_samples.append(f"{op}: {type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.01)
                continue
            if self.measuring:
                self.stats.ops[op] += 1
                self.op_latencies[op].append((time.perf_counter() - t0) * 1000.0)

    async def run(self) -> MixResult:
        cfg = self.cfg
        first = Connection(cfg, self.ctx, self.stats)
        try:
            await self.setup(first)
        finally:
            first.close()
        conns = [Connection(cfg, self.ctx, self.stats) for _ in range(cfg.connections)]
        try:
            # Connections up and a round of every operation before the clock starts.
            warm_deadline = time.monotonic() + min(0.5, cfg.seconds / 4)
            await asyncio.wait_for(asyncio.gather(*(self._worker(i, c, warm_deadline) for i, c in enumerate(conns))),
                                   cfg.seconds / 4 + cfg.timeout + 5)
            self.measuring = True
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            deadline = t0 + cfg.seconds
            await asyncio.wait_for(asyncio.gather(*(self._worker(i, c, deadline) for i, c in enumerate(conns))),
                                   cfg.seconds + cfg.timeout + 5)
            self.stats.seconds = time.monotonic() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            for c in conns:
                c.close()
        self.stats.cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        self.measuring = False
        # Requests of completed operations count as ok; those of failed operations as answered only.
        per_op = {"ccm_post": 1, "policy_get": 1, "bits_upload": 3, "range_read": 1}
        self.stats.ok = sum(per_op[o] * n for o, n in self.stats.ops.items())
        if self.latencies:
            self.stats.p50_ms = percentile(self.latencies, 50)
            self.stats.p99_ms = percentile(self.latencies, 99)
            self.stats.p999_ms = percentile(self.latencies, 99.9)
        self.stats.op_p50_ms = {o: round(percentile(v, 50), 3) for o, v in self.op_latencies.items() if v}
        return self.stats


def run_mix(cfg: MixConfig) -> MixResult:
    """Runs the mix in a fresh event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(Mix(cfg).run())
    return uvloop.run(Mix(cfg).run())


def result_json(res: MixResult) -> dict[str, Any]:
    out = asdict(res)
    out["rps"] = res.rps
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.mix CONFIG_JSON", file=sys.stderr)
        return 2
    cfg = MixConfig(**json.loads(args[0]))
    try:
        res = run_mix(cfg)
    except (MixError, OSError, asyncio.TimeoutError, ssl.SSLError, ValueError) as exc:
        print(f"bench.mix: set-up failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("MIXJSON " + json.dumps(result_json(res)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
