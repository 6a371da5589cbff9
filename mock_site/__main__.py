"""``python -m mock_site [--config FILE] [--dir DIR] [--bgb-hold SECONDS]``

Starts the MP, SUP and DP of the deployment's site, prints the bound ports, writes
``DIR/site-ports.json`` and runs until SIGTERM or SIGINT (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from cmg import config as cmg_config
from mock_site.runner import start_site


async def _serve(deployment: cmg_config.Deployment, bgb_hold: float, base_dir: Path) -> None:
    site = await start_site(deployment.site, bgb_hold=bgb_hold, ports_file=base_dir / "site-ports.json")
    print(json.dumps({"mock_site": site.ports, "internet_mp": site.ctx.internet_mp_url}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not on this platform
            pass
    try:
        await stop.wait()
    finally:
        await site.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mock_site", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="deployment file (TOML); defaults when omitted")
    parser.add_argument("--dir", type=Path, help="deployment directory (relative paths, site-ports.json)")
    parser.add_argument("--bgb-hold", type=float, default=300.0,
                        help="seconds a BGB poll is held before an empty answer (max 900)")
    args = parser.parse_args(argv)
    try:
        deployment = cmg_config.load(args.config, base_dir=args.dir)
    except cmg_config.ConfigError as exc:
        print(f"mock_site: {exc}", file=sys.stderr)
        return 2
    base_dir = (args.dir or deployment.base_dir).resolve()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(_serve(deployment, args.bgb_hold, base_dir))
        else:
            asyncio.run(_serve(deployment, args.bgb_hold, base_dir))
    except OSError as exc:
        print(f"mock_site: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
