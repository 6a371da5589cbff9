"""pytest plugin: a whole CMG emulator per test module (``cmg_stack``), configurable per test.

Registered through the ``pytest11`` entry point (``cmg = "cmg.pytest_plugin"``), so it is
active once the package is installed. Fixtures:

- ``cmg_stack``: a running :class:`cmg.testing.CMGStack`. Options from the closest
  ``@pytest.mark.cmg_stack(...)`` marker (function, class, then module ``pytestmark``;
  a closer one overrides keys of a farther one) and from indirect parametrization
  (``@pytest.mark.parametrize("cmg_stack", [{"instances": 2}], indirect=True)``,
  applied last). Options are :class:`~cmg.testing.CMGStack`'s keyword arguments
  (``instances``, ``connectors``, ``overrides``, ``extra_roles``...) and ``fresh=True``.

  Tests of one module asking for the same options share one stack (started on first
  use, stopped when a test of another module needs a stack, or at the end of the
  session), so a stack costs its start-up once per module. ``site_requests()`` shows a
  test only the requests made during that test. A stack a test injected a fault into
  (kill, stop, pause, stall...) is stopped after that test, as is one with
  ``fresh=True``; so is one that is no longer healthy.
- ``cmg_stack_factory``: ``cmg_stack_factory(**options)`` starts a private stack, stopped
  after the test: for options known only inside the test (the URL of a server the
  test started, for ``extra_roles``).

Command line: ``--cmg-keep`` keeps each stack's directory (logs, deployment.json) and
prints where it is.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import pytest

from cmg.testing import CMGStack

MARKER = "cmg_stack"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cmg", "CMG emulator")
    group.addoption("--cmg-keep", action="store_true", default=False,
                    help="keep each CMG stack's directory (logs, deployment.json) after it stops")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(instances=1, connectors=1, overrides=None, extra_roles=None, fresh=False): "
        "options of the cmg_stack fixture for this test (see cmg.testing.CMGStack)",
    )


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers(MARKER))):  # farthest first, closest wins
        if marker.args:
            raise pytest.UsageError(f"@pytest.mark.{MARKER} takes keyword arguments only, not {marker.args!r}")
        options.update(marker.kwargs)
    param = getattr(request, "param", None)
    if param is not None:
        if not isinstance(param, dict):
            raise pytest.UsageError(f"an indirect parameter of cmg_stack must be a dict of options, not {param!r}")
        options.update(param)
    return options


class _Pool:
    """Stacks shared by the tests of one module with equal options."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.kept: list[str] = []
        self.stacks: dict[tuple[str, str], CMGStack] = {}

    def _new(self, options: dict[str, Any]) -> CMGStack:
        stack = CMGStack(keep=self.keep, **options)
        stack.start()
        if self.keep:
            self.kept.append(str(stack.directory))
        return stack

    def acquire(self, module: str, options: dict[str, Any]) -> tuple[CMGStack, bool]:
        """A stack for a test; ``(stack, shared)``."""
        fresh = bool(options.pop("fresh", False))
        for key in [k for k in self.stacks if k[0] != module]:
            self.stacks.pop(key).stop()  # the previous module is done with its stacks
        if fresh:
            return self._new(options), False
        key = (module, json.dumps(options, sort_keys=True, default=repr))
        stack = self.stacks.get(key)
        if stack is not None and not (stack.running and not stack.faulted and stack.healthy()):
            self.stacks.pop(key).stop()
            stack = None
        if stack is None:
            stack = self.stacks[key] = self._new(options)
        return stack, True

    def release(self, stack: CMGStack, shared: bool) -> None:
        if shared and stack.running and not stack.faulted:
            return
        for key, s in list(self.stacks.items()):
            if s is stack:
                del self.stacks[key]
        stack.stop()

    def close_module(self, module: str) -> None:
        for key in [k for k in self.stacks if k[0] == module]:
            self.stacks.pop(key).stop()

    def close(self) -> None:
        while self.stacks:
            self.stacks.popitem()[1].stop()


_POOL = pytest.StashKey[_Pool]()


def _pool(config: pytest.Config) -> _Pool:
    pool = config.stash.get(_POOL, None)
    if pool is None:
        pool = config.stash[_POOL] = _Pool(bool(config.getoption("--cmg-keep", False)))
    return pool


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    pool = config.stash.get(_POOL, None)
    if pool is not None and pool.kept:
        terminalreporter.write_sep("-", "cmg: kept stack directories")
        for d in pool.kept:
            terminalreporter.write_line(f"cmg: stack in {d}")


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(_POOL, None)
    if pool is not None:
        pool.close()


@pytest.fixture(scope="module", autouse=True)
def _cmg_module_end(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stops the module's shared stacks when its last test is done."""
    yield
    pool = request.config.stash.get(_POOL, None)
    if pool is not None:
        pool.close_module(_module_key(request))


def _module_key(request: pytest.FixtureRequest) -> str:
    module = getattr(request, "module", None)
    return module.__name__ if module is not None else str(request.node.path)


@pytest.fixture
def cmg_stack(request: pytest.FixtureRequest) -> Iterator[CMGStack]:
    """A running CMG emulator (see the module docstring and docs/testing.md)."""
    pool = _pool(request.config)
    stack, shared = pool.acquire(_module_key(request), _options(request))
    try:
        stack.baseline = stack.mark()
    except Exception:
        stack.baseline = 0
    try:
        yield stack
    finally:
        for c in list(stack._clients):  # clients the test left open
            c._close_from_stack()
        stack._clients.clear()
        pool.release(stack, shared)


@pytest.fixture
def cmg_stack_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., CMGStack]]:
    """``cmg_stack_factory(**options)``: a private running stack, stopped after the test."""
    keep = bool(request.config.getoption("--cmg-keep", False))
    made: list[CMGStack] = []

    def make(**options: Any) -> CMGStack:
        options.pop("fresh", None)
        options.setdefault("keep", keep)
        stack = CMGStack(**options)
        made.append(stack)
        stack.start()
        if stack.keep:
            _pool(request.config).kept.append(str(stack.directory))
        return stack

    yield make
    for stack in made:
        stack.stop()
