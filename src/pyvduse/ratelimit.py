"""Rate-limited logging, for messages a driver or a server can trigger at any rate.

A driver that keeps sending malformed requests, or a server that keeps
breaking the protocol, must neither flood the log nor make the data path pay
for formatting lines nobody will read. :class:`RateLimitedLog` lets at most
``burst`` messages per key through in each ``interval`` seconds and counts
the rest; the first message let through after some were suppressed carries a
note saying how many (``... (N similar messages suppressed in the last 5 s)``),
and :meth:`RateLimitedLog.flush` reports the ones still owed when no message
follows them.

A suppressed message costs a clock reading, a lock and a dictionary look-up:
it is never formatted (pass the format and its arguments separately, as to
:meth:`logging.Logger.log`).

This is a leaf module: it imports nothing from pyvduse, so that any module
(backends included) may use it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable

__all__ = ["DEFAULT_NOTE", "RateLimitedLog", "flush_all"]

_instances: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()


def flush_all(force: bool = False) -> int:
    """:meth:`RateLimitedLog.flush` every limiter alive; return the lines logged.

    For a daemon's periodic tick: counts of suppressed messages that no later
    message carried are reported within about one interval.
    """
    return sum(limiter.flush(force) for limiter in list(_instances))

#: The note added to a message let through after others were suppressed. Its fields:
#: ``count`` (how many), ``s`` (``"s"`` unless ``count`` is 1) and ``seconds`` (how long
#: the suppressed messages took, at most: the time since the window they fell in began).
DEFAULT_NOTE = "{count} similar message{s} suppressed in the last {seconds} s"

ExcInfo = BaseException | bool | None


class _Window:
    """What one key logged since ``start``: ``count`` messages let through, ``suppressed``
    left out (the last of which is kept for :meth:`RateLimitedLog.flush`)."""

    __slots__ = ("args", "count", "level", "msg", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 1
        self.suppressed = 0
        self.level = logging.NOTSET
        self.msg = ""
        self.args: tuple[object, ...] = ()


class RateLimitedLog:
    """Logs to ``logger``, at most ``burst`` messages per key in each ``interval`` seconds.

    A key's window opens with the first message let through and lasts
    ``interval`` seconds (read from :attr:`interval` at every call, so it may
    be changed at any time; 0 lets every message through). Within it the
    first ``burst`` messages are logged and the others are only counted. The
    first message of the key's next window gets ``note`` appended in
    parentheses (a :meth:`str.format` template, :data:`DEFAULT_NOTE` by
    default). Messages whose level ``logger`` does not log are ignored
    altogether.

    Keys are any hashable values naming a kind of message (a fixed, small
    set: state is kept per key until :meth:`flush` finds its window ended).
    ``clock`` gives the time in seconds (:func:`time.monotonic` by default;
    tests pass their own). Thread-safe; ``logger`` is called without the
    internal lock held.
    """

    def __init__(self, logger: logging.Logger, interval: float = 5.0, burst: int = 10, *,
                 clock: Callable[[], float] = time.monotonic, note: str = DEFAULT_NOTE) -> None:
        if not interval >= 0:
            raise ValueError(f"interval must be 0 or more seconds, not {interval!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._note = note
        self._lock = threading.Lock()
        self._windows: dict[Hashable, _Window] = {}
        _instances.add(self)

    def log(self, level: int, key: Hashable, msg: str, *args: object,
            exc_info: ExcInfo = None) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` used up its burst; True if logged.

        ``exc_info`` is passed on to the logger for a message let through.
        """
        return self._log(level, key, msg, args, exc_info)

    def warning(self, key: Hashable, msg: str, *args: object, exc_info: ExcInfo = None) -> bool:
        """:meth:`log` at ``WARNING``."""
        return self._log(logging.WARNING, key, msg, args, exc_info)

    def error(self, key: Hashable, msg: str, *args: object, exc_info: ExcInfo = None) -> bool:
        """:meth:`log` at ``ERROR``."""
        return self._log(logging.ERROR, key, msg, args, exc_info)

    def _log(self, level: int, key: Hashable, msg: str, args: tuple[object, ...],
             exc_info: ExcInfo) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        since = now
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(now)
                suppressed = 0
            elif now - window.start < self.interval:
                if window.count >= self.burst:
                    window.suppressed += 1
                    window.level, window.msg, window.args = level, msg, args
                    return False
                window.count += 1
                suppressed = 0
            else:  # a new window
                suppressed, since = window.suppressed, window.start
                window.start, window.count, window.suppressed = now, 1, 0
                window.msg, window.args = "", ()
        if suppressed:
            msg, args = self._noted(msg, args, suppressed, now - since)
        # stacklevel: the record names the caller of log(), warning() or error().
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=3)
        return True

    def flush(self, force: bool = False) -> int:
        """Report the messages suppressed in windows that have ended; return lines logged.

        For each such key, the last suppressed message is logged, with the
        note counting the others; the key then starts afresh (its state is
        dropped). ``force`` reports the suppressed messages of open windows
        too (for a summary at shutdown); those windows stay open. Meant to be
        called now and then (e.g. once per interval) by whoever has a
        periodic tick, so that the count of a burst nothing follows is not
        lost.
        """
        now = self._clock()
        owed: list[tuple[int, str, tuple[object, ...], int, float]] = []
        with self._lock:
            for key, window in list(self._windows.items()):
                ended = now - window.start >= self.interval
                if window.suppressed and (ended or force):
                    owed.append((window.level, window.msg, window.args, window.suppressed,
                                 now - window.start))
                    window.suppressed = 0
                    window.msg, window.args = "", ()
                if ended:
                    del self._windows[key]
        for level, msg, args, suppressed, seconds in owed:
            if suppressed > 1:
                msg, args = self._noted(msg, args, suppressed - 1, seconds)
            self.logger.log(level, msg, *args, stacklevel=2)
        return len(owed)

    def _noted(self, msg: str, args: tuple[object, ...], count: int,
               seconds: float) -> tuple[str, tuple[object, ...]]:
        """``msg`` and ``args`` with the note about ``count`` suppressed messages appended."""
        note = self._note.format(count=count, s="" if count == 1 else "s",
                                 seconds=_seconds(seconds))
        if args:  # the logger will apply %: the note goes in as an argument
            return f"{msg} (%s)", (*args, note)
        return f"{msg} ({note})", args


def _seconds(value: float) -> str:
    """A duration for humans: ``0.3``, ``5``, ``5.2``, ``3600``."""
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.2g}"
