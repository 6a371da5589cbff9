"""``cmg status``: the console's Cloud Management node, in the terminal."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def fetch(status_url: str, timeout: float = 5.0) -> dict[str, Any]:
    base = status_url.rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{base}/status/all.json", timeout=timeout) as r:
        return dict(json.loads(r.read()))


def render(s: dict[str, Any]) -> str:
    kinds = {r["role_id"]: r["kind"] for r in s.get("roles", [])}
    names = [i["instance"] for i in s["instances"]]
    lines = [f"Cloud Management Gateway {s['service_name']} (site {s['site_code']}): {s['status']}", "", "Instances"]
    for i in s["instances"]:
        lines.append(f"  {i['instance']:<22} {i['status']:<13} uptime {i.get('uptime_s') or 0:.0f} s")
    lines += ["", "Connection points".ljust(24) + "".join(f"{n:<22}" for n in names)]
    for c in s["connection_points"]:
        lines.append(f"  {c['connection_point']:<22}" + "".join(f"{c['instances'].get(n, 'Disconnected'):<22}" for n in names))
    lines += ["", f"  {'Traffic':<22}{'Role':<26}{'TotalRequests':>14}{'FailedRequests':>16}{'Request bytes':>15}{'Response bytes':>16}"]
    for t in s["traffic"]:
        role = f"{kinds.get(t['role_id'], '')} {t['role_id']}"
        lines.append(f"  {t['connection_point']:<22}{role:<26}{t['total_requests']:>14}{t['failed_requests']:>16}"
                     f"{t['request_bytes']:>15}{t['response_bytes']:>16}")
    return "\n".join(lines)


def main(deployment_file: Path) -> int:
    d = json.loads(deployment_file.read_text(encoding="utf-8"))
    try:
        s = fetch(d["status_url"])
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"cmg status: the gateway's monitoring port does not answer ({exc}); is the stack running?")
        return 2
    print(render(s))
    return 0 if s["status"] == "Ready" else 1
