"""CMTrace log lines and ConfigMgr's size-based rollover (NAME.log -> NAME.lo_)."""

import logging
import re

from cmg.cmtrace import open_log

LINE = re.compile(r'^<!\[LOG\[(.*)\]LOG\]!><time="\d\d:\d\d:\d\d\.\d{3}\+000" date="\d\d-\d\d-\d{4}" '
                  r'component="(\w+)" context="" type="([123])" thread="\d+" file="">$')


def test_cmtrace_line_shape(tmp_path):
    log = open_log("t.shape", tmp_path / "X.log", "SMS_Cloud_ProxyConnector")
    log.info("Switched to internal URL. Replaced '%s' with '%s'", "a", "b")
    log.warning("careful ]LOG]!> here")
    for h in log.handlers:
        h.flush()
    lines = (tmp_path / "X.log").read_text().splitlines()
    m = LINE.match(lines[0])
    assert m and m.group(2) == "SMS_Cloud_ProxyConnector" and m.group(3) == "1"
    assert LINE.match(lines[1]).group(3) == "2" and "] LOG]!>" in lines[1]


def test_rollover_to_lo_underscore(tmp_path):
    log = open_log("t.roll", tmp_path / "CMGService.log", "CMGService", max_bytes=10_000)
    for i in range(200):
        log.info("RequestUri: /x RequestCount: %d", i)
    for h in log.handlers:
        h.flush()
    current = (tmp_path / "CMGService.log").read_text()
    history = (tmp_path / "CMGService.lo_").read_text()
    assert len(current) <= 10_000 + 400 and len(history) > 9_000
    assert "RequestCount: 199]" in current
    numbers = [int(n) for n in re.findall(r"RequestCount: (\d+)\]", history + current)]
    assert numbers == sorted(numbers) and numbers[-1] == 199  # nothing out of order in what is kept
    logging.getLogger("t.roll").handlers.clear()
