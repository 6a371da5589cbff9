"""The ``cmg`` command: one entry point for the whole emulator.

    cmg up            start the whole stack (site, gateway instances, connection points)
    cmg certs init    generate the deployment's certificates
    cmg client        run one internet client through the CMG
    cmg token new     create a bulk registration token
    cmg analyze       the Connection Analyzer
    cmg status        instances, connection points and traffic, as the console shows them
    cmg bench         the throughput benchmark
    cmg soak          a bounded soak under injected faults
    cmg gateway | connector | site   run one component in the foreground
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from . import config as cfg


def _up(args: argparse.Namespace) -> int:
    from .launcher import LaunchError, Stack

    stack = Stack(args.dir, config_file=args.config, port=args.port, instances=args.instances,
                  connectors=args.connectors)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"cmg: starting the CMG emulator in {stack.dir}", flush=True)
    try:
        stack.start()
    except (LaunchError, cfg.ConfigError) as exc:
        print(f"cmg: {exc}", file=sys.stderr)
        return 2
    for note in stack.notes:
        print(f"cmg: {note}")
    d = stack.deployment
    print(f"""
CMG emulator is up: {d['service_name']}  (site {d['site_code']}, {d['instances']} instance(s), {len(d['connection_points'])} connection point(s))
  listening on      https://{d['listen']}  (the service name must resolve there, e.g. curl --resolve)
  client URL        {d['client_url']}
  CCMHOSTNAME       {d['ccmhostname']}
  trust (CA)        {d['ca_cert']}
  client cert/key   {d['client_cert']}  {d['client_key']}
  logs              {d['logs_dir']}/  (CMGService.log, SMS_Cloud_ProxyConnector_*.log, MP logs)
  deployment        {stack.dir / 'deployment.json'}

Try:  cmg client --deployment {stack.dir / 'deployment.json'}
Stop: Ctrl-C
""", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("cmg: stopping (draining connection points, then instances, then the site)", flush=True)
        stack.stop()
    print("cmg: stopped", flush=True)
    return 0


def _certs_init(args: argparse.Namespace) -> int:
    from . import pki

    deployment = cfg.load(args.config, base_dir=args.dir)
    directory = args.out or deployment.certs_dir
    made = pki.init_certificates(
        directory, service_name=args.service_name or deployment.service_name,
        site_code=deployment.site_code, connection_points=deployment.connection_point_names,
        clients=args.clients, key_type=args.key_type, force=args.force,
    )
    for line in pki.describe(made):
        print(line)
    print(f"{len(made.created)} file(s) written in {directory}" if made.created
          else f"nothing to do: every certificate in {directory} is present and valid")
    return 0


def _client(args: argparse.Namespace) -> int:
    from clientsim.client import InternetClient
    from clientsim.report import format_cycle

    path = Path(args.deployment)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"cmg client: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    base = path.resolve().parent

    def p(key: str) -> Path:
        v = Path(d[key])
        return v if v.is_absolute() else base / v

    host, _, port = d["listen"].rpartition(":")
    mp = next(r for r in d["roles"] if r["kind"] == "MP")
    extra: dict[str, object] = {"auth": args.auth}
    use_cert = args.auth == "pki" and not args.no_cert
    if args.auth == "entra":
        from clientsim.client import EntraSettings

        e = d["entra"]
        extra["entra"] = EntraSettings(e["authority"], e["tenant_id"], e["client_app_id"], e["server_app_id_uri"])
    elif args.auth == "token":
        extra["bulk_token"] = args.bulk_token or _new_bulk_token(p("config"), base, None)
    client = InternetClient(
        d["service_name"], (host, int(port)), int(mp["role_id"]), p("ca_cert"),
        (Path(args.cert) if args.cert else p("client_cert")) if use_cert else None,
        (Path(args.key) if args.key else p("client_key")) if use_cert else None,
        **extra,  # type: ignore[arg-type]
    )
    async def cycle():  # type: ignore[no-untyped-def]
        async with client:
            return await client.run_cycle()

    result = asyncio.run(cycle())
    print(format_cycle(result))
    return 0 if result.ok else 1


def _new_bulk_token(config_file: Path | None, base: Path | None, minutes: int | None) -> str:
    from .site_tokens import new_bulk_token

    deployment = cfg.load(config_file, base_dir=base)
    return new_bulk_token(deployment.site, minutes)


def _token_new(args: argparse.Namespace) -> int:
    config_file = args.config
    if config_file is None and args.deployment is not None:
        d = json.loads(Path(args.deployment).read_text(encoding="utf-8"))
        config_file = Path(args.deployment).resolve().parent / d["config"]
    try:
        token = _new_bulk_token(config_file, args.dir, args.lifetime)
    except ValueError as exc:
        print(f"cmg token: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cmg token: cannot read the site's token-signing key ({exc}); run cmg certs init", file=sys.stderr)
        return 2
    print(token)
    return 0


def _on_deployment(command: str, module: str) -> Callable[[argparse.Namespace], int]:
    """A command that reads a running deployment's deployment.json: cmg analyze, cmg status."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        path = Path(args.deployment)
        if not path.exists():
            print(f"cmg {command}: {path} does not exist (start the stack with cmg up)", file=sys.stderr)
            return 2
        return int(importlib.import_module(module).main(path))

    return run


