"""The benchmark's CPU accounting: a process group's CPU time and its kernel share."""

from __future__ import annotations

import subprocess
import sys

from bench.procstat import Monitor

# One child spends its time in the kernel (filling 1 MiB from /dev/zero per call), the
# other in Python.
KERNEL_BOUND = ("import os, time\nbuf = bytearray(1 << 20)\nt = time.process_time()\n"
                "while time.process_time() - t < 0.6: os.readv(fd, [buf])")
USER_BOUND = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: sum(range(1000))"


def _run(code: str) -> tuple[float, float]:
    prelude = "import os\nfd = os.open('/dev/zero', os.O_RDONLY)\n"
    proc = subprocess.Popen([sys.executable, "-c", prelude + code + "\nprint('done', flush=True)\ninput()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with Monitor({"child": lambda: [proc.pid]}) as mon:
            # The busy loop ends by the child's own CPU clock (0.6 s); then it says so.
            assert proc.stdout is not None and proc.stdout.readline() == "done\n"
    finally:
        proc.communicate("\n", timeout=30)
    assert mon.usage is not None
    return mon.usage.cpu_s["child"], mon.usage.kernel_share()["child"]


def test_cpu_time_and_its_kernel_share_per_group() -> None:
    cpu, kernel_share = _run(KERNEL_BOUND)
    assert cpu >= 0.5
    assert kernel_share > 0.5, kernel_share  # the kernel fills the buffer: mostly system time
    cpu, kernel_share = _run(USER_BOUND)
    assert cpu >= 0.5
    assert kernel_share < 0.2, kernel_share  # pure Python arithmetic: mostly user time
