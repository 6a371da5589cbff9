"""Fixtures for the mock site: a real site on loopback ports and an HTTP client."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from mock_site import SiteRunner, start_site

# The helpers module sits beside this file (pytest may import test folders without
# putting them on sys.path).
sys.path.insert(0, str(Path(__file__).parent))
from site_helpers import site_config  # noqa: E402


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[SiteRunner]:
    runner = await start_site(site_config(tmp_path), bgb_hold=5.0)
    yield runner
    await runner.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


