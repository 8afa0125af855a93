"""systemd's service notification protocol (``sd_notify(3)``), without libsystemd.

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET``: a Unix datagram
socket (a path, or ``@name`` in the abstract namespace) that takes
newline-separated ``KEY=VALUE`` lines such as ``READY=1``, ``STATUS=...``,
``STOPPING=1`` and ``WATCHDOG=1``. With ``WatchdogSec=`` it also passes
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process meant): the service must
send ``WATCHDOG=1`` more often than that, or systemd restarts it.

:class:`Notifier` is a no-op where ``$NOTIFY_SOCKET`` is not set, and never
raises: a notification that cannot be sent is logged once at debug level (the
service goes on; systemd then times it out, which says more than a crash would).

It never stalls the daemon either. A datagram socket whose reader has fallen
behind holds only ``net.unix.max_dgram_qlen`` messages (10 unless systemd's
sysctl raised it), after which a blocking send waits for the reader. So a
notification waits at most :data:`SEND_TIMEOUT` for room, and a ``WATCHDOG=1``
ping not at all: a ping that finds the queue full is dropped (the next one,
half a timeout later, tries again).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier"]

#: Seconds a notification other than a watchdog ping waits for room in the socket.
SEND_TIMEOUT = 1.0


class Notifier:
    """Sends notifications to ``address`` (None: nowhere); ``watchdog_usec`` is the
    watchdog timeout systemd asked for (None: no watchdog)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address is not None else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_watchdog = 0.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd's environment describes: ``$NOTIFY_SOCKET``, and
        ``$WATCHDOG_USEC`` when ``$WATCHDOG_PID`` is unset or this process's pid."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        pid = env.get("WATCHDOG_PID", "")
        if env.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            usec = int(env["WATCHDOG_USEC"]) or None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half the timeout, as systemd advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, wait: float = SEND_TIMEOUT, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``send(READY=1, STATUS="...")``); whether it was sent.
        A newline in a value is replaced by a blank (one line per field). It waits at
        most ``wait`` seconds (0: not at all) for room in a full socket."""
        if self.address is None:
            return False
        text = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}"
                         for key, value in fields.items())
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(wait if wait > 0 else 0.0)
            self._sock.sendto(text.encode(), target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.debug("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        """``READY=1`` with a ``STATUS=`` line."""
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        """A ``STATUS=`` line (``systemctl status`` shows the latest)."""
        return self.send(STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.send(STOPPING=1, STATUS=status)

    def watchdog_due(self, now: float | None = None) -> bool:
        """Whether a ``WATCHDOG=1`` ping is due (never without a watchdog)."""
        interval = self.watchdog_interval
        if interval is None:
            return False
        return (time.monotonic() if now is None else now) - self._last_watchdog >= interval

    def watchdog(self, now: float | None = None) -> bool:
        """Send ``WATCHDOG=1`` without waiting, and remember when."""
        self._last_watchdog = time.monotonic() if now is None else now
        return self.send(wait=0, WATCHDOG=1)

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
