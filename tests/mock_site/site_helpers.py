"""Helpers shared by the mock site's tests (a uniquely named module, not conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from cmg.config import from_dict
from cmg.messaging import Message, MessageHeader, decode_message, encode_message, new_message_id
from mock_site import SiteRunner

SERVICE = "GraniteFalls.WestUS.CloudApp.Azure.Com"
MP_ID, SUP_ID, DP_ID = 72057594037927939, 72057594037927940, 72057594037927942


def site_config(base: Path, **service: Any):
    data: dict[str, Any] = {"site": {"mp_port": 0, "sup_port": 0, "dp_port": 0}}
    if service:
        data["service"] = service
    return from_dict(data, base).site


async def ccm_post(http: aiohttp.ClientSession, site: SiteRunner, endpoint: str, body: str, *,
                   source_host: str = "CLIENT01", source_id: str = "", headers: dict[str, str] | None = None,
                   path: str = "/ccm_system/request") -> tuple[aiohttp.ClientResponse, Message | None, bytes]:
    header = MessageHeader(id=new_message_id(), source_id=source_id, source_host=source_host,
                           target_endpoint=endpoint)
    ctype, data = encode_message(Message(header, body))
    async with http.request("CCM_POST", site.url("mp") + path, data=data,
                            headers={"Content-Type": ctype, **(headers or {})}) as resp:
        raw = await resp.read()
        reply = decode_message(resp.headers["Content-Type"], raw) if resp.status == 200 else None
        return resp, reply, raw
