"""The BGB notification channel: long polls held and released by a push."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import psutil

from cmg.messaging import parse_xml

SMSID = "GUID:11111111-2222-3333-4444-555555555555"


async def poll(http, site, client=SMSID, request_type="Poll", timeout=None):
    url = site.url("mp") + f"/BGB/handler.ashx?RequestType={request_type}"
    if timeout is not None:
        url += f"&Timeout={timeout}"
    async with http.get(url, headers={"CCMClientID": client}) as r:
        return r.status, parse_xml(await r.read()) if r.status == 200 else None


async def notify(http, site, client, type_="RequestMachinePolicy"):
    async with http.post(site.url("mp") + "/_mock/bgb/notify", json={"client": client, "type": type_}) as r:
        assert r.status == 200
        return await r.json()


async def wait_held(site, n):
    for _ in range(200):
        if site.bgb.held >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {site.bgb.held} polls held, expected {n}")


async def test_hold_is_released_by_notify(site, http):
    t0 = time.monotonic()
    task = asyncio.create_task(poll(http, site, request_type="LogIn"))
    await wait_held(site, 1)
    assert not task.done()
    result = await notify(http, site, SMSID)
    assert result["released"] == 1
    status, root = await task
    assert time.monotonic() - t0 < 2.0
    assert status == 200 and root.get("Count") == "1"
    assert root.find("PushMessage").findtext("TaskType") == "RequestMachinePolicy"


async def test_timeout_answers_empty(site, http):
    t0 = time.monotonic()
    status, root = await poll(http, site, timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 3
    assert status == 200 and root.get("Count") == "0" and root.find("PushMessage") is None


async def test_queued_notification_is_delivered_at_once(site, http):
    await notify(http, site, SMSID, "RequestSoftwareUpdateScan")
    t0 = time.monotonic()
    status, root = await poll(http, site)
    assert time.monotonic() - t0 < 1
    assert root.find("PushMessage").findtext("TaskType") == "RequestSoftwareUpdateScan"


async def test_broadcast_releases_many_cheap_holds(site, http):
    n = 300
    threads_before = psutil.Process().num_threads()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as many:
        tasks = [asyncio.create_task(poll(many, site, client=f"GUID:{i:08d}-0000-0000-0000-000000000000"))
                 for i in range(n)]
        await wait_held(site, n)
        assert psutil.Process().num_threads() - threads_before < 10  # no thread per held poll
        result = await notify(http, site, "*")
        assert result["released"] == n
        answers = await asyncio.gather(*tasks)
    assert all(status == 200 and root.get("Count") == "1" for status, root in answers)
    assert site.bgb.held == 0


async def test_bad_bgb_requests(site, http):
    async with http.get(site.url("mp") + "/BGB/handler.ashx?RequestType=Poll") as r:
        assert r.status == 400 and "CCMClientID" in r.reason
    status, _ = await poll(http, site, request_type="Dance")
    assert status == 400
    async with http.post(site.url("mp") + "/_mock/bgb/notify", data=b"{") as r:
        assert r.status == 400
