"""Which connection point takes the next request (gateway.routing.Routes): round-robin per
role across the links that publish it, skipping draining or closed tunnels."""

from __future__ import annotations

from collections import Counter
from typing import Any

from gateway.routing import ConnectorLink, Routes
from tunnel import PublishedRole

MP = PublishedRole(72057594037927938, "MP", "mp.contoso.local", "http://mp", ("CCM_Incoming",))
DP = PublishedRole(72057594037927942, "DP", "dp.contoso.local", "http://dp", ("SMS_DP_SMSPKG$",))


class FakeSession:
    """What ConnectorLink.usable asks of a tunnel session."""

    def __init__(self) -> None:
        self.closed = False
        self.peer_draining = False
        self.local_draining = False


def link(name: str, *roles: PublishedRole) -> ConnectorLink:
    session: Any = FakeSession()
    return ConnectorLink(name, "ABC", session, {r.role_id: r for r in roles}, "127.0.0.1")


def firsts(routes: Routes, role_id: int, n: int) -> Counter[str]:
    return Counter(routes.candidates(role_id)[0].name for _ in range(n))


def test_requests_take_turns_and_each_list_holds_every_usable_link() -> None:
    routes = Routes()
    a, b, c = link("cp-a", MP, DP), link("cp-b", MP, DP), link("cp-c", MP)
    for each in (a, b, c):
        routes.add(each)
    assert firsts(routes, DP.role_id, 10) == {"cp-a": 5, "cp-b": 5}
    assert firsts(routes, MP.role_id, 9) == {"cp-a": 3, "cp-b": 3, "cp-c": 3}
    assert sorted(l.name for l in routes.candidates(MP.role_id)) == ["cp-a", "cp-b", "cp-c"]
    assert routes.candidates(12345) == []


def test_draining_or_closed_links_are_skipped() -> None:
    routes = Routes()
    a, b = link("cp-a", DP), link("cp-b", DP)
    routes.add(a)
    routes.add(b)
    a.session.peer_draining = True  # type: ignore[attr-defined]
    assert firsts(routes, DP.role_id, 4) == {"cp-b": 4}
    assert [l.name for l in routes.candidates(DP.role_id)] == ["cp-b"]
    b.session.closed = True  # type: ignore[attr-defined]
    assert routes.candidates(DP.role_id) == []
    a.session.peer_draining = False  # type: ignore[attr-defined]
    assert [l.name for l in routes.candidates(DP.role_id)] == ["cp-a"]


def test_links_that_come_and_go_are_seen_at_once() -> None:
    routes = Routes()
    a, b = link("cp-a", DP), link("cp-b", DP)
    routes.add(a)
    assert [l.name for l in routes.candidates(DP.role_id)] == ["cp-a"]
    routes.add(b)
    assert firsts(routes, DP.role_id, 4) == {"cp-a": 2, "cp-b": 2}
    routes.remove(a)
    assert firsts(routes, DP.role_id, 3) == {"cp-b": 3}
    routes.remove(b)
    assert routes.candidates(DP.role_id) == []
    assert routes.ever_connected and routes.is_known(DP.role_id, "sms_dp_smspkg$")
