"""Container healthcheck for every role of the image (compose: `python /opt/cmg/healthcheck.py`).

Healthy means, by role (from ``/tmp/cmg-state.json``, kept by entrypoint.py):
  site       READY, and its MP, SUP and DP ports accept a connection
  gateway    READY, and its tunnel port accepts a connection (not 443: an instance takes
             clients only once a connection point serves it, or after service.listen_grace,
             and connection points wait for healthy gateways)
  connector  READY, and connected to every gateway instance (it listens on nothing)
  init       /deployment/deployment.json written
Exit 0 healthy, 1 not (the reason on stdout, which `docker inspect` shows).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

STATE = Path(os.environ.get("CMG_STATE", "/tmp/cmg-state.json"))
DEPLOYMENT = Path(os.environ.get("CMG_DIR", "/deployment"))


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def check() -> str | None:
    if not STATE.exists():
        return None if (DEPLOYMENT / "deployment.json").exists() else "no state yet"
    state = json.loads(STATE.read_text(encoding="utf-8"))
    if not state.get("ready"):
        return f"{state.get('kind')} not READY"
    info = state.get("info", {})
    kind = state.get("kind")
    if kind == "site":
        ports = [int(info["ports"][k]) for k in ("mp", "sup", "dp")]
    elif kind == "gateway":
        ports = [int(info["tunnel_port"])]
    elif kind == "connector":
        want = int(info.get("instances", 1))
        have = len(state.get("connected", []))
        return None if have >= want else f"connected to {have} of {want} instances"
    else:
        return None
    closed = [p for p in ports if not can_connect(p)]
    return f"ports not accepting: {closed}" if closed else None


if __name__ == "__main__":
    problem = check()
    print(problem or "healthy")
    sys.exit(1 if problem else 0)
