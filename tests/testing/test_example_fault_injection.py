"""Example: testing a monitoring check (an alert) against injected faults.

``check_cmg`` stands for your probe: one request through the CMG, classified the way
your alerting wants. The stack runs two gateway instances and two connection points;
the test breaks parts of it and checks what the probe says. A stack a test broke is
thrown away after that test (the next test gets a fresh one).
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.cmg_stack(instances=2, connectors=2,
                                   overrides={"connection_point": {"request_timeout": 2}})


def check_cmg(client) -> str:
    """OK, WARNING (slow) or CRITICAL: <reason>; the probe under test."""
    t0 = time.monotonic()
    r = client.request("GET", "SMS_MP/.sms_aut?MPLIST", role="MP")
    if r.status != 200:
        return f"CRITICAL: {r.status} {r.reason}"
    return "WARNING: slow" if time.monotonic() - t0 > 1.0 else "OK"


def test_healthy(cmg_stack):
    with cmg_stack.client() as client:
        assert check_cmg(client) == "OK"
    assert cmg_stack.connection_status() == {0: {"CMGCP01", "CMGCP02"}, 1: {"CMGCP01", "CMGCP02"}}


def test_one_connection_point_down_is_not_an_outage_both_are(cmg_stack):
    with cmg_stack.client() as client:
        cmg_stack.stop_component("CMGCP01")
        assert [check_cmg(client) for _ in range(5)] == ["OK"] * 5

        cmg_stack.stop_component("CMGCP02")
        assert check_cmg(client) == "CRITICAL: 503 CMGConnector_ServiceUnavailable"

        cmg_stack.start_component("CMGCP01")  # blocks until it is connected again
        assert check_cmg(client) == "OK"


def test_a_crashed_gateway_instance_is_restarted_and_the_other_carries_on(cmg_stack):
    with cmg_stack.client() as client:
        old = cmg_stack.kill("gateway-1")
        assert [check_cmg(client) for _ in range(5)] == ["OK"] * 5
        cmg_stack.wait_restarted("gateway-1", old)
        assert cmg_stack.pid("gateway-1") != old
        assert check_cmg(client) == "OK"


def test_a_hung_management_point(cmg_stack):
    with cmg_stack.client() as client:
        with cmg_stack.stalled("MP"):
            t0 = time.monotonic()
            assert check_cmg(client) == "CRITICAL: 504 CMGConnector_GatewayTimeout"
            assert 1.5 < time.monotonic() - t0 < 10  # connection_point.request_timeout = 2
        assert check_cmg(client) == "OK"
