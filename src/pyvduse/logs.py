"""Where the daemon's log lines go and what they look like (``--log-format``).

* ``text``: ``2026-12-05 15:14:27.123 WARNING pyvduse: vd0: ...`` on stderr, one line
  per record (a traceback follows on its own lines);
* ``journal``: what systemd's journal wants on a service's stderr: a
  ``<priority>`` prefix (``sd-daemon(3)``: ``<3>`` error, ``<4>`` warning, ``<6>``
  info, ``<7>`` debug) and no timestamp (the journal adds its own), a traceback
  folded onto the same line;
* ``json``: one JSON object per line (``time``, ``level``, ``logger``, ``thread``,
  ``message``, and ``exception`` with a traceback), for log collectors;
* ``auto`` (the default): ``journal`` when stderr is the journal's stream
  (``$JOURNAL_STREAM`` names its device and inode), else ``text``.

Messages about one export begin with its id (``vd0: ...``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

__all__ = ["LOG_FORMATS", "resolve_format", "setup_logging"]

LOG_FORMATS = ("auto", "text", "journal", "json")
"""The values of ``--log-format``."""

_JOURNAL_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
                     logging.INFO: 6, logging.DEBUG: 7}


def stderr_is_journal(stream: TextIO | None = None,
                      journal_stream: str | None = None) -> bool:
    """Whether ``stream`` (stderr) is the connection ``$JOURNAL_STREAM`` names."""
    value = os.environ.get("JOURNAL_STREAM", "") if journal_stream is None else journal_stream
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def resolve_format(fmt: str) -> str:
    """``auto`` resolved to ``journal`` or ``text``; other formats as they are."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (choose from {', '.join(LOG_FORMATS)})")
    if fmt == "auto":
        return "journal" if stderr_is_journal() else "text"
    return fmt


class JournalFormatter(logging.Formatter):
    """``<priority>message``, a traceback folded onto the line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        level = max((lvl for lvl in _JOURNAL_PRIORITY if lvl <= record.levelno), default=10)
        return f"<{_JOURNAL_PRIORITY.get(level, 7)}>{text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}"
                    + _utc_offset(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def _utc_offset(created: float) -> str:
    """The local time zone's offset at ``created``, as ``+HH:MM``."""
    offset = time.localtime(created).tm_gmtoff
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return f"{sign}{offset // 3600:02d}:{offset % 3600 // 60:02d}"


def setup_logging(logger: logging.Logger, level: str, fmt: str = "auto",
                  stream: TextIO | None = None) -> str:
    """Send ``logger``'s records at ``level`` and above to ``stream`` (stderr) in
    format ``fmt``; return the format used (``auto`` resolved)."""
    used = resolve_format(fmt)
    handler = logging.StreamHandler(stream or sys.stderr)
    detail = "%(threadName)s %(name)s: " if level == "debug" else "pyvduse: "
    if used == "journal":
        handler.setFormatter(JournalFormatter(detail + "%(message)s"))
    elif used == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s " + detail + "%(message)s",
            datefmt="%Y-%m-%d %H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    return used
