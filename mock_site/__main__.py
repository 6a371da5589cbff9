"""``python -m mock_site [--config FILE] [--dir DIR] [--bgb-hold SECONDS]``

Starts the MP, SUP and DP of the deployment's site and its mock Entra ID tenant,
announces the bound ports (``mp``, ``sup``, ``dp``, ``entra``) on the ``READY`` line (and
in ``DIR/site-ports.json``) and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import sys

from cmg.runner import common_arguments, load_deployment, run_component
from cmg.config import SiteConfig
from mock_site.runner import SiteRunner, start_site


class MockSite:
    """The site as a component the runner can start and stop."""

    def __init__(self, config: SiteConfig, bgb_hold: float, ports_file) -> None:
        self.config = config
        self._bgb_hold = bgb_hold
        self._ports_file = ports_file
        self.runner: SiteRunner | None = None

    async def start(self) -> None:
        self.runner = await start_site(self.config, bgb_hold=self._bgb_hold, ports_file=self._ports_file)

    async def stop(self, drain: bool = True) -> None:
        if self.runner is not None:
            await self.runner.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mock_site", description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--bgb-hold", type=float, default=300.0,
                        help="seconds a BGB poll is held before an empty answer (max 900)")
    args = parser.parse_args(argv)

    def make() -> MockSite:
        deployment = load_deployment(args)
        base = (args.dir or deployment.base_dir).resolve()
        return MockSite(deployment.site, args.bgb_hold, base / "site-ports.json")

    def ready(site: MockSite) -> dict[str, object]:
        assert site.runner is not None
        return {"kind": "site", "ports": site.runner.ports, "internet_mp": site.runner.ctx.internet_mp_url}

    return run_component(make, ready, (OSError,))


if __name__ == "__main__":
    sys.exit(main())
