"""``cmg soak``: a bounded soak of a whole deployment under injected faults.

Starts a stack through the one launcher (:class:`cmg.launcher.Stack`: 2 gateway
instances, 2 connection points, ephemeral ports), runs simulated internet clients with
all three authentication methods (pki, entra, token) for ``--minutes``, injects faults
on a seeded schedule, then reconciles what the clients saw with what the mock MP
recorded, prints a summary and (``--json``) writes it.

Traffic, per client, in a loop until the deadline: full client cycles
(:meth:`InternetClient.run_cycle`), and between them ``CCM_POST`` messages with an id the
soak chooses, BITS uploads with a unique job name, a random size (up to 32 MiB) and a
SHA-256 known before the first byte is sent, and ranged content downloads whose bytes
are checked against the DP's generator.

Faults, one at a time, each followed by a wait until the stack is whole again and a
pause: ``kill -9`` / ``SIGTERM`` of a connection point, ``kill -9`` / ``SIGTERM`` of a
gateway instance (the launcher's supervisor restarts each), and an MP stall
(``SIGSTOP`` of the mock site for a few seconds, then ``SIGCONT``).

Reconciliation (the MP's own records: ``/_mock/uploads`` and its logs
``MP_Relay.log`` / ``CcmIsapi.log``):

- **duplicated**: an upload job committed more than once, or a message id the MP
  processed more than once (any job or message, the cycles' included);
- **lost**: an upload or message the client saw succeed that the MP has no record of
  (or, for an upload, whose size or SHA-256 differ at the MP);
- **truncated-complete**: an upload the MP marked complete whose size or SHA-256 differ
  from what the client meant to send (whatever the client saw);
- **corrupt downloads**: a 206 whose bytes differ from the DP's.

The exit code is 0 only when all four are 0; requests that fail while a fault is in
progress are expected, counted and reported by reason.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import hashlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

MiB = 1024 * 1024
_PATTERN = MiB + 4099  # upload bytes repeat with this period: no fragment size divides it
_UPLOAD_CHUNK = 256 * 1024
FAULT_KINDS = ("connector-kill", "connector-term", "gateway-kill", "gateway-term", "mp-stall", "connector-rolling")
CONTENT_ID = "PS100042.1"
_MSG_LINE = re.compile(r"Message (\{[0-9A-Fa-f-]+\}) ")
_COMMIT_LINE = re.compile(r"BITS session (\{[0-9A-Fa-f-]+\}) closed: (\S+) committed, (\d+) bytes, SHA256 ([0-9A-Fa-f]+)")


# --- what the clients did ------------------------------------------------------------------


@dataclass
class UploadJob:
    job: str
    client: str
    auth: str
    size: int
    sha256: str
    fragment_size: int
    started: float
    outcome: str = "unfinished"  # ok | failed | unfinished
    reason: str = ""


@dataclass
class MessageSent:
    id: str
    client: str
    auth: str
    endpoint: str
    started: float
    outcome: str = "unfinished"
    reason: str = ""


@dataclass
class Fault:
    n: int
    kind: str
    target: str
    at: float  # seconds since the soak started
    wall: str
    detail: str = ""
    old_pid: int = 0
    new_pid: int = 0
    recovered_after: float | None = None  # seconds until the stack was whole again
    first_success_after: float | None = None  # seconds until an operation started after it succeeded
    failures: dict[str, int] = field(default_factory=dict)  # failures from it until the next fault, by reason


class Stats:
    """Counters, touched only from the event loop's thread."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.sent: collections.Counter[str] = collections.Counter()
        self.ok: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()
        self.reasons_by_op: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.failure_times: list[tuple[float, str, str]] = []
        self.unfinished: collections.Counter[str] = collections.Counter()
        self.uploads: list[UploadJob] = []
        self.messages: list[MessageSent] = []
        self.corrupt_downloads: list[dict[str, Any]] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.faults: list[Fault] = []
        self.last_success = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def success(self, op: str, started: float) -> None:
        self.sent[op] += 1
        self.ok[op] += 1
        self.last_success = self.now()
        for f in self.faults:
            if f.first_success_after is None and started >= f.at:
                f.first_success_after = round(self.now() - f.at, 3)

    def failure(self, op: str, reason: str) -> None:
        self.sent[op] += 1
        self.failed[op] += 1
        self.reasons[reason] += 1
        self.reasons_by_op[op][reason] += 1
        self.failure_times.append((self.now(), op, reason))

    def attribute(self) -> collections.Counter[str]:
        """Each failure to the last fault injected before it ends; the rest: before any fault."""
        before: collections.Counter[str] = collections.Counter()
        counters = [collections.Counter() for _ in self.faults]  # type: ignore[var-annotated]
        for t, op, reason in self.failure_times:
            index = -1
            for i, f in enumerate(self.faults):
                if f.at <= t:
                    index = i
            (counters[index] if index >= 0 else before)[f"{op}: {reason}"] += 1
        for f, c in zip(self.faults, counters):
            f.failures = dict(c.most_common())
        return before


