"""``cmg soak`` in small: 30 s of four clients (all three auth methods) with faults injected
into a 2-instance, 2-connection-point stack; nothing may be duplicated, lost or truncated."""

from __future__ import annotations

import json

import pytest

from cmg.soak import main

pytestmark = pytest.mark.integration


@pytest.mark.timeout(400)
def test_short_soak_loses_and_duplicates_nothing(tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = main(["--minutes", "0.5", "--clients", "4", "--seed", "5", "--dir", str(tmp_path / "stack"),
                 "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["duplicated"] == 0, report["reconciliation"]["duplicated_items"]
    assert report["lost"] == 0, report["reconciliation"]["lost_items"]
    assert report["truncated_complete"] == 0, report["reconciliation"]["truncated_items"]
    assert report["corrupt_downloads"] == 0, report["reconciliation"]["corrupt_download_items"]
    assert code == 0, printed
    # The uploaded bytes are gone (a long soak would fill the disk); the MP's records stay.
    incoming = tmp_path / "stack" / "data" / "incoming"
    assert [p for p in incoming.iterdir() if p.suffix == ".json"]
    assert not [p for p in incoming.iterdir() if p.suffix != ".json"]
    assert "MiB of uploaded bytes" in printed

    # Every auth method carried traffic.
    assert set(report["auth_methods"]) == {"pki", "entra", "token"}
    ops = report["requests"]["by_operation"]
    for op in ("message", "upload", "download", "cycle:MPLIST", "cycle:EntraToken", "cycle:CCM_STS"):
        assert ops[op]["succeeded"] > 0, (op, ops.get(op))

    # At least one fault was injected, the stack became whole again, and traffic
    # started after it succeeded.
    faults = report["faults"]
    assert faults, printed
    recovered = [f for f in faults if f["recovered_after"] is not None and f["first_success_after"] is not None]
    assert recovered, faults
    if any(f["kind"] != "mp-stall" for f in recovered):
        assert sum(report["restarts"].values()) >= 1

    # The client's view and the MP's agree.
    rec = report["reconciliation"]
    assert rec["uploads_complete_at_mp"] >= rec["uploads_client_ok"] > 0
    assert rec["messages_client_ok_found_at_mp"] == rec["messages_client_ok"] > 0
    assert report["peak_rss_mib"]["mock_site"] > 0
    assert "PASS" in printed
