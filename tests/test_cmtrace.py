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


def test_log_fast_writes_what_a_record_would(tmp_path, monkeypatch):
    import time

    from cmg.cmtrace import log_fast

    log = open_log("t.fast", tmp_path / "F.log", "SMS_Cloud_ProxyConnector")
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.987654)
    for text, args in (("Forwarding proxy message %s to URL: %s", ("{A-B}", "http://mp/SMS_MP/x?y")),
                       ("MessageID: %s ElapsedTime: %d ms", ("{A-B}", 12.7)),
                       ("a ]LOG]!> inside", ()),
                       ("bad %d format", ("x",))):  # the record path reports it; nothing written
        log.info(text, *args)
        log_fast(log, logging.INFO, text, *args)
    log_fast(log, logging.WARNING, "careful %s", "here")
    log.warning("careful %s", "here")
    monkeypatch.undo()
    for h in log.handlers:
        h.flush()
    lines = (tmp_path / "F.log").read_text().splitlines()
    assert len(lines) == 8 and lines[0::2] == lines[1::2]
    assert lines[0].startswith("<![LOG[Forwarding proxy message {A-B} to URL: http://mp/SMS_MP/x?y]LOG]!>")
    assert 'time="22:13:20.987+000" date="11-14-2023"' in lines[0]
    assert "ElapsedTime: 12 ms]" in lines[2] and "] LOG]!>" in lines[4] and LINE.match(lines[6]).group(3) == "2"
    logging.getLogger("t.fast").handlers.clear()


def test_log_fast_other_destinations_get_records(tmp_path, caplog):
    import json

    from cmg.cmtrace import log_fast

    log = open_log("t.fastjson", tmp_path / "J.log", "SMS_Cloud_ProxyConnector", fmt="json")
    log_fast(log, logging.INFO, "MessageID: %s ElapsedTime: %d ms", "{A}", 3)
    for h in log.handlers:
        h.flush()
    entry = json.loads((tmp_path / "J.log").read_text())
    assert entry["message"] == "MessageID: {A} ElapsedTime: 3 ms" and entry["level"] == "info"

    log = open_log("t.fastcap", tmp_path / "C.log", "SMS_Cloud_ProxyConnector")
    log.addHandler(caplog.handler)  # a second handler: every handler sees the record
    log_fast(log, logging.INFO, "Forwarding proxy message %s", "{B}")
    for h in log.handlers:
        h.flush()
    assert caplog.messages == ["Forwarding proxy message {B}"]
    assert "Forwarding proxy message {B}]LOG]!>" in (tmp_path / "C.log").read_text()
    for name in ("t.fastjson", "t.fastcap"):
        logging.getLogger(name).handlers.clear()


def test_log_fast_rolls_over(tmp_path):
    from cmg.cmtrace import log_fast

    log = open_log("t.fastroll", tmp_path / "R.log", "SMS_Cloud_ProxyConnector", max_bytes=10_000)
    for i in range(200):
        log_fast(log, logging.INFO, "RequestUri: /x RequestCount: %d", i)
    for h in log.handlers:
        h.flush()
    current = (tmp_path / "R.log").read_text()
    history = (tmp_path / "R.lo_").read_text()
    assert len(current) <= 10_000 + 400 and len(history) > 9_000
    numbers = [int(n) for n in re.findall(r"RequestCount: (\d+)\]", history + current)]
    assert numbers == sorted(numbers) and numbers[-1] == 199
    logging.getLogger("t.fastroll").handlers.clear()


def test_lines_are_flushed_by_each_loop_and_without_one(tmp_path):
    """In a loop, a turn's lines reach the file within the next turns (after one more
    poll); in a second loop after the first closed, and from a thread without a loop,
    just the same (the loop used last time is not reused once it stopped)."""
    import asyncio
    import threading

    from cmg.cmtrace import log_fast

    log = open_log("t.flush", tmp_path / "L.log", "SMS_Cloud_ProxyConnector")
    path = tmp_path / "L.log"

    async def turns(text: str) -> list[str]:
        log_fast(log, logging.INFO, "%s", text)
        log.info("%s again", text)
        assert text not in path.read_text()  # not at once: the flush waits for the loop
        for _ in range(3):
            await asyncio.sleep(0)
        return path.read_text().splitlines()

    assert len(asyncio.run(turns("first"))) == 2
    assert len(asyncio.run(turns("second"))) == 4
    thread = threading.Thread(target=lambda: log_fast(log, logging.INFO, "from a thread"))
    thread.start()
    thread.join()
    assert "from a thread" in path.read_text()  # no loop there: flushed at once
    logging.getLogger("t.flush").handlers.clear()
