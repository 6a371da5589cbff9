"""tunnel.compiled: a mypyc build is used only when it was built from the sources on disk,
and the core behaves the same compiled or not."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tunnel import compiled

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def _fake_build(folder: Path) -> None:
    (folder / "tunnel").mkdir(parents=True)
    for name in compiled.MODULES:
        (folder / "tunnel" / f"{name}{SUFFIX}").write_bytes(b"")


def test_a_build_for_the_current_sources_goes_first_on_the_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(compiled.DIR_ENV, str(tmp_path))
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    _fake_build(tmp_path / compiled.source_key())
    path = ["/the/package"]
    assert compiled.activate(path)
    assert path == [str(tmp_path / compiled.source_key() / "tunnel"), "/the/package"]
    assert str(tmp_path / compiled.source_key()) in sys.path


def test_a_build_of_other_sources_is_never_used(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(compiled.DIR_ENV, str(tmp_path))
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    _fake_build(tmp_path / ("0" * 20))  # built before an edit: another key
    path = ["/the/package"]
    assert not compiled.activate(path)
    assert path == ["/the/package"]


def test_an_edit_changes_the_key(tmp_path, monkeypatch) -> None:
    for name in compiled.MODULES:
        (tmp_path / f"{name}.py").write_bytes((compiled.PACKAGE_DIR / f"{name}.py").read_bytes())
    monkeypatch.setattr(compiled, "PACKAGE_DIR", tmp_path)
    before = compiled.source_key()
    with (tmp_path / "frames.py").open("a") as f:
        f.write("\n# an edit\n")
    assert compiled.source_key() != before


def test_an_incomplete_build_or_pure_python_is_not_used(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(compiled.DIR_ENV, str(tmp_path))
    folder = tmp_path / compiled.source_key()
    _fake_build(folder)
    (folder / "tunnel" / f"protocol{SUFFIX}").unlink()
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    assert not compiled.activate([])
    (folder / "tunnel" / f"protocol{SUFFIX}").write_bytes(b"")
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    assert not compiled.activate([])


def test_only_the_newest_builds_are_kept(tmp_path) -> None:
    folders = []
    for i in range(6):
        folder = tmp_path / f"key{i}"
        folder.mkdir()
        os.utime(folder, (1_000_000 + i, 1_000_000 + i))
        folders.append(folder)
    (tmp_path / ".key9-staging").mkdir()  # a build under way elsewhere is left alone
    compiled._prune(folders[0])  # the current build is kept, whatever its age
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == [".key9-staging", "key0", "key3", "key4", "key5"]
    assert compiled.KEEP_BUILDS == 4


@pytest.mark.parametrize("pure", [True, False], ids=["pure", "compiled"])
def test_the_core_tests_pass_both_ways(pure: bool) -> None:
    """The frame, protocol and session tests in a process of their own, as Python and as built."""
    env = dict(os.environ)
    env.pop(compiled.PURE_ENV, None)
    if pure:
        env[compiled.PURE_ENV] = "1"
    elif compiled.build() is None:
        pytest.skip("no mypyc build here (mypy or a C compiler missing): the core runs as Python")
    probe = subprocess.run([sys.executable, "-c", "import tunnel.compiled as c, tunnel.frames as f, "
                            "tunnel.session as s; print(c.active, f.__file__, s.__file__)"],
                           env=env, cwd=ROOT, capture_output=True, text=True)
    active, *where = probe.stdout.split()
    assert active == str(not pure)
    assert all(path.endswith(".py" if pure else SUFFIX) for path in where), where
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/tunnel/test_frames.py", "tests/tunnel/test_protocol.py",
                             "tests/tunnel/test_properties.py", "tests/tunnel/test_session.py"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
