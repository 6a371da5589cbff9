"""Running one component as a process: event loop, signals, readiness, exit codes.

Every component (``python -m gateway``, ``python -m connector``, ``python -m
mock_site``) starts through :func:`run_component`, so the launcher, compose and a
user at a terminal all see the same behaviour: one ``READY {json}`` line on stdout once
it serves, a clean drain on SIGTERM or SIGINT, exit code 2 for a configuration
problem with the reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

from . import allocator
from .config import ConfigError, Deployment, load


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self, drain: bool = True) -> None: ...


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="deployment file (TOML); none: the defaults")
    parser.add_argument("--dir", type=Path, default=None,
                        help="deployment directory: relative paths resolve here (default: the config file's folder, or the current one)")


def load_deployment(args: argparse.Namespace) -> Deployment:
    return load(args.config, base_dir=args.dir)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def tune_process() -> None:
    """Once a component has started: less garbage-collector and logging work per request.

    Everything allocated during start-up (modules, configuration, certificates) is
    moved out of the collector's sight (``gc.freeze``), and the young generation is
    collected every 50,000 allocations instead of 700: the request path creates many
    short-lived objects and few cycles, so the collector was 7-9 % of the CPU. Log
    records skip the process and multiprocessing names nobody formats.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    logging.logMultiprocessing = False
    logging.logProcesses = False


def run_component(make: Callable[[], Component], ready: Callable[[Component], dict[str, Any]],
                  startup_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Start a component, announce READY, wait for SIGTERM/SIGINT, drain, stop."""
    install_uvloop()

    async def main() -> int:
        try:
            component = make()
            await component.start()
        except (ConfigError, *startup_errors) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tune_process()
        print("READY " + json.dumps({**ready(component), "allocator": allocator.in_use()}), flush=True)
        await stop.wait()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # a second signal ends it at once
        await component.stop(drain=True)
        return 0

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130


