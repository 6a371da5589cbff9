"""Make tests/tunnel/tunnel_helpers.py importable from the tunnel tests; ``websocket_kind``."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import tunnel_helpers  # noqa: E402


@pytest.fixture(params=["writer-task", "send-now"])
def websocket_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session sends through its writer task (a websocket with ``send()`` only), or
    from the end of each turn (``send_now``, as over tunnel.ws): memory_pair() gives that kind."""
    monkeypatch.setattr(tunnel_helpers, "DIRECT", request.param == "send-now")
    return str(request.param)