def reason_of(exc: BaseException) -> str:
    """``status name`` for an HTTP answer, else the exception's class."""
    from clientsim.client import CMGError, StepFailure

    if isinstance(exc, CMGError):
        name = exc.reason or exc.body.decode("utf-8", "replace").strip()[:60]
        bits = exc.headers.get("BITS-Error-Code")
        return f"{exc.status} {name}" + (f" (BITS {bits})" if bits else "")
    if isinstance(exc, StepFailure):
        return f"{exc.status} bad answer: {exc.detail[:80]}"
    if isinstance(exc, asyncio.TimeoutError):
        return "TimeoutError"
    return type(exc).__name__


def reason_of_step(status: int, detail: str) -> str:
    head = detail.split(":", 1)[0].strip()
    if status and head.startswith(str(status)):
        return head[:100]
    if status:
        return f"{status} {head[:80]}"
    return head[:100]


# --- upload payloads --------------------------------------------------------------------


class Payloads:
    """Upload bodies: a seeded random pattern read cyclically from a per-job offset, so
    the SHA-256 is known before sending and nothing is held whole in memory."""

    def __init__(self, seed: int) -> None:
        block = random.Random(seed ^ 0x50414B).randbytes(_PATTERN)
        self.block2 = block + block

    def chunks(self, offset: int, size: int) -> Iterator[memoryview]:
        view = memoryview(self.block2)
        pos = 0
        while pos < size:
            n = min(_UPLOAD_CHUNK, size - pos)
            i = (offset + pos) % _PATTERN
            yield view[i:i + n]
            pos += n

    def sha256(self, offset: int, size: int) -> str:
        h = hashlib.sha256()
        for c in self.chunks(offset, size):
            h.update(c)
        return h.hexdigest()

    async def source(self, offset: int, size: int) -> AsyncIterator[bytes]:
        for c in self.chunks(offset, size):
            yield bytes(c)
            await asyncio.sleep(0)


def upload_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.60:
        return rng.randint(1, 512 * 1024)
    if r < 0.90:
        return rng.randint(512 * 1024, 4 * MiB)
    return rng.randint(4 * MiB, 32 * MiB)


# --- watching the processes ------------------------------------------------------------


