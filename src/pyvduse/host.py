"""The daemon's dealings with the host: signals, its parent, readiness and status.

* :class:`Signals`: SIGINT and SIGTERM stop the daemon; SIGHUP, SIGUSR1 and
  SIGUSR2 never kill it (their default action would, without any cleanup):
  SIGUSR1 logs every export's statistics, SIGHUP and SIGUSR2 are logged and
  otherwise ignored (there is no configuration file to reload: exports change
  through the control socket).
* :func:`exit_with_parent`: ``--exit-with-parent``, the daemon gets SIGTERM (and
  so stops cleanly) when the process that started it dies.
* :func:`status_lines` / :func:`write_status`: one JSON object per export once
  it is ready, on stdout or in ``--status-file``.
* :func:`wait_for_nodes`: readiness waits until every device node exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

from pyvduse.errors import PyvduseError

__all__ = ["Signals", "exit_with_parent", "status_lines", "wait_for_nodes", "write_atomically",
           "write_status"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INFO_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1  # prctl(2)


class Signals:
    """Records the signals the daemon handles; :attr:`wake` is set on each, so the
    main loop waits on it and then looks at :attr:`stop_signal` and
    :meth:`take_info`."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop_signal: int | None = None
        self._info: list[int] = []

    def install(self) -> None:
        """Handle the stop and information signals (main thread only)."""
        for signum in (*STOP_SIGNALS, *INFO_SIGNALS):
            signal.signal(signum, self._handler)

    @property
    def stopping(self) -> bool:
        """Whether a stop signal arrived."""
        return self.stop_signal is not None

    def stop(self) -> None:
        """Stop as if signalled (``quit`` on the control socket)."""
        self.wake.set()
        if self.stop_signal is None:
            self.stop_signal = 0

    def take_info(self) -> list[int]:
        """The information signals received since the last call, oldest first."""
        taken, self._info = self._info, []
        return taken

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if signum in STOP_SIGNALS:
            self.stop_signal = signum
        else:
            self._info.append(signum)
        self.wake.set()


def exit_with_parent() -> None:
    """Have the kernel send SIGTERM to this process when its parent dies.

    Raises :class:`PyvduseError` if the parent is gone already or the kernel
    refuses (not Linux)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    except (OSError, AttributeError) as exc:
        raise PyvduseError(f"--exit-with-parent: prctl(PR_SET_PDEATHSIG): {exc}") from None
    if os.getppid() != parent or parent == 1:  # it died before prctl took effect
        raise PyvduseError("--exit-with-parent: the parent process is gone already")


def wait_for_nodes(paths: Iterable[str | None], timeout: float = 10.0) -> list[str]:
    """Wait until every path (None: nothing to wait for) exists, at most ``timeout``
    seconds; return those still missing."""
    deadline = time.monotonic() + timeout
    missing = [path for path in paths if path is not None]
    while True:
        missing = [path for path in missing if not os.path.exists(path)]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.05)


def status_lines(statuses: Iterable[dict[str, Any]]) -> str:
    """One compact JSON object per line."""
    return "".join(json.dumps(status, separators=(",", ":")) + "\n" for status in statuses)


def write_status(text: str, path: str | None) -> None:
    """``text`` to stdout (flushed), or atomically into ``path``.

    A stdout that is closed or a pipe nobody reads costs the status line only (the
    daemon serves all the same); a status file that cannot be written is an error.
    """
    if path is None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (OSError, AttributeError, ValueError) as exc:  # closed, None, or EPIPE
            logging.getLogger("pyvduse").warning("the status line could not be written to "
                                                 "stdout: %s", exc)
        return
    write_atomically(path, text, "status file")


def write_atomically(path: str, text: str, what: str) -> None:
    """Replace ``path`` with a file holding ``text`` (a temporary file renamed: a
    reader sees the old content or the new, never a part). Raises
    :class:`PyvduseError` naming ``what`` on failure, leaving no temporary file."""
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temp, "w") as stream:
            stream.write(text)
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise PyvduseError(f"cannot write {what} {path}: {exc.strerror}") from None
