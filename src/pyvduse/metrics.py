"""Request metrics: what each export served, by type, outcome and latency.

Collected only when the daemon is asked for them (``--metrics`` or
``--control``): an export built without them pays nothing. Read by the
control socket's ``query-stats`` and by the Prometheus endpoint
(:mod:`pyvduse.prometheus`), both through :meth:`ExportMetrics.snapshot`.

Each export's numbers come from two places, added up when they are read:

* :class:`RequestCounters`: the requests the Python path answers
  (:class:`~pyvduse.blk.handler.BlkHandler`), recorded from whichever thread
  finishes them by the compiled module's ``count_request()`` under the GIL (or,
  without the module, by Python code under a lock);
* one block of :data:`QUEUE_CELLS` unsigned 64-bit cells per queue
  (:meth:`ExportMetrics.queue_cells`), written without a lock by the one thread
  that serves the queue: the compiled path's reads, writes and flushes
  (``fastpath_core.h``, which only ever completes requests that succeeded;
  every failure is answered by the Python path) and the serving loop's
  polling counts (the compiled loop's and :class:`~pyvduse.queue_worker.QueueThread`'s).

A request is counted once, when it is answered. Its latency runs from the
moment the daemon starts on it (the compiled path: when it takes the request
from the ring; the Python path: when the handler gets it) to its answer.
"""

from __future__ import annotations

import functools
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

__all__ = [
    "LATENCY_BOUNDS_NS",
    "QUEUE_CELLS",
    "STATUSES",
    "TYPES",
    "ExportMetrics",
    "RequestCounters",
]

#: Request types, in cell order. ``other``: an unknown type, or a chain too malformed
#: to carry one (no status byte, or a short header).
TYPES = ("read", "write", "flush", "discard", "write-zeroes", "get-id", "other")
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES, GET_ID, OTHER = range(len(TYPES))

#: The error statuses a request can end with (a chain without a status byte counts
#: as ``ioerr``).
STATUSES = ("ioerr", "unsupp")

#: Upper bounds (inclusive, nanoseconds) of the latency histogram's buckets; a last
#: bucket takes the rest. ``fastpath_core.h`` has the same list.
LATENCY_BOUNDS_NS = (
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000,
    1_000_000_000, 2_500_000_000, 5_000_000_000, 10_000_000_000,
)
BUCKETS = len(LATENCY_BOUNDS_NS) + 1

#: One request type's cells: requests, bytes (of those that succeeded), latency sum
#: in nanoseconds, then one count per latency bucket.
TYPE_CELLS = 3 + BUCKETS
_COUNT, _BYTES, _SUM = 0, 1, 2

#: A queue's block: the compiled path's read, write and flush cells, then polling.
NATIVE_TYPES = 3
POLL_HITS = NATIVE_TYPES * TYPE_CELLS
"""Times the serving thread polled the ring and found work."""
POLL_SLEEPS = POLL_HITS + 1
"""Times the serving thread went to sleep until a kick or a completion."""
QUEUE_CELLS = POLL_SLEEPS + 1

_ERRORS = len(TYPES) * TYPE_CELLS  # RequestCounters: ioerr, unsupp after the types
_S_OK, _S_IOERR, _S_UNSUPP = 0, 1, 2  # virtio-blk statuses

_now_ns = time.monotonic_ns


def _compiled_counter() -> Callable[..., None] | None:
    """The compiled module's ``count_request`` (the same cells, a quarter of the
    time, no lock: it runs under the GIL), or None without the module."""
    try:
        from pyvduse import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        return None
    count: Callable[..., None] | None = getattr(_fastpath, "count_request", None)
    return count


_count_request = _compiled_counter()


class RequestCounters:
    """The Python path's requests of one export. Thread-safe.

    ``compiled=False`` counts in Python even where the compiled module is there (the
    two give the same cells; the tests hold them to it)."""

    def __init__(self, compiled: bool = True) -> None:
        self._lock = threading.Lock()
        self.cells = memoryview(bytearray(8 * (_ERRORS + len(STATUSES)))).cast("Q")
        if compiled and _count_request is not None:
            self.record = functools.partial(_count_request, self.cells)  # type: ignore[method-assign]

    def record(self, kind: int, status: int, nbytes: int, started_ns: int) -> None:
        """Count one answered request: type index ``kind`` (of :data:`TYPES`), its
        virtio-blk ``status``, the data bytes it moved (counted only on success), and
        when the daemon started on it (``time.monotonic_ns()``)."""
        elapsed = _now_ns() - started_ns
        base = kind * TYPE_CELLS
        bucket = base + 3 + bisect_left(LATENCY_BOUNDS_NS, elapsed)
        with self._lock:
            cells = self.cells
            cells[base + _COUNT] += 1
            cells[base + _SUM] += elapsed
            cells[bucket] += 1
            if status == _S_OK:
                cells[base + _BYTES] += nbytes
            else:
                cells[_ERRORS + (status == _S_UNSUPP)] += 1

    def copy(self) -> list[int]:
        """The cells as they are now."""
        with self._lock:  # (the compiled counter holds the GIL: tolist() sees it whole)
            return self.cells.tolist()


class ExportMetrics:
    """Everything counted for one export: :attr:`requests` and the queues' blocks."""

    def __init__(self) -> None:
        self.requests = RequestCounters()
        self._queues: dict[int, memoryview] = {}
        self._lock = threading.Lock()

    def queue_cells(self, index: int) -> memoryview:
        """Queue ``index``'s block (a ``"Q"`` memoryview of :data:`QUEUE_CELLS`), the
        same one for the export's whole life: only the thread serving the queue writes
        it (a restarted queue goes on counting)."""
        with self._lock:
            cells = self._queues.get(index)
            if cells is None:
                cells = self._queues[index] = memoryview(bytearray(8 * QUEUE_CELLS)).cast("Q")
            return cells

    def snapshot(self) -> dict[str, Any]:
        """The counts as plain data (JSON-ready), every type and status present:

        ``requests``, ``bytes``: by type; ``errors``: by status; ``latency``: by type,
        each ``{"count", "sum-ns", "buckets"}`` (``buckets``: cumulative counts, one per
        bound of ``bounds-ns`` and a last one for all); ``polls``: ``hits`` and
        ``sleeps``. Counters only grow.
        """
        cells = self.requests.copy()
        with self._lock:
            blocks = [block.tolist() for block in self._queues.values()]
        hits = sleeps = 0
        for block in blocks:
            for i in range(NATIVE_TYPES * TYPE_CELLS):
                cells[i] += block[i]
            hits += block[POLL_HITS]
            sleeps += block[POLL_SLEEPS]
        latency: dict[str, Any] = {"bounds-ns": list(LATENCY_BOUNDS_NS)}
        for kind, name in enumerate(TYPES):
            base = kind * TYPE_CELLS
            running, cumulative = 0, []
            for count in cells[base + 3: base + TYPE_CELLS]:
                running += count
                cumulative.append(running)
            latency[name] = {"count": cells[base], "sum-ns": cells[base + _SUM],
                             "buckets": cumulative}
        return {
            "requests": {name: cells[k * TYPE_CELLS] for k, name in enumerate(TYPES)},
            "bytes": {name: cells[k * TYPE_CELLS + _BYTES] for k, name in enumerate(TYPES)},
            "errors": {name: cells[_ERRORS + i] for i, name in enumerate(STATUSES)},
            "latency": latency,
            "polls": {"hits": hits, "sleeps": sleeps},
        }