def _component(module: str, rest: list[str]) -> int:
    import importlib

    mod = importlib.import_module(module)
    main = getattr(mod, "main", None) or importlib.import_module(f"{module}.__main__").main
    return int(main(rest))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("gateway", "connector", "site", "bench", "soak"):
        module = {"site": "mock_site", "soak": "cmg.soak"}.get(argv[0], argv[0])
        return _component(module, argv[1:])

    parser = argparse.ArgumentParser(prog="cmg", description="ConfigMgr Cloud Management Gateway emulator")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack on loopback (no Docker)")
    up.add_argument("--dir", type=Path, default=Path("."), help="deployment directory (default: .)")
    up.add_argument("--config", type=Path, default=None, help="deployment file (default: DIR/deployment.toml if present)")
    up.add_argument("--port", type=int, default=None, help="client port (default 443, or 8443 when 443 cannot be bound; 0 = free ports for everything)")
    up.add_argument("--instances", type=int, default=None, help="gateway instances (default 1)")
    up.add_argument("--connectors", type=int, default=None, help="connection points (default 1)")
    up.set_defaults(func=_up)

    certs = sub.add_parser("certs", help="certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="generate the deployment's CAs, server, client and connection point certificates")
    init.add_argument("--dir", type=Path, default=Path("."), help="deployment directory (default: .)")
    init.add_argument("--config", type=Path, default=None, help="deployment file")
    init.add_argument("--out", type=Path, default=None, help="certificates directory (default: DIR/certs)")
    init.add_argument("--service-name", default=None, help="CMG service name = the server certificate's CN")
    init.add_argument("--key-type", default="rsa2048", choices=("rsa2048", "rsa4096", "ec"))
    init.add_argument("--clients", type=int, default=1, help="client certificates to issue")
    init.add_argument("--force", action="store_true", help="regenerate everything")
    init.set_defaults(func=_certs_init)

    client = sub.add_parser("client", help="run one internet client's cycle through the CMG")
    client.add_argument("--deployment", default="deployment.json", help="deployment.json written by cmg up")
    client.add_argument("--cert", default=None, help="client certificate (PEM; default: the deployment's)")
    client.add_argument("--key", default=None, help="client key (PEM)")
    client.add_argument("--no-cert", action="store_true", help="present no client certificate")
    client.add_argument("--auth", choices=("pki", "entra", "token"), default="pki",
                        help="client authentication: PKI certificate, Entra ID device token, or site-issued token")
    client.add_argument("--bulk-token", default=None,
                        help="with --auth token: the bulk registration token (default: a new one from the site)")
    client.set_defaults(func=_client)

    analyze = sub.add_parser("analyze", help="the Connection Analyzer: check a running deployment end to end")
    analyze.add_argument("--deployment", default="deployment.json", help="deployment.json written by cmg up")
    analyze.set_defaults(func=_on_deployment("analyze", "cmg.analyze"))

    status = sub.add_parser("status", help="the CMG's state: instances, connection points, traffic")
    status.add_argument("--deployment", default="deployment.json", help="deployment.json written by cmg up")
    status.set_defaults(func=_on_deployment("status", "cmg.status"))

    token = sub.add_parser("token", help="site-issued tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    tnew = token_sub.add_parser("new", help="create a bulk registration token (printed on stdout)")
    tnew.add_argument("--lifetime", type=int, default=None, metavar="MINUTES",
                      help="validity in minutes (default 4320, at most 10080)")
    tnew.add_argument("--dir", type=Path, default=Path("."), help="deployment directory (default: .)")
    tnew.add_argument("--config", type=Path, default=None, help="deployment file")
    tnew.add_argument("--deployment", default=None, help="deployment.json of a running stack (uses its configuration)")
    tnew.set_defaults(func=_token_new)

    sub.add_parser("soak", help="a bounded soak under injected faults (cmg soak --help)")
    sub.add_parser("bench", help="the benchmark: CMG path vs direct, nginx and an SSH reverse tunnel (cmg bench --help)")
    sub.add_parser("gateway", help="run one gateway instance (python -m gateway --help)")
    sub.add_parser("connector", help="run one connection point (python -m connector --help)")
    sub.add_parser("site", help="run the mock site (python -m mock_site --help)")

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except cfg.ConfigError as exc:
        print(f"cmg: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
