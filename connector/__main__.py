"""python -m connector --name NAME: one CMG connection point."""

from __future__ import annotations

import argparse
import json
import sys

from cmg.runner import common_arguments, load_deployment, run_component

from .app import ConnectionPoint


def status_line(kind: str, data: dict[str, object]) -> None:
    print(f"{kind} {json.dumps(data)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m connector", description="One CMG connection point.")
    common_arguments(parser)
    parser.add_argument("--name", default=None, help="connection point name (default: the first configured)")
    parser.add_argument("--echo", action="store_true", help="also print the log to stderr")
    args = parser.parse_args(argv)

    def make() -> ConnectionPoint:
        deployment = load_deployment(args)
        name = args.name or deployment.connection_point_names[0]
        return ConnectionPoint(deployment.connection_point(name), echo=args.echo, status=status_line)

    def ready(cp: ConnectionPoint) -> dict[str, object]:
        return {"kind": "connector", "name": cp.config.name, "instances": len(cp.config.tunnel_ports),
                "monitoring_port": cp.monitoring_port}

    return run_component(make, ready, (OSError,))


if __name__ == "__main__":
    sys.exit(main())