class Monitor:
    """A thread that samples every process's RSS (peak per component, across restarts)
    and follows the connection points' CONNECTED/DISCONNECTED lines, so the soak knows
    when the stack is whole: every process up and every connection point connected to
    every instance."""

    def __init__(self, stack: Any, interval: float = 0.25) -> None:
        import psutil

        self._psutil = psutil
        self.stack = stack
        self.interval = interval
        self.instances = int(stack.deployment.get("instances", 1))
        self.peak: dict[str, int] = {}
        self.pids: dict[str, set[int]] = collections.defaultdict(set)
        self._procs: dict[int, Any] = {}
        self._seen_pid: dict[str, int] = {p.name: p.pid for p in stack.processes}
        self.connected: dict[str, set[int]] = {p.name: set(range(self.instances))
                                               for p in stack.processes if p.kind == "connector"}
        self.events: list[tuple[float, str, str]] = []
        self.stalled = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="soak-monitor", daemon=True)
        self.t0 = time.monotonic()

    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        me = self._psutil.Process()
        while not self._stop.wait(self.interval):
            self._sample("soak (clients)", me)
            for p in list(self.stack.processes):
                pid = p.pid
                if pid and p.alive():
                    proc = self._procs.get(pid)
                    if proc is None:
                        try:
                            proc = self._procs[pid] = self._psutil.Process(pid)
                        except self._psutil.Error:
                            proc = None
                    if proc is not None:
                        self.pids[p.name].add(pid)
                        self._sample(p.name, proc)
                self._follow(p)

    def _sample(self, name: str, proc: Any) -> None:
        try:
            rss = int(proc.memory_info().rss)
        except self._psutil.Error:
            return
        if rss > self.peak.get(name, 0):
            self.peak[name] = rss

    def _follow(self, p: Any) -> None:
        with self._lock:
            if self._seen_pid.get(p.name) != p.pid:
                self._seen_pid[p.name] = p.pid
                self.events.append((time.monotonic() - self.t0, p.name, f"new process {p.pid}"))
                if p.name in self.connected:
                    self.connected[p.name] = set()
            lines = p.lines
            while True:
                try:
                    line = lines.get_nowait()
                except Exception:  # queue.Empty
                    break
                if line is None:
                    continue
                kind, _, rest = line.partition(" ")
                if p.name in self.connected and kind in ("CONNECTED", "DISCONNECTED"):
                    try:
                        instance = int(json.loads(rest)["instance"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    if kind == "CONNECTED":
                        self.connected[p.name].add(instance)
                    else:
                        self.connected[p.name].discard(instance)
                    self.events.append((time.monotonic() - self.t0, p.name, line))

    def whole(self) -> bool:
        if self.stalled:
            return False
        with self._lock:
            for p in self.stack.processes:
                if not p.alive() or self._seen_pid.get(p.name) != p.pid:
                    return False
            return all(len(s) == self.instances for s in self.connected.values())


# --- the soak ---------------------------------------------------------------------------


@dataclass
class Options:
    minutes: float
    clients: int = 12
    dir: Path | None = None
    seed: int = 0
    json_path: Path | None = None
    fault_pause: tuple[float, float] | None = None  # seconds between faults (default: by duration)
    quiet: bool = False
    keep_uploads: bool = False


class Soak:
    def __init__(self, opts: Options, stack: Any) -> None:
        self.opts = opts
        self.stack = stack
        d = stack.deployment
        self.d = d
        self.base = stack.dir
        self.rng = random.Random(opts.seed)
        self.payloads = Payloads(opts.seed)
        self.duration = opts.minutes * 60.0
        self.t0 = time.monotonic()
        self.stats = Stats(self.t0)
        self.deadline = self.t0 + self.duration
        self.stop_event = asyncio.Event()
        self.monitor = Monitor(stack)
        self.mp = next(r for r in d["roles"] if r["kind"] == "MP")
        self.dp = next(r for r in d["roles"] if r["kind"] == "DP")
        self._bulk_token: str | None = None
        self.log_lines: list[str] = []

    # --- output ---

    def say(self, text: str) -> None:
        line = f"[{self.stats.now():7.1f}s] {text}"
        self.log_lines.append(line)
        if not self.opts.quiet:
            print(line, flush=True)

    # --- clients ---

    def _path(self, key: str) -> Path:
        v = Path(self.d[key])
        return v if v.is_absolute() else self.base / v

    def bulk_token(self) -> str:
        if self._bulk_token is None:
            from . import config as cfg
            from .site_tokens import new_bulk_token

            deployment = cfg.load(self._path("config"), base_dir=self.base)
            self._bulk_token = new_bulk_token(deployment.site, None)
        return self._bulk_token

    def make_client(self, auth: str, name: str) -> Any:
        """An InternetClient built as ``cmg client`` builds it from deployment.json."""
        from clientsim.client import EntraSettings, InternetClient

        host, _, port = self.d["listen"].rpartition(":")
        extra: dict[str, Any] = {"auth": auth}
        if auth == "entra":
            e = self.d["entra"]
            extra["entra"] = EntraSettings(e["authority"], e["tenant_id"], e["client_app_id"], e["server_app_id_uri"])
        elif auth == "token":
            extra["bulk_token"] = self.bulk_token()
        pki = auth == "pki"
        return InternetClient(
            self.d["service_name"], (host, int(port)), int(self.mp["role_id"]), self._path("ca_cert"),
            self._path("client_cert") if pki else None, self._path("client_key") if pki else None,
            client_name=name, timeout=60, upload_size=64 * 1024, **extra,
        )

    def auth_methods(self) -> list[str]:
        methods = ["pki", "entra", "token"]
        if not self.d.get("entra", {}).get("enabled", True):
            methods.remove("entra")
        return methods

    async def client_loop(self, index: int, auth: str) -> None:
        rng = random.Random(f"{self.opts.seed}/{index}")
        name = f"SOAK{index:03d}{auth.upper()}"
        client = self.make_client(auth, name)
        try:
            await asyncio.sleep(rng.uniform(0, 1.5))
            while not self._done():
                ready = client.smsid is not None and (auth == "pki" or client.access_token)
                r = rng.random()
                if not ready or r < 0.12:
                    await self.cycle(client)
                elif r < 0.55:
                    await self.message(client, rng)
                elif r < 0.80:
                    await self.upload(client, rng)
                else:
                    await self.download(client, rng)
        finally:
            await client.close()

    def _done(self) -> bool:
        return self.stop_event.is_set() or time.monotonic() >= self.deadline

    async def cycle(self, client: Any) -> None:
        started = self.stats.now()
        result = await client.run_cycle()
        for step in result.steps:
            if step.detail.startswith("skipped:"):
                continue
            op = "cycle:" + step.name.split(" (")[0]
            if step.ok:
                self.stats.success(op, started)
            else:
                self.stats.failure(op, reason_of_step(step.status, step.detail))

    async def message(self, client: Any, rng: random.Random) -> None:
        from clientsim import payloads
        from clientsim.client import CMGError, StepFailure
        from cmg.messaging import Message, MessageHeader, decode_message, encode_message, new_message_id

        if rng.random() < 0.6:
            endpoint, body = "MP_LocationManager", payloads.location_request("SiteInformationRequest")
        else:
            endpoint, body = "MP_PolicyManager", payloads.request_assignments(
                client.smsid, client.client_name, self.d.get("site_code", ""))
        mid = new_message_id()
        rec = MessageSent(mid, client.client_name, client.auth, endpoint, self.stats.now())
        self.stats.messages.append(rec)
        header = MessageHeader(id=mid, source_id=client.smsid or "", source_host=client.client_name,
                               target_endpoint=endpoint, target_host=client.mp_url.split("://", 1)[-1])
        ctype, data = encode_message(Message(header, body))
        try:
            res = await client.request("CCM_POST", f"{client.mp_url}/{client.messaging_path}", data=data,
                                       headers={"Content-Type": ctype, "CCMClientID": client.smsid})
            if res.status != 200:
                raise CMGError(res.status, res.reason, res.body, res.headers)
            reply = decode_message(res.headers.get("Content-Type", ""), res.body)
            if reply.header.correlation_id.upper() != mid.upper():
                raise StepFailure(res.status, f"reply correlates to {reply.header.correlation_id}, not {mid}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is counted by reason
            rec.outcome, rec.reason = "failed", reason_of(exc)
            self.stats.failure("message", rec.reason)
            return
        rec.outcome = "ok"
        self.stats.success("message", rec.started)

    async def upload(self, client: Any, rng: random.Random) -> None:
        size = upload_size(rng)
        offset = rng.randrange(_PATTERN)
        fragment = rng.choice((64 * 1024, 256 * 1024, 1 * MiB, 4 * MiB))
        sha = await asyncio.to_thread(self.payloads.sha256, offset, size)
        job = "{" + str(uuid.UUID(int=rng.getrandbits(128), version=4)).upper() + "}"
        rec = UploadJob(job, client.client_name, client.auth, size, sha, fragment, self.stats.now())
        self.stats.uploads.append(rec)
        try:
            result = await client.bits_upload(job, self.payloads.source(offset, size), fragment, size=size)
            if result.sha256 != sha or result.size != size:
                raise RuntimeError(f"client sent {result.size} bytes SHA256 {result.sha256}, meant {size} {sha}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            rec.outcome, rec.reason = "failed", reason_of(exc)
            self.stats.failure("upload", rec.reason)
            return
        rec.outcome = "ok"
        self.stats.bytes_up += size
        self.stats.success("upload", rec.started)

    async def download(self, client: Any, rng: random.Random) -> None:
        from clientsim.client import CMGError
        from mock_site.content import content_sha256

        size = rng.choice((64 * 1024, 1 * MiB, 4 * MiB, 16 * MiB))
        file = f"payload-{size}.bin"
        first = rng.randrange(size)
        last = min(size - 1, first + rng.randint(0, min(size, 8 * MiB)))
        started = self.stats.now()
        url = f"{client.role_url(int(self.dp['role_id']))}/SMS_DP_SMSPKG$/{CONTENT_ID}/{file}"
        hasher = hashlib.sha256()
        try:
            status, got, _ = await client._download_url(url, (first, last), hasher)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.stats.failure("download", reason_of(exc))
            return
        expected = await asyncio.to_thread(content_sha256, CONTENT_ID, file, first, last + 1)
        if status != 206 or got != last - first + 1 or hasher.hexdigest() != expected:
            self.stats.corrupt_downloads.append({"file": file, "range": [first, last], "status": status,
                                                 "got": got, "client": client.client_name})
            self.stats.failure("download", f"{status} wrong bytes")
            return
        self.stats.bytes_down += got
        self.stats.success("download", started)

    # --- faults ---

    def _fault_pause(self) -> tuple[float, float]:
        if self.opts.fault_pause:
            return self.opts.fault_pause
        if self.duration < 120:
            return (3.0, 6.0)
        return (15.0, 30.0)

    async def faults(self) -> None:
        first = min(20.0, max(5.0, self.duration * 0.2))
        await self._sleep(first)
        queue: list[str] = []
        n = 0
        while not self._done():
            if time.monotonic() + min(15.0, self.duration * 0.3) > self.deadline:
                break  # too late to see it recover under traffic
            if not queue:
                queue = list(FAULT_KINDS)
                self.rng.shuffle(queue)
            kind = queue.pop()
            n += 1
            await self.inject(n, kind)
            if self._done():
                break
            await self._sleep(self.rng.uniform(*self._fault_pause()))

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop_event.wait(), max(0.0, min(seconds, self.deadline - time.monotonic())))
        except asyncio.TimeoutError:
            pass

    async def inject(self, n: int, kind: str) -> None:
        what, _, how = kind.partition("-")
        if what == "mp":
            target = self.stack.process("mock_site")
        else:
            target = self.rng.choice([p for p in self.stack.processes if p.kind == what])
        f = Fault(n, kind, target.name, round(self.stats.now(), 3),
                  _dt.datetime.now().astimezone().isoformat(timespec="seconds"), old_pid=target.pid)
        self.stats.faults.append(f)
        if kind == "connector-rolling":
            await self.rolling(f)
            return
        if kind == "mp-stall":
            stall = round(self.rng.uniform(3.0, 8.0), 1)
            f.detail = f"SIGSTOP pid {target.pid} for {stall} s, then SIGCONT"
            self.say(f"fault {n}: {kind} {target.name} ({f.detail})")
            self.monitor.stalled = True
            try:
                os.kill(target.pid, signal.SIGSTOP)
                await asyncio.sleep(stall)
            finally:
                os.kill(target.pid, signal.SIGCONT)
                self.monitor.stalled = False
        else:
            sig = signal.SIGKILL if how == "kill" else signal.SIGTERM
            f.detail = f"{sig.name} pid {target.pid}"
            self.say(f"fault {n}: {kind} {target.name} ({f.detail})")
            try:
                os.kill(target.pid, sig)
            except ProcessLookupError:
                f.detail += " (already gone)"
        # Wait until the stack is whole again (bounded), then note how long it took.
        limit = time.monotonic() + 120.0
        while time.monotonic() < limit and not self.stop_event.is_set():
            if (kind == "mp-stall" or target.pid != f.old_pid) and self.monitor.whole():
                f.recovered_after = round(self.stats.now() - f.at, 3)
                break
            await asyncio.sleep(0.2)
        f.new_pid = target.pid
        if f.recovered_after is None:
            self.say(f"fault {n}: {target.name} NOT whole again after 120 s (pid {target.pid}, alive {target.alive()})")
        else:
            self.say(f"fault {n}: whole again after {f.recovered_after:.1f} s"
                     + (f" (new pid {f.new_pid}, restarts {target.restarts})" if f.new_pid != f.old_pid else ""))

    async def rolling(self, f: Fault) -> None:
        """SIGTERM each connection point in turn, the next once the stack is whole again."""
        connectors = [p for p in self.stack.processes if p.kind == "connector"]
        f.target = "+".join(p.name for p in connectors)
        f.detail = "SIGTERM " + ", then ".join(f"{p.name} (pid {p.pid})" for p in connectors)
        self.say(f"fault {f.n}: connector-rolling ({f.detail})")
        whole = True
        for p in connectors:
            old = p.pid
            try:
                os.kill(old, signal.SIGTERM)
            except ProcessLookupError:
                pass
            limit = time.monotonic() + 120.0
            while not (p.pid != old and self.monitor.whole()):
                if time.monotonic() > limit or self.stop_event.is_set():
                    whole = False
                    break
                await asyncio.sleep(0.2)
            if not whole:
                break
        if whole:
            f.recovered_after = round(self.stats.now() - f.at, 3)
            self.say(f"fault {f.n}: both connection points restarted, whole again after {f.recovered_after:.1f} s")
        else:
            self.say(f"fault {f.n}: rolling restart NOT whole again after 120 s")

    # --- running ---

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        installed = False
        if threading.current_thread() is threading.main_thread():
            def interrupted() -> None:
                self.say("interrupted: stopping traffic, then reconciling (Ctrl-C again to abort)")
                self.stop_event.set()
                loop.remove_signal_handler(signal.SIGINT)
            try:
                loop.add_signal_handler(signal.SIGINT, interrupted)
                installed = True
            except (NotImplementedError, RuntimeError):
                pass
        self.monitor.start()
        methods = self.auth_methods()
        self.say(f"soak: {self.opts.clients} clients ({', '.join(methods)}), {self.opts.minutes:g} min, seed {self.opts.seed}, "
                 f"stack in {self.base}")
        clients = [asyncio.ensure_future(self.client_loop(i, methods[i % len(methods)]))
                   for i in range(self.opts.clients)]
        faults = asyncio.ensure_future(self.faults())
        try:
            # Clients stop starting work at the deadline; in-flight work gets a grace period.
            await self._sleep(self.duration)
            self.say("deadline: no new requests; waiting for in-flight ones")
            done, pending = await asyncio.wait(clients + [faults], timeout=120)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    self.say(f"a soak task failed: {t.exception()!r}")
            for u in self.stats.uploads:
                if u.outcome == "unfinished":
                    self.stats.unfinished["upload"] += 1
            for m in self.stats.messages:
                if m.outcome == "unfinished":
                    self.stats.unfinished["message"] += 1
            # Let the last fault's recovery finish before reading the MP's records.
            limit = time.monotonic() + 60
            while time.monotonic() < limit and not self.monitor.whole():
                await asyncio.sleep(0.5)
            traffic_s = self.stats.now()
            reconciliation = await self.reconcile()
        finally:
            if installed:
                try:
                    loop.remove_signal_handler(signal.SIGINT)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            self.monitor.stop()
        return self.report(traffic_s, reconciliation)

    # --- the MP's records ---

    async def reconcile(self) -> dict[str, Any]:
        import aiohttp

        internal = self.mp["internal_url"].rstrip("/")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async with s.get(f"{internal}/_mock/uploads") as r:
                records = await r.json()
            async with s.get(f"{internal}/_mock/health") as r:
                health = await r.json()
        logs = self.base / self.d.get("logs_dir", "logs")
        # One commit line per job the MP committed; one message line per message handled
        # (the "replied" ones are kept as evidence).
        commits, commit_lines = _scan_log(logs / "MP_Relay.log", _COMMIT_LINE, lambda m: m.group(2))
        seen, msg_lines = _scan_log(logs / "CcmIsapi.log", _MSG_LINE, lambda m: m.group(1).upper(),
                                    keep=lambda line: "replied" in line)
        by_name = {r["name"]: r for r in records if r.get("complete")}
        duplicated = [{"kind": "upload", "id": n, "times": c, "log": commit_lines[n][:3]}
                      for n, c in commits.items() if c > 1]
        duplicated += [{"kind": "message", "id": m, "times": c} for m, c in seen.items() if c > 1]
        lost: list[dict[str, Any]] = []
        truncated: list[dict[str, Any]] = []
        completed_despite_failure = 0
        for u in self.stats.uploads:
            rec = by_name.get(u.job)
            if rec is not None and (rec["size"] != u.size or rec["sha256"].lower() != u.sha256):
                truncated.append({"job": u.job, "sent_size": u.size, "sent_sha256": u.sha256, "mp_size": rec["size"],
                                  "mp_sha256": rec["sha256"], "client_outcome": u.outcome, "reason": u.reason})
            if u.outcome == "ok" and (rec is None or rec["size"] != u.size or rec["sha256"].lower() != u.sha256):
                lost.append({"kind": "upload", "id": u.job, "size": u.size, "mp": rec})
            if u.outcome != "ok" and rec is not None:
                completed_despite_failure += 1
        replied = 0
        for sent in self.stats.messages:
            if sent.outcome == "ok":
                if not msg_lines.get(sent.id.upper()):
                    lost.append({"kind": "message", "id": sent.id, "endpoint": sent.endpoint})
                else:
                    replied += 1
        return {
            "duplicated": len(duplicated),
            "lost": len(lost),
            "truncated_complete": len(truncated),
            "corrupt_downloads": len(self.stats.corrupt_downloads),
            "duplicated_items": duplicated[:50],
            "lost_items": lost[:50],
            "truncated_items": truncated[:50],
            "corrupt_download_items": self.stats.corrupt_downloads[:50],
            "uploads_tracked": len(self.stats.uploads),
            "uploads_client_ok": sum(1 for u in self.stats.uploads if u.outcome == "ok"),
            "uploads_complete_at_mp": sum(1 for u in self.stats.uploads if u.job in by_name),
            "uploads_complete_at_mp_though_client_failed": completed_despite_failure,
            "messages_tracked": len(self.stats.messages),
            "messages_client_ok": sum(1 for m in self.stats.messages if m.outcome == "ok"),
            "messages_client_ok_found_at_mp": replied,
            "mp_messages_logged": sum(seen.values()),
            "mp_uploads_committed": sum(commits.values()),
            "mp_open_upload_sessions": health.get("upload_sessions"),
        }

    def report(self, traffic_s: float, rec: dict[str, Any]) -> dict[str, Any]:
        s = self.stats
        ops = sorted(set(s.sent) | set(s.unfinished))
        before = s.attribute()
        restarts = {p.name: p.restarts for p in self.stack.processes}
        ok = rec["duplicated"] == rec["lost"] == rec["truncated_complete"] == rec["corrupt_downloads"] == 0
        return {
            "command": "cmg soak " + " ".join(self._argv_echo()),
            "seed": self.opts.seed,
            "minutes": self.opts.minutes,
            "clients": self.opts.clients,
            "auth_methods": self.auth_methods(),
            "dir": str(self.base),
            "elapsed_s": round(traffic_s, 1),
            "requests": {
                "sent": sum(s.sent.values()),
                "succeeded": sum(s.ok.values()),
                "failed": sum(s.failed.values()),
                "unfinished_at_end": sum(s.unfinished.values()),
                "by_operation": {op: {"sent": s.sent[op], "succeeded": s.ok[op], "failed": s.failed[op],
                                      "unfinished": s.unfinished[op]} for op in ops},
                "bytes_uploaded_ok": s.bytes_up,
                "bytes_downloaded_ok": s.bytes_down,
            },
            "failed_by_reason": dict(s.reasons.most_common()),
            "failed_by_operation_and_reason": {op: dict(c.most_common()) for op, c in sorted(s.reasons_by_op.items())},
            "faults": [asdict(f) for f in s.faults],
            "failures_before_any_fault": dict(before.most_common()),
            "faults_recovered": sum(1 for f in s.faults if f.recovered_after is not None),
            "faults_with_success_after": sum(1 for f in s.faults if f.first_success_after is not None),
            "reconciliation": rec,
            "duplicated": rec["duplicated"],
            "lost": rec["lost"],
            "truncated_complete": rec["truncated_complete"],
            "corrupt_downloads": rec["corrupt_downloads"],
            "peak_rss_mib": {n: round(v / MiB, 1) for n, v in sorted(self.monitor.peak.items())},
            "pids": {n: sorted(v) for n, v in sorted(self.monitor.pids.items())},
            "restarts": restarts,
            "ok": ok,
        }

    def _argv_echo(self) -> list[str]:
        o = self.opts
        out = ["--minutes", f"{o.minutes:g}", "--clients", str(o.clients), "--seed", str(o.seed)]
        return out


def format_report(r: dict[str, Any]) -> str:
    lines: list[str] = []
    req = r["requests"]
    lines.append("")
    lines.append(f"CMG soak: {r['minutes']:g} min, {r['clients']} clients ({', '.join(r['auth_methods'])}), "
                 f"seed {r['seed']}, {r['elapsed_s']} s")
    lines.append("")
    lines.append(f"{'operation':<24}{'sent':>8}{'ok':>8}{'failed':>8}{'unfinished':>12}")
    for op, c in req["by_operation"].items():
        lines.append(f"{op:<24}{c['sent']:>8}{c['succeeded']:>8}{c['failed']:>8}{c['unfinished']:>12}")
    lines.append(f"{'total':<24}{req['sent']:>8}{req['succeeded']:>8}{req['failed']:>8}{req['unfinished_at_end']:>12}")
    lines.append(f"uploaded {req['bytes_uploaded_ok'] / MiB:.1f} MiB in completed uploads, "
                 f"downloaded {req['bytes_downloaded_ok'] / MiB:.1f} MiB in verified ranges")
    lines.append("")
    lines.append("failed by reason:")
    if not r["failed_by_reason"]:
        lines.append("  (none)")
    for op, reasons in r["failed_by_operation_and_reason"].items():
        for reason, n in reasons.items():
            lines.append(f"  {n:>6}  {op:<22} {reason}")
    lines.append("")
    lines.append(f"{'#':>3} {'t (s)':>8}  {'fault':<19}{'target':<36}{'whole after':>12}{'1st ok after':>14}  detail")
    for f in r["faults"]:
        rec = f"{f['recovered_after']:.1f} s" if f["recovered_after"] is not None else "NEVER"
        first = f"{f['first_success_after']:.1f} s" if f["first_success_after"] is not None else "-"
        lines.append(f"{f['n']:>3} {f['at']:>8.1f}  {f['kind']:<19}{f['target']:<36}{rec:>12}{first:>14}  {f['detail']}")
    if not r["faults"]:
        lines.append("  (no fault injected)")
    lines.append("")
    lines.append("failures by the fault they followed:")
    if r["failures_before_any_fault"]:
        lines.append(f"  before any fault: {_counts(r['failures_before_any_fault'])}")
    for f in r["faults"]:
        lines.append(f"  {f['n']:>3} {f['kind']:<18}{_counts(f['failures']) if f['failures'] else 'none'}")
    lines.append("")
    rc = r["reconciliation"]
    lines.append("reconciliation with the MP's records:")
    lines.append(f"  uploads: {rc['uploads_tracked']} started, {rc['uploads_client_ok']} ok at the client, "
                 f"{rc['uploads_complete_at_mp']} complete at the MP "
                 f"({rc['uploads_complete_at_mp_though_client_failed']} of them the client saw fail); "
                 f"{rc['mp_open_upload_sessions']} BITS sessions left open at the MP")
    lines.append(f"  messages: {rc['messages_tracked']} sent, {rc['messages_client_ok']} ok at the client, "
                 f"{rc['messages_client_ok_found_at_mp']} of those found in CcmIsapi.log "
                 f"({rc['mp_messages_logged']} message lines in all)")
    lines.append(f"  duplicated          {r['duplicated']}")
    lines.append(f"  lost                {r['lost']}")
    lines.append(f"  truncated-complete  {r['truncated_complete']}")
    lines.append(f"  corrupt downloads   {r['corrupt_downloads']}")
    lines.append("")
    lines.append(f"{'process':<22}{'peak RSS (MiB)':>16}{'restarts':>10}  pids")
    for name, mib in r["peak_rss_mib"].items():
        restarts = r["restarts"].get(name, "")
        pids = ",".join(str(p) for p in r["pids"].get(name, []))
        lines.append(f"{name:<22}{mib:>16.1f}{restarts!s:>10}  {pids}")
    lines.append("")
    lines.append("PASS: nothing duplicated, lost or truncated" if r["ok"]
                 else "FAIL: duplicated, lost, truncated or corrupt data (see above and the JSON)")
    return "\n".join(lines)


def _counts(c: dict[str, int]) -> str:
    return "; ".join(f"{n} x {k}" for k, n in c.items())


def parse_args(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(prog="cmg soak", description="Bounded soak of a whole CMG deployment with injected faults.")
    ap.add_argument("--minutes", type=float, required=True, help="how long the clients run (e.g. 10, or 0.5)")
    ap.add_argument("--clients", type=int, default=12, help="simulated internet clients (default 12)")
    ap.add_argument("--dir", type=Path, default=None, help="the stack's directory (default: a new temporary one)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the traffic and the fault schedule (default: random, printed)")
    ap.add_argument("--json", type=Path, default=None, dest="json_path", help="write the figures here as JSON")
    ap.add_argument("--fault-pause", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="seconds between faults (default 15 30; 3 6 under two minutes)")
    ap.add_argument("--quiet", action="store_true", help="only the summary")
    ap.add_argument("--keep-uploads", action="store_true",
                    help="keep the bytes the MP received (a 10-minute soak uploads ~16 GB; by default they are "
                         "deleted once reconciled; the MP's records and every log are kept)")
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.minutes > 24 * 60:
        ap.error("--minutes must be in (0, 1440]")
    if a.clients < 1 or a.clients > 500:
        ap.error("--clients must be in 1..500")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    return Options(a.minutes, a.clients, a.dir, seed, a.json_path,
                   tuple(a.fault_pause) if a.fault_pause else None, a.quiet, a.keep_uploads)  # type: ignore[arg-type]


def _scan_log(path: Path, pattern: re.Pattern[str], key: Callable[[re.Match[str]], str],
              keep: Callable[[str], bool] = lambda line: True,
              ) -> tuple[collections.Counter[str], dict[str, list[str]]]:
    """How often each key occurs in the log's matching lines, and those lines (``keep``)."""
    counts: collections.Counter[str] = collections.Counter()
    lines: dict[str, list[str]] = collections.defaultdict(list)
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            m = pattern.search(line)
            if m:
                k = key(m)
                counts[k] += 1
                if keep(line):
                    lines[k].append(line)
    return counts, lines


def drop_uploaded_bytes(directory: Path) -> int:
    """Delete the upload payloads the mock MP stored (their size and SHA-256 are in its
    records, which the reconciliation has read): long soaks would fill the disk. Returns
    the bytes freed; the records (``*.json``) and the logs stay."""
    freed = 0
    incoming = directory / "data" / "incoming"
    if not incoming.is_dir():
        return 0
    for path in incoming.iterdir():
        if path.is_file() and path.suffix != ".json":
            try:
                freed += path.stat().st_size
                path.unlink()
            except OSError:
                pass
    return freed


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    from .launcher import LaunchError, Stack

    directory = opts.dir or Path(tempfile.mkdtemp(prefix="cmg-soak-"))
    directory.mkdir(parents=True, exist_ok=True)
    # Big logs: the reconciliation reads the MP's logs, which must not roll over meanwhile.
    stack = Stack(directory, port=0, instances=2, connectors=2,
                  overrides={"logging": {"max_size": 2**31}})
    print(f"cmg soak: starting a stack in {directory} (2 instances, 2 connection points)", flush=True)
    report: dict[str, Any] | None = None
    try:
        try:
            stack.start()
        except LaunchError as exc:
            print(f"cmg soak: the stack did not start: {exc}", file=sys.stderr)
            return 2
        soak = Soak(opts, stack)
        report = asyncio.run(soak.run())
    except KeyboardInterrupt:
        print("cmg soak: aborted", file=sys.stderr)
        return 130
    finally:
        try:  # never leave the site stopped
            site = stack.process("mock_site")
            if site.alive():
                os.kill(site.pid, signal.SIGCONT)
        except (KeyError, ProcessLookupError):
            pass
        stack.stop()
        if not opts.keep_uploads:
            freed = drop_uploaded_bytes(directory)
            if freed:
                print(f"cmg soak: deleted {freed / 2**20:,.1f} MiB of uploaded bytes (--keep-uploads keeps them)")
    print(format_report(report))
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"figures written to {opts.json_path}")
    print(f"logs: {directory / 'logs'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
