"""Run a synchronous backend's requests on a pool of threads.

:class:`ThreadPoolBackend` wraps any :class:`~pyvduse.backends.base.Backend`
and implements its ``submit_*`` methods by queueing the synchronous call for
one of ``threads`` worker threads, so one virtqueue can have up to
``threads`` requests in the backend at once. That pays off when a request
spends its time outside the interpreter (``os.preadv`` of a megabyte, a
network round trip), not for small requests whose cost is Python code: those
(below ``min_bytes``) still run on the queue's own thread.

The wrapped backend is called from the pool's threads and, for small requests,
from the queue threads, concurrently: it must be thread-safe, as the
threading contract of every backend already requires.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from pyvduse.backends.base import Backend, Done, EventSink, run_and_report
from pyvduse.native import NativeTarget

log = logging.getLogger(__name__)

DEFAULT_MIN_BYTES = 64 << 10
"""Requests this large or larger go to the pool by default (smaller ones cost more to hand over)."""

_Job = tuple[Done, Callable[..., None], tuple[object, ...]]


class ThreadPoolBackend(Backend):
    """``backend`` with its requests of ``min_bytes`` or more run on ``threads`` threads.

    Capabilities, size and block size are the wrapped backend's, and
    :meth:`resize` is its ``resize``, run on the caller's thread (so
    :attr:`can_resize` is the wrapped backend's too). :attr:`event_sink` is the
    wrapped backend's: setting it here sets it there, so the events the wrapped
    backend emits reach the daemon. :meth:`close` lets queued requests finish,
    stops the threads and closes the wrapped backend.
    """

    def __init__(self, backend: Backend, threads: int,
                 min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        if threads < 1:
            raise ValueError(f"a thread pool needs at least one thread, not {threads}")
        if min_bytes < 0:
            raise ValueError(f"min_bytes must not be negative, not {min_bytes}")
        self.backend = backend
        self.name = backend.name
        self.submit_min_bytes = min_bytes
        self.resizable = backend.resizable
        # Small requests run on the queue's thread: straight into the wrapped backend,
        # without a call through the methods below (one call less per request). Those
        # stay: they tell the backend contract that this class reads and writes.
        self.read = backend.read  # type: ignore[method-assign]
        self.readv = backend.readv  # type: ignore[method-assign]
        self.write = backend.write  # type: ignore[method-assign]
        self.writev = backend.writev  # type: ignore[method-assign]
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"io-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            done, method, args = job
            try:
                run_and_report(done, method, *args)
            except Exception:  # done itself failed: nothing else can report it
                log.exception("a request's completion failed")

    # -- the wrapped backend, synchronously ------------------------------------------------

    def size(self) -> int:
        return self.backend.size()

    @property
    def preferred_block_size(self) -> int:
        return self.backend.preferred_block_size

    @property
    def event_sink(self) -> EventSink | None:
        """The wrapped backend's sink (it is the one that emits events)."""
        return self.backend.event_sink

    @event_sink.setter
    def event_sink(self, sink: EventSink | None) -> None:
        self.backend.event_sink = sink

    @property
    def can_write(self) -> bool:
        return self.backend.can_write

    @property
    def can_flush(self) -> bool:
        return self.backend.can_flush

    @property
    def can_discard(self) -> bool:
        return self.backend.can_discard

    @property
    def can_write_zeroes(self) -> bool:
        return self.backend.can_write_zeroes

    @property
    def can_resize(self) -> bool:
        return self.backend.can_resize

    def resize(self, size: int, *, shrink: bool = False) -> None:
        self.backend.resize(size, shrink=shrink)

    def read(self, offset: int, buf: memoryview) -> None:
        self.backend.read(offset, buf)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.backend.readv(offset, bufs)

    def write(self, offset: int, buf: memoryview) -> None:
        self.backend.write(offset, buf)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.backend.writev(offset, bufs)

    def flush(self) -> None:
        self.backend.flush()

    def discard(self, offset: int, length: int) -> None:
        self.backend.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.backend.write_zeroes(offset, length, may_unmap)

    def native_target(self) -> NativeTarget | None:
        """The wrapped backend's: requests below ``min_bytes`` go straight to it anyway."""
        return self.backend.native_target()

    def reconnections(self) -> int:
        """The wrapped backend's."""
        return self.backend.reconnections()

    @property
    def native_refusal(self) -> str:  # type: ignore[override]
        """The wrapped backend's."""
        return self.backend.native_refusal

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self.backend.close()

    # -- the same requests on the pool -------------------------------------------------------

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        self._jobs.put((done, self.backend.readv, (offset, bufs)))

    def submit_writev(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        self._jobs.put((done, self.backend.writev, (offset, bufs)))

    def submit_flush(self, done: Done) -> None:
        self._jobs.put((done, self.backend.flush, ()))

    def submit_discard(self, offset: int, length: int, done: Done) -> None:
        self._jobs.put((done, self.backend.discard, (offset, length)))

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                            done: Done) -> None:
        self._jobs.put((done, self.backend.write_zeroes, (offset, length, may_unmap)))
