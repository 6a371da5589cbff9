"""What one Python hop costs when it does nothing but forward: a reference, not a scenario.

``python -m bench.minimal_hop`` starts the bench's backend, this module's forwarder and the
``nginx`` scenario's proxy, and runs wrk against the forwarder and nginx in turn (1 KiB
GETs at 64 and 1 connections, interleaved repetitions), printing req/s, p50 and CPU
milliseconds per request per process group.

The forwarder (``python -m bench.minimal_hop serve PORT CERT KEY BACKEND_PORT``) is the
cheapest TLS-to-HTTP/1.1 hop this stack allows: uvloop with its own TLS (stdlib ``ssl``),
httptools parsing both ways, keep-alive upstream connections, callbacks only (no task per
request), and nothing else: no client certificate check, no routing, no tunnel, no
logging, no metrics, GETs only. It tells how far the gateway and the connection point
(two such hops and a tunnel, plus everything the CMG does per request) are from what
Python itself can do on this machine; see docs/performance.md, "Seventh round".
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import sys
import tempfile
from pathlib import Path

IDLE: list["_Upstream"] = []


class _Upstream(asyncio.Protocol):
    """A keep-alive connection to the backend; relays one response at a time."""

    def __init__(self) -> None:
        import httptools

        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        data = b"".join(self.chunks)
        self.chunks.clear()
        IDLE.append(self)
        if client is not None and client.transport is not None:
            client.transport.write(data)


class _Client(asyncio.Protocol):
    """A client's TLS connection; each GET goes to an idle upstream connection."""

    def __init__(self, backend_port: int) -> None:
        import httptools

        self.backend_port = backend_port
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(name + b": " + value + b"\r\n")

    def on_message_complete(self) -> None:
        head = b"GET " + self.url + b" HTTP/1.1\r\n" + b"".join(self.headers) + b"\r\n"
        self.headers = []
        if IDLE:
            upstream = IDLE.pop()
            upstream.client = self
            assert upstream.transport is not None
            upstream.transport.write(head)
        else:
            asyncio.get_running_loop().create_task(self._connect(head))

    async def _connect(self, head: bytes) -> None:
        _, upstream = await asyncio.get_running_loop().create_connection(
            _Upstream, "127.0.0.1", self.backend_port)
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(head)


async def serve(port: int, cert: str, key: str, backend_port: int) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(backend_port), "127.0.0.1", port, ssl=context)
    print("ready", flush=True)
    await server.serve_forever()


def measure(seconds: float = 4.0, reps: int = 3) -> None:
    from . import sysdeps

    tools = sysdeps.ensure(["nginx", "wrk", "curl", "gcc", "taskset"])
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="cmg-minimal-hop-", dir=base))
    try:
        _measure(tools, work, seconds, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(tools: dict[str, str], work: Path, seconds: float, reps: int) -> None:
    import subprocess

    from cmg.launcher import free_port

    from . import scenarios, workloads
    from .load import Generators, build_shim
    from .procstat import Monitor
    from .servers import Backend

    work.chmod(0o755)  # nginx's workers (an unprivileged user) read the files under it
    certs = work / "certs"
    scenarios.init_pki(certs)
    tls = scenarios.server_tls(certs)
    backend = Backend(tools["nginx"], work, tls, 1 << 20).start()
    try:
        shared = scenarios.Shared(tools, work, certs, backend)
        gen = Generators(tools["wrk"], tools["curl"], work, tools["taskset"], "1",
                         build_shim(tools["gcc"], work / "wrk_clientcert.so"))
        port = free_port()
        hop = subprocess.Popen([sys.executable, "-m", "bench.minimal_hop", "serve", str(port),
                                str(tls.certificate), str(tls.key), str(backend.http_port)],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert hop.stdout is not None and hop.stdout.readline().strip() == "ready"
            with scenarios.open_scenario("nginx", shared) as nginx:
                runs = [("minimal-hop", shared.target(port), {"hop": lambda: [hop.pid],
                                                               "backend": lambda: [backend.nginx.proc.pid]}),
                        ("nginx", nginx.target, nginx.groups)]
                for _, target, _ in runs:
                    gen.wrk_get(target, workloads.SMALL, 16, 1)  # warm-up
                for connections in (64, 1):
                    for rep in range(reps):
                        for name, target, groups in runs:
                            with Monitor(groups) as mon:
                                r = gen.wrk_get(target, workloads.SMALL, connections, seconds)
                            assert mon.usage is not None
                            cpu = ", ".join(f"{k} {v * 1000 / max(r.ok, 1):.4f}" for k, v in mon.usage.cpu_s.items())
                            print(f"{name:11s} c={connections:<3d} rep {rep + 1}/{reps}: {r.rps:8,.0f} req/s "
                                  f"p50 {r.p50_ms:.3f} ms, errors {r.errors + r.non_2xx}; CPU ms per request: "
                                  f"{cpu}, wrk {r.generator_cpu_s * 1000 / max(r.ok, 1):.4f}", flush=True)
        finally:
            hop.terminate()
            hop.wait(10)
    finally:
        backend.stop()


def main(argv: list[str]) -> None:
    if argv and argv[0] == "serve":
        import uvloop

        uvloop.run(serve(int(argv[1]), argv[2], argv[3], int(argv[4])))
    else:
        measure()


if __name__ == "__main__":
    main(sys.argv[1:])
