"""Where the CPU goes in the gateway and connection point: py-spy, summarised (pure parse)."""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    process: str
    samples: int
    self_top: list[tuple[str, float]]  # function, % of samples where it is the leaf
    inclusive_top: list[tuple[str, float]]  # function, % of samples where it is on the stack


def parse_collapsed(text: str, process: str, top: int = 15) -> Profile:
    """Summarises py-spy's ``--format raw`` output (``frame;frame;leaf count`` lines)."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        leaf[_short(frames[-1])] += n
        for f in set(_short(f) for f in frames):
            inclusive[f] += n

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100.0 * n / total, 1)) for f, n in c.most_common(top)] if total else []

    return Profile(process, total, pct(leaf), pct(inclusive))


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"; line numbers split one function.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    return f"{name} ({short})"


class Recorder:
    """``py-spy record`` on each pid for ``seconds``, in the background."""

    def __init__(self, py_spy: str, out_dir: Path, targets: dict[str, int], seconds: float,
                 gil: bool = False) -> None:
        self.out_dir = out_dir
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in targets.items():
            out = out_dir / f"{name}.collapsed.txt"
            argv = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
                    "--duration", str(max(1, int(seconds))), "--rate", "250", "--nonblocking"]
            if gil:  # only samples that hold the GIL: the interpreter's own work
                argv.append("--gil")
            self.procs[name] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                 start_new_session=True), out)

    def finish(self, timeout: float = 60) -> list[Profile]:
        profiles = []
        for name, (proc, out) in self.procs.items():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                profiles.append(parse_collapsed(out.read_text(errors="replace"), name))
        return profiles


def format_profiles(profiles: list[Profile]) -> str:
    lines = []
    for p in profiles:
        lines.append(f"{p.process}: {p.samples} samples")
        lines.append("  self (leaf) time:")
        lines.extend(f"    {pct:5.1f}%  {f}" for f, pct in p.self_top)
        lines.append("  inclusive time:")
        lines.extend(f"    {pct:5.1f}%  {f}" for f, pct in p.inclusive_top)
    return "\n".join(lines)
