"""The file backend with every read and write delayed by a random 0 to 3 ms.

For the crash-recovery tests: served on a thread pool (``--io-threads 8
--io-threads-min 4k``), requests complete in an order unrelated to the order
they were taken in, which is the case a restart must get right (and the case
that a restart trusting the used index gets wrong).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from pyvduse.backends.file import FileBackend


def _jitter() -> None:
    time.sleep(random.random() * 0.003)


class JitterFileBackend(FileBackend):
    """:class:`FileBackend` whose transfers take a random extra 0-3 ms each."""

    def read(self, offset: int, buf: memoryview) -> None:
        _jitter()
        super().read(offset, buf)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        _jitter()
        super().readv(offset, bufs)

    def write(self, offset: int, buf: memoryview) -> None:
        _jitter()
        super().write(offset, buf)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        _jitter()
        super().writev(offset, bufs)
