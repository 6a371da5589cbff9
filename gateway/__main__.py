"""python -m gateway --instance N: one CMG instance."""

from __future__ import annotations

import argparse
import sys

from cmg.runner import common_arguments, load_deployment, run_component

from .app import GatewayInstance
from .tls import StartupError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="One CMG gateway instance.")
    common_arguments(parser)
    parser.add_argument("--instance", type=int, default=0, help="instance number, 0-based")
    parser.add_argument("--echo", action="store_true", help="also print the log to stderr")
    args = parser.parse_args(argv)

    def make() -> GatewayInstance:
        return GatewayInstance(load_deployment(args).gateway(args.instance), echo=args.echo)

    def ready(g: GatewayInstance) -> dict[str, object]:
        assert g.tunnels is not None
        return {"kind": "gateway", "instance": g.config.instance, "client_port": g.client_port,
                "tunnel_port": g.tunnels.port}

    return run_component(make, ready, (StartupError,))


if __name__ == "__main__":
    sys.exit(main())
