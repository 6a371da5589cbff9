"""The pytest plugin, run on test files of its own (pytester): marker and indirect
options, one stack per module and options, a private stack after a fault or with
``fresh``, the factory, and nothing running once the session is over."""

from __future__ import annotations

import json

import psutil
import pytest

pytestmark = pytest.mark.integration

# Each inner test appends what it saw to a JSON-lines file.
PRELUDE = '''
import json, os, pytest
SEEN = os.environ["CMG_PLUGIN_SEEN"]

def note(name, cmg, **extra):
    with open(SEEN, "a") as f:
        f.write(json.dumps({"test": name, "dir": str(cmg.directory), "instances": cmg.deployment["instances"],
                            "connection_points": cmg.deployment["connection_points"],
                            "pids": [p["pid"] for p in cmg.deployment["processes"]], **extra}) + "\\n")
'''


def run(pytester: pytest.Pytester, monkeypatch, tmp_path, **files: str) -> tuple[pytest.RunResult, list[dict]]:
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("CMG_PLUGIN_SEEN", str(seen))
    pytester.makepyfile(**{name: PRELUDE + body for name, body in files.items()})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    lines = [json.loads(line) for line in seen.read_text().splitlines()] if seen.exists() else []
    return result, lines


def test_marker_indirect_sharing_and_cleanup(pytester, monkeypatch, tmp_path):
    result, seen = run(pytester, monkeypatch, tmp_path, test_one='''
pytestmark = pytest.mark.cmg_stack(connectors=2)

def test_a(cmg_stack):
    with cmg_stack.client() as c:
        assert c.get("SMS_MP/.sms_aut?MPLIST").status == 200
    assert len(cmg_stack.site_requests()) == 1
    note("a", cmg_stack)

def test_b(cmg_stack):
    assert cmg_stack.site_requests() == []   # a's request is not this test's
    assert len(cmg_stack.site_requests(since=0)) == 1
    note("b", cmg_stack)

@pytest.mark.cmg_stack(instances=2)
def test_c_closer_marker_wins_per_key(cmg_stack):
    note("c", cmg_stack)

@pytest.mark.parametrize("cmg_stack", [{"connectors": 1}], indirect=True)
def test_d_indirect(cmg_stack):
    note("d", cmg_stack)

def test_e_fault(cmg_stack):
    cmg_stack.stop_component("CMGCP02")
    note("e", cmg_stack)

def test_f_after_fault(cmg_stack):
    assert cmg_stack.healthy()
    note("f", cmg_stack)

@pytest.mark.cmg_stack(fresh=True)
def test_g_fresh(cmg_stack):
    note("g", cmg_stack)

def test_h_factory(cmg_stack_factory):
    note("h", cmg_stack_factory(instances=1, connectors=1))
''', test_two='''
def test_other_module(cmg_stack):
    note("other", cmg_stack)
''')
    result.assert_outcomes(passed=9)
    by = {s["test"]: s for s in seen}
    assert by["a"]["dir"] == by["b"]["dir"]  # shared within the module
    assert by["a"]["connection_points"] == ["CMGCP01", "CMGCP02"] and by["a"]["instances"] == 1
    assert by["c"]["instances"] == 2 and by["c"]["connection_points"] == ["CMGCP01", "CMGCP02"]
    assert by["d"]["connection_points"] == ["CMGCP01"]
    assert by["e"]["dir"] == by["a"]["dir"]  # the shared one, then thrown away after the fault
    assert by["f"]["dir"] != by["e"]["dir"]
    assert by["g"]["dir"] not in {by["a"]["dir"], by["f"]["dir"]}
    assert by["h"]["dir"] not in {s["dir"] for s in seen if s["test"] != "h"}
    assert by["other"]["dir"] not in {s["dir"] for s in seen if s["test"] != "other"}
    # Nothing outlives the session: every process gone, every directory removed.
    pids = {p for s in seen for p in s["pids"]}
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    import pathlib
    assert not [s["dir"] for s in seen if pathlib.Path(s["dir"]).exists()]


def test_bad_marker_use_is_a_usage_error(pytester, monkeypatch, tmp_path):
    result, _ = run(pytester, monkeypatch, tmp_path, test_bad='''
@pytest.mark.cmg_stack(2)
def test_x(cmg_stack):
    pass
''')
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*keyword arguments only*"])


def test_keep_option_keeps_the_directory(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("CMG_PLUGIN_SEEN", str(tmp_path / "seen.jsonl"))
    pytester.makepyfile(test_keep=PRELUDE + '''
def test_k(cmg_stack):
    note("k", cmg_stack)
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--cmg-keep")
    result.assert_outcomes(passed=1)
    [seen] = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    import pathlib
    import shutil
    kept = pathlib.Path(seen["dir"])
    try:
        assert (kept / "deployment.json").exists() and (kept / "logs" / "CMGService.log").exists()
        result.stdout.fnmatch_lines([f"*cmg: stack in {kept}*"])
    finally:
        shutil.rmtree(kept, ignore_errors=True)
