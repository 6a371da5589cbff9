"""The one entry point of the image: every compose service is a role of it.

    init                 certificates (cmg certs init) into /deployment, then the client kit
    site                 the mock site (MP, SUP, DP)
    gateway I            gateway instance I
    connector NAME       connection point NAME
    client [ARGS]        one internet client cycle (cmg client) with the client kit
    anything else        run as a command

Long-running roles run the component as a child process: its output goes to the
container's log, its ``READY`` / ``CONNECTED`` / ``DISCONNECTED`` lines are kept in
``/tmp/cmg-state.json`` for ``healthcheck.py``, and SIGTERM is passed on so the
component drains as it does under ``cmg up``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from cmg import allocator

CONFIG = Path(os.environ.get("CMG_CONFIG", "/opt/cmg/deployment.toml"))
DEPLOYMENT = Path(os.environ.get("CMG_DIR", "/deployment"))
CLIENT_KIT = Path(os.environ.get("CMG_CLIENT_KIT", "/client-kit"))
STATE = Path(os.environ.get("CMG_STATE", "/tmp/cmg-state.json"))
# What the internet client holds: trust for the server certificate, its own certificate.
KIT_FILES = ("root-ca.pem", "client.pem", "client.key")


def say(msg: str) -> None:
    print(f"entrypoint: {msg}", file=sys.stderr, flush=True)


def common() -> list[str]:
    return ["--config", str(CONFIG), "--dir", str(DEPLOYMENT)]


# --- init -----------------------------------------------------------------------


def init() -> int:
    r = subprocess.run([sys.executable, "-m", "cmg", "certs", "init", *common()])
    if r.returncode != 0:
        return r.returncode
    from cmg import config as cfg
    from cmg.launcher import Stack

    deployment = cfg.load(CONFIG, base_dir=DEPLOYMENT)
    # deployment.json in the format cmg up writes (the launcher's own description),
    # with what differs when every component is a container: clients find the CMG by
    # its service name (a network alias of both gateways on `internet`), on 443.
    stack = Stack(DEPLOYMENT, config_file=CONFIG)
    d = stack.describe(deployment)  # one source for the file's format
    d["listen"] = f"{deployment.service_name}:{deployment.client_port}"
    d["config"] = str(CONFIG)
    d["processes"] = []
    out = DEPLOYMENT / "deployment.json"
    out.write_text(json.dumps(d, indent=2), encoding="utf-8")
    say(f"wrote {out}")
    if CLIENT_KIT.is_dir():
        certs = CLIENT_KIT / "certs"
        certs.mkdir(exist_ok=True)
        for name in KIT_FILES:
            shutil.copy2(deployment.certs_dir / name, certs / name)
        kit = dict(d)
        kit.update(ca_cert="certs/root-ca.pem", client_cert="certs/client.pem",
                   client_key="certs/client.key")
        for key in ("client_ca_cert", "client_ca_key", "crl", "token_signing_cert", "logs_dir"):
            kit.pop(key, None)  # the site's secrets stay on-prem
        (CLIENT_KIT / "deployment.json").write_text(json.dumps(kit, indent=2), encoding="utf-8")
        say(f"wrote the client kit in {CLIENT_KIT}")
    return 0


# --- long-running components ----------------------------------------------------


def write_state(state: dict[str, object]) -> None:
    tmp = STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    tmp.replace(STATE)


def supervise(kind: str, argv: list[str]) -> int:
    state: dict[str, object] = {"kind": kind, "ready": False, "connected": []}
    write_state(state)
    try:
        env = allocator.environment(dict(os.environ, PYTHONUNBUFFERED="1"))
    except allocator.AllocatorError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(allocator.describe(), file=sys.stderr, flush=True)
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)

    def forward(sig: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    connected: set[int] = set()
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        word, _, rest = line.strip().partition(" ")
        try:
            data = json.loads(rest) if rest else {}
        except json.JSONDecodeError:
            continue
        if word == "READY":
            state.update(ready=True, info=data)
        elif word == "CONNECTED":
            connected.add(int(data["instance"]))
        elif word == "DISCONNECTED":
            connected.discard(int(data["instance"]))
        else:
            continue
        state["connected"] = sorted(connected)
        write_state(state)
    code = child.wait()
    state["ready"] = False
    write_state(state)
    return code


def main(argv: list[str]) -> int:
    if not argv:
        say(__doc__ or "")
        return 2
    role, rest = argv[0], argv[1:]
    py = sys.executable
    if role == "init":
        return init()
    if role == "site":
        return supervise("site", [py, "-m", "mock_site", *common(), *rest])
    if role == "gateway":
        instance = rest[0] if rest else os.environ.get("CMG_INSTANCE", "0")
        return supervise("gateway", [py, "-m", "gateway", *common(), "--instance", instance, *rest[1:]])
    if role == "connector":
        name = rest[0] if rest else os.environ["CMG_CONNECTOR"]
        return supervise("connector", [py, "-m", "connector", *common(), "--name", name, *rest[1:]])
    if role == "client":
        os.execv(py, [py, "-m", "cmg", "client", "--deployment", str(CLIENT_KIT / "deployment.json"), *rest])
    os.execvp(argv[0], argv)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
