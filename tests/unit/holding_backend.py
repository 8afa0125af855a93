"""A RAM-disk backend that holds chosen requests until the test releases them.

Shared by the unit tests of the transport-neutral device and of the
vhost-user server: a request held in the backend is "in flight", which is
what stopping, disconnecting and resetting must get right.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from pyvduse.backends.base import Done, run_and_report
from pyvduse.backends.memory import MemoryBackend


class HoldingBackend(MemoryBackend):
    """A RAM disk whose reads and writes at the offsets in :attr:`hold_at` wait for
    :meth:`release` (from any thread); the others complete at once."""

    submit_min_bytes = 0

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.hold_at: set[int] = set()
        self.cond = threading.Condition()
        self.held: list[Callable[[], None]] = []

    def _submit(self, run: Callable[[], None], offset: int) -> None:
        with self.cond:
            if offset in self.hold_at:
                self.held.append(run)
                self.cond.notify_all()
                return
        run()

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        self._submit(lambda: run_and_report(done, self.readv, offset, bufs), offset)

    def submit_writev(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        self._submit(lambda: run_and_report(done, self.writev, offset, bufs), offset)

    def wait_held(self, count: int, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.held) >= count, timeout), (
                f"{len(self.held)} request(s) held, expected {count}")

    def release(self) -> int:
        with self.cond:
            held, self.held = self.held, []
            self.hold_at.clear()
        for run in held:
            run()
        return len(held)

    def bytes_at(self, offset: int, length: int) -> bytes:
        return bytes(self._view[offset:offset + length])
