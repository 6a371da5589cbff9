"""Example: testing an MP extension (a web service of yours) published through the CMG.

Your service runs in the test (an aiohttp app here); the stack publishes it as one more
site role whose internal URL is your server, so an internet client reaches it at
``/CCM_Proxy_MutualAuth/<role id>/...`` (certificate) or
``/CCM_Proxy_ServerAuth/<role id>/...`` (token), like the real MP. The gateway passes on
the client's identity (``X-CMG-Client-*``); your service can trust it because only the
connection point can reach it.
"""

from __future__ import annotations

import pytest
from aiohttp import web

from cmg.testing import CMGStack, role

RECEIVED = web.AppKey("received", list)


def inventory_extension() -> web.Application:
    """The extension under test: accepts an inventory report, answers who sent it."""
    received: list[dict] = []

    async def report(request: web.Request) -> web.Response:
        data = await request.json()
        received.append({"auth": request.headers.get("X-CMG-Client-Auth"), **data})
        return web.json_response({"accepted": data["machine"],
                                  "auth": request.headers.get("X-CMG-Client-Auth"),
                                  "thumbprint": request.headers.get("X-CMG-Client-Certificate-Thumbprint")})

    app = web.Application()
    app.router.add_post("/CCM_Extension/inventory", report)
    app[RECEIVED] = received
    return app


@pytest.fixture
async def extension():
    app = inventory_extension()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield app, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_the_extension_is_reached_through_the_cmg_with_every_auth_method(extension):
    app, url = extension
    ext_role = role("MP", url, name="MPEXT01", endpoints=["CCM_Extension"])
    # `async with` starts and stops the stack in a worker thread: this loop keeps serving
    # the extension meanwhile.
    async with CMGStack(extra_roles=[ext_role]) as cmg:
        for auth in ("pki", "entra", "token"):
            async with cmg.aclient(auth=auth, client_name=f"PC-{auth.upper()}") as client:
                r = await client.request("POST", "CCM_Extension/inventory", role="MPEXT01",
                                         headers={"Content-Type": "application/json"},
                                         body=f'{{"machine": "PC-{auth.upper()}"}}')
                assert r.status == 200, (auth, r.status, r.reason)
                answer = r.json()
                assert answer["accepted"] == f"PC-{auth.upper()}"
                assert answer["auth"] == {"pki": "MutualAuth", "entra": "CCMToken", "token": "ClientToken"}[auth]
                assert (answer["thumbprint"] is not None) == (auth == "pki")

        # Paths the role does not publish never leave the cloud edge.
        async with cmg.aclient() as client:
            r = await client.request("GET", "SMS_MP/.sms_aut?MPLIST", role="MPEXT01")
            assert (r.status, r.reason) == (404, "CMGService_EndpointNotFound")
            # The site's own MP is untouched by the extension.
            assert (await client.get("SMS_MP/.sms_aut?MPLIST")).status == 200

    assert [e["auth"] for e in app[RECEIVED]] == ["MutualAuth", "CCMToken", "ClientToken"]


def test_a_plain_http_server_works_too(cmg_stack_factory):
    """Sync flavour: a standard-library server in a thread, a stack from the factory."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"hello {self.headers.get('X-CMG-Client-Auth')} {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cmg = cmg_stack_factory(extra_roles=[role("AdminService", f"http://127.0.0.1:{server.server_port}")])
        with cmg.client(auth="token") as client:
            r = client.request("GET", "AdminService/wmi/SMS_Site", role="AdminService")
        assert (r.status, r.text) == (200, "hello ClientToken /AdminService/wmi/SMS_Site")
    finally:
        server.shutdown()
        server.server_close()
