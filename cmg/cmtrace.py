"""Logging in ConfigMgr's CMTrace line format (or plain JSON lines, as an option).

A CMTrace line::

    <![LOG[text]LOG]!><time="HH:MM:SS.mmm+000" date="MM-DD-YYYY" component="..." context="" type="1" thread="N" file="">

type 1 = information, 2 = warning, 3 = error. Times are UTC (bias +000).
Level policy: error = a bug or a failure the operator must act on; warning = a peer or
client misbehaved; info = connect, disconnect, per-request summaries; debug = per frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_TYPES = {logging.DEBUG: 1, logging.INFO: 1, logging.WARNING: 2, logging.ERROR: 3, logging.CRITICAL: 3}
_MILLISECONDS = tuple(f"{ms:03d}" for ms in range(1000))


class CMTraceFormatter(logging.Formatter):
    """Formats a record as one CMTrace line; ``component`` defaults to the logger's."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component
        self._second = -1
        self._hms = ""
        self._date = ""
        self._tails: dict[tuple[int, int, str], str] = {}

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return self.line(text, record.levelno, record.created, int(record.msecs),
                         record.thread or threading.get_ident(), getattr(record, "component", self.component))

    def line(self, text: str, levelno: int, created: float, msecs: int, thread: int, component: str) -> str:
        """The CMTrace line for a message text (what ``format`` makes of a record)."""
        # "]LOG]!>" inside the text would end the entry early in CMTrace.
        if "]LOG]!>" in text:
            text = text.replace("]LOG]!>", "] LOG]!>")
        second = int(created)
        if second != self._second:  # the time and date parts change once a second
            t = time.gmtime(created)
            self._second = second
            self._hms = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
            self._date = f'+000" date="{t.tm_mon:02d}-{t.tm_mday:02d}-{t.tm_year:04d}" component="'
            self._tails.clear()
        # What follows the milliseconds is the same all second long for a level, thread
        # and component; formatting it (and "%03d") per line was half the line's cost.
        tail = self._tails.get((levelno, thread, component))
        if tail is None:
            tail = self._tails[levelno, thread, component] = (
                f'{self._date}{component}" context="" type="{_TYPES.get(levelno, 1)}" thread="{thread}" file="">')
        ms = _MILLISECONDS[msecs] if 0 <= msecs < 1000 else f"{msecs:03d}"
        return f'<![LOG[{text}]LOG]!><time="{self._hms}.{ms}{tail}'


class CMTraceFileHandler(logging.FileHandler):
    """A log file written line by line, flushed once per event-loop iteration.

    ``FileHandler`` flushes after every record; a connection point writes three lines
    per request, so under load that is three ``write`` system calls per request. Here a
    record is written to the file object at once (in order, whole lines) and the flush
    is deferred until the loop has polled once more (see ``_schedule_flush``): a burst of
    records costs one system call, and a reader of the file still sees every line a
    moment later. Outside an event loop every record is flushed at once, as before.
    """

    def __init__(self, filename: Path, *args: Any, max_bytes: int = 0, **kwargs: Any) -> None:
        super().__init__(filename, *args, **kwargs)
        self._flush_scheduled = False
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flush_thread = 0
        # Size-based rollover as ConfigMgr does it: past max_bytes the file becomes
        # NAME.lo_ (one history file, replaced each time) and a new NAME.log begins.
        self._max_bytes = max_bytes
        try:
            self._size = os.path.getsize(self.baseFilename)
        except OSError:
            self._size = 0

    def _roll_over(self) -> None:
        self.flush()
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
        base = self.baseFilename
        os.replace(base, base[:-4] + ".lo_" if base.endswith(".log") else base + ".lo_")
        self.stream = self._open()
        self._size = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self._append(self.format(record)):
                return
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._schedule_flush()

    def emit_line(self, name: str, level: int, msg: str, args: tuple[object, ...]) -> bool:
        """Write what ``emit`` would write for the record ``(name, level, msg, args)``, without
        making the record; the handler's lock is taken as ``Handler.handle`` does.

        False when ``msg % args`` fails: the caller then takes the record path, which
        reports the error as logging does.
        """
        try:
            text = msg % args if args else msg
        except Exception:
            return False
        formatter: CMTraceFormatter = self.formatter  # type: ignore[assignment]
        created = time.time()  # and its milliseconds, as LogRecord takes them
        thread = threading.get_ident()
        lock = self.lock  # taken as Handler.handle takes it
        lock.acquire()  # type: ignore[union-attr]
        try:
            # Formatted under the lock, as a record is: the formatter caches per second.
            line = formatter.line(text, level, created, int((created - int(created)) * 1000), thread,
                                  formatter.component)
            if not self._append(line):
                return True
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.LogRecord(name, level, "", 0, msg, args, None))
            return True
        finally:
            lock.release()  # type: ignore[union-attr]
        self._schedule_flush(thread)
        return True

    def _append(self, msg: str) -> bool:
        """One line to the file (rolled over past max_bytes); False when the handler is closed."""
        if self.stream is None:
            if self.mode != "w" or not self._closed:  # type: ignore[attr-defined]
                self.stream = self._open()
            else:
                return False
        self.stream.write(msg + self.terminator)
        if self._max_bytes:
            self._size += len(msg) + 1
            if self._size > self._max_bytes:
                self._roll_over()
        return True

    def _schedule_flush(self, thread: int | None = None) -> None:
        if self._flush_scheduled:
            return
        # The loop running in this thread: the one found last time while it still runs
        # here (asyncio.get_running_loop() makes a getpid system call each time).
        if thread is None:
            thread = threading.get_ident()
        loop = self._flush_loop
        if loop is None or self._flush_thread != thread or not loop.is_running():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_loop, self._flush_thread = loop, thread
        self._flush_scheduled = True
        # Written after the loop has polled once more: an answer that came meanwhile (the
        # site role's, to the request just forwarded) goes on first, and its line goes
        # out in the same write.
        loop.call_soon(loop.call_soon, self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()


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


def log_fast(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)`` for a hot path; the caller checks ``isEnabledFor`` first.

    CMTrace lines carry ``file=""``, so the frame walk ``Logger._log`` does for every
    record buys nothing. When the logger's only destination is one CMTrace file (no
    filters, no propagation: what ``open_log`` sets up), the line is written straight to
    it, byte for byte what the record would have made, without building a ``LogRecord``.
    Anything else (JSON lines, an echo to stderr, a test's capture handler) gets a record.
    """
    handlers = logger.handlers
    if len(handlers) == 1 and not logger.propagate and not logger.filters and not logger.disabled:
        h = handlers[0]
        if (h.__class__ is CMTraceFileHandler and level >= h.level and not h.filters
                and h.formatter.__class__ is CMTraceFormatter and (len(args) != 1 or not isinstance(args[0], Mapping))
                and h.emit_line(logger.name, level, msg, args)):  # type: ignore[attr-defined]
            return
    logger.handle(logger.makeRecord(logger.name, level, "", 0, msg, args, None))


def open_log(logger_name: str, path: Path, component: str, fmt: str = "cmtrace",
             level: int = logging.INFO, echo: bool = False, max_bytes: int = 2 * 1024 * 1024) -> logging.Logger:
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
    handler = CMTraceFileHandler(path, encoding="utf-8", max_bytes=max_bytes)
    handler.setFormatter(CMTraceFormatter(component) if fmt == "cmtrace" else JSONFormatter(component))
    handler._cmg_path = str(path)  # type: ignore[attr-defined]
    logger.addHandler(handler)
    if echo:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(f"%(asctime)s {component} %(levelname)s %(message)s"))
        logger.addHandler(stream)
    return logger
