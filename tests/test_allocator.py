"""cmg.allocator: which allocator a component is started with, and what it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmg import allocator

LIB = "/opt/x/libmimalloc.so.2"


def test_auto_preloads_mimalloc_when_it_is_there_and_keeps_other_preloads() -> None:
    env = {"LD_PRELOAD": "/lib/a.so:/lib/b.so"}
    assert allocator.environment(env, LIB)["LD_PRELOAD"] == f"{LIB} /lib/a.so /lib/b.so"
    assert allocator.environment(env, LIB)["LD_PRELOAD"] == f"{LIB} /lib/a.so /lib/b.so"  # not twice
    assert allocator.environment({}, LIB) == {"LD_PRELOAD": LIB}


def test_glibc_never_preloads(monkeypatch: pytest.MonkeyPatch) -> None:
    assert allocator.environment({allocator.ENV: "glibc"}, LIB) == {allocator.ENV: "glibc"}
    monkeypatch.setattr(allocator, "find_mimalloc", lambda dirs=None: LIB)
    assert allocator.describe({allocator.ENV: "GLIBC"}) == "memory allocator: glibc's malloc (CMG_ALLOCATOR=glibc)"


def test_without_mimalloc_auto_falls_back_and_mimalloc_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_mimalloc", lambda dirs=None: None)
    assert allocator.environment({}) == {}
    assert "apt-get install libmimalloc2.0" in allocator.describe({})
    with pytest.raises(allocator.AllocatorError, match="not installed"):
        allocator.environment({allocator.ENV: "mimalloc"})


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(allocator.AllocatorError, match="auto, mimalloc, glibc"):
        allocator.environment({allocator.ENV: "tcmalloc"}, LIB)


def test_the_library_is_found_in_the_first_folder_that_has_it(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "libmimalloc.so").write_bytes(b"")
    assert allocator.find_mimalloc([a, b]) == str(b / "libmimalloc.so")
    (a / "libmimalloc.so.2").write_bytes(b"")
    assert allocator.find_mimalloc([a, b]) == str(a / "libmimalloc.so.2")
    assert allocator.find_mimalloc([tmp_path / "none"]) is None


def test_in_use_reads_the_process_maps() -> None:
    maps = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0\n"
    assert allocator.in_use(maps) == "mimalloc"
    assert allocator.in_use("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n") == "glibc"


@pytest.mark.skipif(allocator.find_mimalloc() is None, reason="mimalloc is not installed here")
def test_a_process_started_with_the_environment_runs_with_mimalloc() -> None:
    code = "from cmg import allocator; print(allocator.in_use())"
    for choice, expected in (("auto", "mimalloc"), ("glibc", "glibc")):
        env = allocator.environment(dict(os.environ, **{allocator.ENV: choice}))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, out.stderr


def test_a_bad_choice_stops_the_bench_and_the_launcher_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main as bench_main
    from cmg.launcher import LaunchError, Stack

    monkeypatch.setenv(allocator.ENV, "tcmalloc")
    assert bench_main(["--only", "cmg-1i1c", "--workloads", "get-1k"]) == 2
    assert "CMG_ALLOCATOR='tcmalloc'" in capsys.readouterr().err
    with pytest.raises(LaunchError, match="CMG_ALLOCATOR"):
        Stack(tmp_path, port=0).start()
