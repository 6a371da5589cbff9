"""Logging in ConfigMgr's CMTrace line format (or plain JSON lines, as an option).

A CMTrace line::

    <![LOG[text]LOG]!><time="HH:MM:SS.mmm+000" date="MM-DD-YYYY" component="..." context="" type="1" thread="N" file="">

type 1 = information, 2 = warning, 3 = error. Times are UTC (bias +000).
Level policy: error = a bug or a failure the operator must act on; warning = a peer or
client misbehaved; info = connect, disconnect, per-request summaries; debug = per frame.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

_TYPES = {logging.DEBUG: 1, logging.INFO: 1, logging.WARNING: 2, logging.ERROR: 3, logging.CRITICAL: 3}


class CMTraceFormatter(logging.Formatter):
    """Formats a record as one CMTrace line; ``component`` defaults to the logger's."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        # "]LOG]!>" inside the text would end the entry early in CMTrace.
        text = text.replace("]LOG]!>", "] LOG]!>")
        t = time.gmtime(record.created)
        ms = int(record.msecs)
        component = getattr(record, "component", self.component)
        return (
            f'<![LOG[{text}]LOG]!><time="{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{ms:03d}+000" '
            f'date="{t.tm_mon:02d}-{t.tm_mday:02d}-{t.tm_year:04d}" component="{component}" '
            f'context="" type="{_TYPES.get(record.levelno, 1)}" thread="{record.thread or threading.get_ident()}" file="">'
        )


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, component, message."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": record.created,
            "level": record.levelname.lower(),
            "component": getattr(record, "component", self.component),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def open_log(logger_name: str, path: Path, component: str, fmt: str = "cmtrace",
             level: int = logging.INFO, echo: bool = False) -> logging.Logger:
    """Attach a file handler writing ``path`` in CMTrace (or JSON) format to a logger.

    ``echo`` also writes the plain messages to stderr (for a component run by hand).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(logger_name)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_cmg_path", None) == str(path):
            return logger
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(CMTraceFormatter(component) if fmt == "cmtrace" else JSONFormatter(component))
    handler._cmg_path = str(path)  # type: ignore[attr-defined]
    logger.addHandler(handler)
    if echo:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(f"%(asctime)s {component} %(levelname)s %(message)s"))
        logger.addHandler(stream)
    return logger
