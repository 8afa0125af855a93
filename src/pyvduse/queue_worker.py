"""Serving virtqueues: per-queue request processing, and the threads that run it.

Transport-agnostic: VDUSE and vhost-user both deliver kicks on an eventfd
and take interrupts through a callable.

A :class:`QueueWorker` holds one queue's serving state and drains it; a
:class:`QueueThread` waits for kicks on one or more queues and drains each
that has work, round-robin, a bounded number of batches at a time so that no
queue starves the others. The device decides how many threads serve its
queues (one for all of them by default: with the GIL, threads would mostly
contend for it, while a single thread batches the queues' work).

A request is completed either at once (the handler returns the bytes it
wrote into the chain) or later (the handler returns :data:`PENDING` and calls
the ``complete`` callable it was given, from any thread, when the backend is
done). Whoever pushes to the used ring holds the queue's ring lock: the
serving thread for the whole of each batch, or the thread that completes a
request while the serving thread is not in a batch, which then pushes,
publishes and interrupts the driver itself (one thread wake-up less per
request). A completion arriving during a batch reaches the serving thread
through a queue and an eventfd instead: the completing thread never waits for
the lock. A backend thread that completes many requests in a row (a network
reader with many replies in hand) wraps them in :func:`deferred_interrupts`:
each is still pushed and published at once, but the driver is interrupted
once per queue for all of them.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from pyvduse.errors import RingError
from pyvduse.inflight import QueueLog
from pyvduse.metrics import POLL_HITS, POLL_SLEEPS
from pyvduse.native import LOOP_WOKEN, NativeIrq, NativePlan, NativeRing
from pyvduse.ratelimit import RateLimitedLog
from pyvduse.virtqueue import Chain, ChainError, SplitQueue

log = logging.getLogger(__name__)
_driver_log = RateLimitedLog(log)  # lines a driver can cause at will: a few per key and interval

PENDING = -1
"""Returned by a :data:`RequestHandler` that will complete the chain later."""

Completer = Callable[[int, int], None]
"""``complete(head, written)``: finish the chain whose first descriptor is ``head``.

Callable from any thread, exactly once per pending chain.
"""

RequestHandler = Callable[[Chain, Completer], int]
"""Serves one chain: returns the bytes written into it, or :data:`PENDING` after
arranging for ``complete(chain.head, written)`` to be called. Must not raise."""

BATCHES_PER_TURN = 4
"""Batches a queue may serve before its thread looks at its other queues."""

SPLIT_MIN = 8
"""A batch of at least this many requests found when the ring had run dry is served in two
halves, the first half's completions published (and signalled) before the second starts."""

POLL_START_NS = 4_000
"""The first polling window a queue thread tries once polling pays (it doubles from there)."""

POLL_BURST_MAX = 2
"""A queue thread polls only after a burst of at most this many requests (those served
since it last ran dry). Polling is for a driver that waits for each request before it
sends the next: a deeper driver keeps the ring busy by itself, and a polling thread only
takes a CPU from it (4K QD32 in the 2-vCPU benchmark guest: 16.6 k IOPS polling, 23.3 k
not)."""

_STUCK_LOG_INTERVAL = 10.0  # seconds between reports of requests that do not finish

JOIN_TIMEOUT = 5.0
"""Seconds :meth:`QueueThread.stop` waits for its thread (a control message may not wait
longer: the kernel gives it 30 s in all)."""


def _nothing() -> None:
    pass


_this_thread = threading.local()  # .owed: the workers whose interrupt a burst defers


@contextmanager
def deferred_interrupts() -> Iterator[Callable[[], None]]:
    """Interrupt the driver once per queue for the completions made in this block.

    For a backend thread that completes several requests in a row: within
    the block, a completion made on this thread is pushed and published as
    usual but its interrupt waits for the block's end, or for a call of the
    callable the block yields (call it before blocking, e.g. before waiting
    for more replies, so that no completion's interrupt waits on the
    network). Blocks on one thread do not nest: an inner block adds to the
    outer one. Never waits for a queue's thread: if that thread is in a batch,
    it sends the interrupt itself.
    """
    if getattr(_this_thread, "owed", None) is not None:  # an outer block signals
        yield _nothing
        return
    owed: dict[QueueWorker, None] = {}

    def signal() -> None:
        while owed:
            worker, _ = owed.popitem()
            worker._signal_deferred()

    _this_thread.owed = owed
    try:
        yield signal
    finally:
        _this_thread.owed = None
        signal()


def _clear(fd: int) -> None:
    """Reset an eventfd that poll reported readable (another reader may have raced us)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class QueueWorker:
    """The serving state of one queue: drains it, takes later completions.

    Per :meth:`drain` it collects finished requests, pops every available
    chain with kicks suppressed and hands it to the handler (each batch between
    ``plug`` and ``unplug``, which must not raise: see
    :meth:`pyvduse.backends.base.Backend.plug`), publishes the used index once
    per batch and interrupts the driver once per batch if the driver asked
    for it (EVENT_IDX or the NO_INTERRUPT flag). Run by a :class:`QueueThread`.

    A batch is all the chains available when it starts, except the first
    batch after the ring ran dry, when it holds :data:`SPLIT_MIN` or more:
    that one is served in two halves. Such a lump means that the driver and
    the device take turns, the driver waiting for all its requests before it
    handles them and submits the next lump at once (a user-space driver:
    libblkio's blocking ``blkioq_do_io``); handing back the first half early
    lets the driver work on it while the device serves the rest (libblkio
    through Python at queue depth 32 in the benchmark guest: 2x the IOPS,
    docs/benchmarks/2026-12-05-vhost-vdpa). A driver that resubmits as its
    requests complete (Linux's virtio-blk) keeps the ring from running dry
    and its batches whole.

    The inflight record (``log``, see :mod:`pyvduse.inflight`) is kept at the
    two choke points: every head is marked in it right after it is popped and
    before its request starts, and cleared right after it is published
    (:meth:`publish`). Without a ``log`` the same stores go to memory no file
    keeps, so the data path is the same with and without crash recovery.
    """

    def __init__(self, name: str, queue: SplitQueue, handle: RequestHandler, kick_fd: int,
                 notify: Callable[[], None], plug: Callable[[], None] | None = None,
                 unplug: Callable[[], None] | None = None,
                 log: QueueLog | None = None, native: NativePlan | None = None,
                 cells: memoryview | None = None) -> None:
        self.name = name
        #: The queue's metrics block (see :mod:`pyvduse.metrics`), or None: not counted.
        self.cells = cells
        # Called around each batch of requests handled (Backend.plug/unplug), if given.
        self._plugs = plug is not None or unplug is not None
        self._plug = plug or _nothing
        self._unplug = unplug or _nothing
        self.queue = queue
        self.kick_fd = kick_fd
        self._handle = handle
        self._notify = notify
        #: Signalled by :meth:`complete`; the serving thread polls it.
        self.done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: deque[tuple[int, int]] = deque()
        #: Held by whoever pushes to the used ring: the serving thread for a whole
        #: batch, :meth:`complete` on another thread for one completion.
        self.ring_lock = threading.Lock()
        #: A completion's deferred interrupt is left to the serving thread (in a batch then).
        self._interrupt_owed = False
        #: Set when the thread stops taking requests: :meth:`drain` returns at once.
        self.stopping = False
        #: Set when the driver broke the ring: the queue is not drained again until reset.
        self.broken = False
        #: The ring ran dry since the last batch: the next one may be split (see the class).
        self._dry = True
        #: Requests popped from the ring by Python code (see :attr:`requests`).
        self._requests = 0
        #: Requests handed to the backend and not yet completed.
        self.inflight = 0
        self.bad_chains = 0
        #: Set (with :attr:`stopping`) once the queue is given up (reset, destroy):
        #: completions arriving later are dropped.
        self.detached = False
        self._fd_lock = threading.Lock()  # done_fd is written by other threads, closed by stop
        self._log = log if log is not None else QueueLog.in_memory(queue.size)
        self._slots = self._log.slots
        self._log_header = self._log.header
        #: The used index up to which published heads are cleared from the log.
        self._log_used = self._log_header[0]
        #: Pop sequence number of the next head taken (orders a resubmission).
        self._sequence = self._log.next_sequence()
        #: The compiled fast path serves this queue's requests it can (see pyvduse.native).
        self._plan = native
        self._native = self._native_ring(queue, None)
        #: How the native loop interrupts the driver (None: the loop stays in Python).
        self._irq: NativeIrq | None = getattr(notify, "native_irq", None)
        self._irq_errors = 0
        self._looped_before = 0  # the compiled loop's requests on rings closed since


    @property
    def requests(self) -> int:
        """Requests popped from the ring (served or in flight), the compiled loop's
        counted live while it runs."""
        return self._requests + self.loop_served

    @property
    def next_avail(self) -> int:
        """The next avail entry the queue takes (the compiled loop's, live, while it runs)."""
        native = self._native
        position = native.fast.position if native is not None else -1
        return position if position >= 0 else self.queue.last_avail_idx

    @property
    def loop_served(self) -> int:
        """Requests the compiled loop took (see :meth:`loop_natively`), across remaps."""
        native = self._native
        return self._looped_before + (native.looped_total if native is not None else 0)

    @property
    def native_served(self) -> int:
        """Requests the compiled fast path served (0 without one)."""
        native = self._native
        return native.served_total if native is not None else 0

    def _native_ring(self, queue: SplitQueue, previous: NativeRing | None) -> NativeRing | None:
        """The fast path for ``queue`` (None without a plan, or if it refuses the ring)."""
        if self._plan is None:
            return None
        try:
            ring = NativeRing(queue, self._plan, self._slots, previous, self.name, self.cells)
        except ValueError as exc:  # e.g. a ring the native code cannot address aligned
            log.warning("%s: the native data path cannot serve this ring (%s); the Python "
                        "path does", self.name, exc)
            return None
        if ring.fast.engine_error and previous is None:
            log.warning("%s: %s; the native path leaves large requests and flushes to the "
                        "thread pool", self.name, ring.fast.engine_error)
        return ring

    @property
    def in_backend(self) -> int:
        """Requests started and not completed: in a backend, or in the native path's
        io_uring (or failed there, waiting for Python)."""
        return self.inflight + self._native_pending()

    def _close_native(self) -> None:
        """Stop the fast path using the current ring and log (ring lock held, or abandoned)."""
        native = self._native
        if native is not None:
            native.close()
            self._looped_before += native.fast.looped  # requests counts them still
            if native.fast.pending:
                log.error("%s: %d request(s) still in the kernel's io_uring after 5 s; their "
                          "completions are dropped and their buffers stay mapped",
                          self.name, native.fast.pending)

    def close(self) -> None:
        """Release the completion eventfd (after the last completion); idempotent."""
        with self._fd_lock:
            if self.done_fd >= 0:
                os.close(self.done_fd)
                self.done_fd = -1

    def _wake(self) -> None:
        """Wake the serving thread (its completion eventfd), unless the worker is closed."""
        with self._fd_lock:
            if self.done_fd >= 0:
                os.eventfd_write(self.done_fd, 1)

    def detach(self) -> None:
        """Give the queue up without waiting for requests in flight; idempotent.

        Call after the serving thread stopped (or was abandoned inside a
        backend call). From now on a completion is dropped: it reaches neither
        the driver's memory (the ring views are swapped for private buffers)
        nor the inflight log (its views are swapped likewise, so a log the
        device clears or reuses is never written by this worker again).
        """
        self.stopping = True
        self.detached = True
        # Completing threads hold the lock briefly; an abandoned serving thread holds
        # it until its backend call returns, and then finds the queue released.
        locked = self.ring_lock.acquire(timeout=0.5)
        try:
            self._close_native()
            self._native = None
            spare = QueueLog.in_memory(self.queue.size)
            self._log, self._slots, self._log_header = spare, spare.slots, spare.header
            self.queue.release()
            self._done.clear()
        finally:
            if locked:
                self.ring_lock.release()
        self.close()

    def remap(self, queue: SplitQueue) -> None:
        """Serve the same ring through new mappings (the driver's memory was remapped).

        Requests in flight stay in flight and complete into ``queue``. Call
        only while no thread serves this worker; ``queue`` must carry the
        positions of the current one.
        """
        with self.ring_lock:
            if self._native is not None and self._native.fast.pending:
                # The io_uring's requests complete into the current ring, then move on.
                self._native.fast.wait(-1)
                self.reap()
                queue.used_idx = self.queue.used_idx
            self._close_native()
            old, self.queue = self.queue, queue
            self._native = self._native_ring(queue, self._native)
            old.release()
        self.stopping = False

    def resubmit(self, heads: Sequence[int]) -> int:
        """Serve again the requests of ``heads`` (popped before a crash, never completed).

        Their log marks stay as they are; each chain is walked again from its
        head and handed to the handler as if just popped. Call before the
        serving thread starts. Returns how many are now in a backend.
        """
        queue = self.queue
        with self.ring_lock:
            pending = self._redo(heads)
            self._requests += len(heads)
            queue.publish()
            self._retire()
            self._notify()  # what was published before the crash may never have been signalled
        return pending

    def _retire(self) -> None:
        """Clear from the log the heads published since the last call (ring lock held).

        Runs after the used index is stored: a head leaves the log only once
        the driver can see it completed (see :mod:`pyvduse.inflight`).
        """
        used = self.queue.used_idx
        position = self._log_used
        if position == used:
            return
        native = self._native
        if native is not None:
            native.fast.retire(position, used)
            self._log_used = used
            self._log_header[0] = used
            return
        slots = self._slots
        used_head = self.queue.used_head
        while position != used:
            slots[used_head(position)] = 0
            position = (position + 1) & 0xFFFF
        self._log_used = position
        self._log_header[0] = position

    def complete(self, head: int, written: int) -> None:
        """Finish a chain the handler left :data:`PENDING`; any thread, once per chain.

        When the serving thread is not in a batch (it holds the ring lock
        throughout one), the completion is pushed, published and signalled
        right here, on the caller's thread: the serving thread need not wake
        up for it (within :func:`deferred_interrupts` the interrupt waits for
        the block's end). Otherwise it is queued for the serving thread's next reap.
        """
        lock = self.ring_lock
        if not lock.acquire(blocking=False):
            self._done.append((head, written))
            self._wake()
            return
        try:
            if self.detached:
                log.debug("%s: completion of chain %d dropped: the queue was reset",
                          self.name, head)
                return
            queue = self.queue
            queue.push(head, written)
            owed = getattr(_this_thread, "owed", None)
            if owed is None or self.stopping:
                self.publish()
            else:
                queue.publish()
                self._retire()
                owed[self] = None
        except Exception:  # the ring is broken or gone: nothing else can take it
            _driver_log.error("completion-dropped", "%s: completion of chain %d dropped",
                              self.name, head, exc_info=True)
        finally:
            self.inflight -= 1
            lock.release()
            if self.stopping:  # someone may wait for the last request
                self._wake()

    def _signal_deferred(self) -> None:
        """Interrupt the driver for completions :meth:`complete` published without one."""
        if self.stopping:  # the serving thread's last publish covers them
            return
        if not self.ring_lock.acquire(blocking=False):
            # The serving thread is in a batch: it publishes (and interrupts) when it
            # sees the flag, at the latest on the wake-up this eventfd write causes.
            self._interrupt_owed = True
            self._wake()
            return
        try:
            self.publish()
        except Exception:  # the ring is broken or gone: nothing else can take it
            log.exception("%s: interrupt of completed chains dropped", self.name)
        finally:
            self.ring_lock.release()

    @property
    def native_event_fd(self) -> int:
        """Readable when the native path's io_uring has completions (-1 without one)."""
        native = self._native
        return native.fast.event_fd if native is not None else -1

    def loops_natively(self) -> bool:
        """Whether :meth:`loop_natively` can serve this queue: a native path, a native
        interrupt and no plug/unplug calls around batches."""
        return self._native is not None and self._irq is not None and not self._plugs

    def loop_natively(self, stop_fd: int, poll_max_ns: int, poll_ns: int) -> tuple[int, int]:
        """Serve the queue in the compiled loop until Python must act (GIL released).

        The loop (``fastpath_loop.h``) waits for kicks itself (on the kick fd, the
        io_uring's eventfd, :attr:`done_fd` and ``stop_fd``), polls for up to the
        adaptive window ``poll_ns`` (at most ``poll_max_ns``), serves, publishes,
        clears the log and interrupts the driver, exactly as :meth:`drain` and
        :class:`QueueThread` do. It returns when a request is the Python path's,
        when an io_uring request failed, when :attr:`done_fd` or ``stop_fd`` is
        readable, when the queue is given up or when the ring is broken: call
        :meth:`drain` then (it serves the request, reaps, or raises
        :class:`RingError`), and this again. Returns ``(reason, poll_ns)``
        (``reason``: a ``LOOP_*`` constant of :mod:`pyvduse.native`).
        """
        native = self._native
        irq = self._irq
        assert native is not None and irq is not None, "loops_natively() is False"
        queue = self.queue
        with self.ring_lock:
            if self.stopping or self._done or self._interrupt_owed:
                return LOOP_WOKEN, poll_ns  # Python's turn first
            native.refresh()
            (reason, queue.last_avail_idx, queue.used_idx, queue.signalled_used,
             self._log_used, sequence, poll_ns, self._dry, _taken, _interrupts, irq_errors,
             _found) = native.fast.loop(
                self.kick_fd, self.done_fd, stop_fd, irq.fd, irq.request, irq.arg,
                queue.event_idx, poll_max_ns, poll_ns, self.inflight > 0, self._log_header,
                queue.last_avail_idx, queue.used_idx, queue.signalled_used, self._log_used,
                self._sequence, self._dry)
            self._sequence = sequence  # the loop counts what it took itself (requests)
        if irq_errors:
            self._irq_errors += irq_errors
            _driver_log.warning("native-irq", "%s: %d interrupt(s) failed (%d in all)",
                                self.name, irq_errors, self._irq_errors)
        return reason, poll_ns

    def _native_pending(self) -> int:
        """Requests in the native path's io_uring, or failed there and not yet handed
        to Python (0 without one): :meth:`reap` has work."""
        native = self._native
        if native is None:
            return 0
        fast = native.fast
        return fast.pending + fast.returned

    def has_work(self) -> bool:
        """Whether :meth:`drain` would find something to do now (chains or completions)."""
        queue = self.queue
        return (queue.avail_idx() != queue.last_avail_idx or bool(self._done)
                or self._interrupt_owed)

    def reap(self) -> int:
        """Push every completion handed in by :meth:`complete`, and those of the native
        path's io_uring; return how many (ring lock held)."""
        done = self._done
        push = self.queue.push
        count = 0
        while done:
            head, written = done.popleft()
            push(head, written)
            count += 1
        self.inflight -= count
        if self._native_pending():
            assert self._native is not None
            native = self._native
            queue = self.queue
            before = queue.used_idx
            queue.used_idx, failed = native.fast.reap(before)
            if failed:
                self._redo(failed)  # what Python answers at once is pushed too
            count += (queue.used_idx - before) & 0xFFFF
        return count

    def _redo(self, heads: Sequence[int]) -> int:
        """Serve again, on the Python path, requests taken from the ring before: those
        popped before a crash, or those the native path could not finish (an I/O error,
        a submission refused). Their log marks stay; each chain is walked anew from its
        head and the handler answers it as if just popped (ring lock held). Returns how
        many are now in a backend (counted in :attr:`inflight`)."""
        queue = self.queue
        pending = 0
        for head in heads:
            try:
                chain = queue.chain_at(head)
            except ChainError as exc:  # the driver changed the chain meanwhile
                self.bad_chains += 1
                _driver_log.warning("bad-chain", "%s: %s; completed with length 0",
                                    self.name, exc)
                queue.push(head, 0)
                continue
            written = self._handle(chain, self.complete)
            if written >= 0:
                queue.push(head, written)
            else:
                pending += 1
        self.inflight += pending
        return pending

    def publish(self) -> None:
        """Make pushed completions visible and interrupt the driver if it asked to be.

        The heads just published leave the inflight log (ring lock held).
        """
        queue = self.queue
        queue.publish()
        if self._log_used != queue.used_idx:
            self._retire()
        if queue.needs_interrupt():
            self._notify()

    def drain(self, batches: int | None = None, rearm: bool = True) -> bool:
        """Serve the chains available now and re-enable kicks once the ring is empty.

        Completions handed in meanwhile are pushed in the same batches. Returns
        False when the ring is empty (kicks re-enabled, unless ``rearm`` is
        False: then call :meth:`rearm` before waiting for a kick), True when it
        stopped after ``batches`` batches with work left (kicks still
        suppressed: call again soon). Public so that the data-path benchmark
        (``bench/datapath.py``) measures exactly this loop. Not thread-safe:
        one caller per queue at a time. Raises :class:`RingError` if the driver
        broke the ring.
        """
        queue = self.queue
        handle = self._handle
        complete = self.complete
        pop = queue.pop  # bound once: the loop below runs per request
        push = queue.push
        done = self._done
        plug = self._plug
        unplug = self._unplug
        plugs = self._plugs
        lock = self.ring_lock
        slots = self._slots
        while not self.stopping:
            queue.disable_kicks()
            count = queue.pending()
            lock.acquire()
            try:
                if self._interrupt_owed:
                    self._interrupt_owed = False
                    self.publish()
                reaped = self.reap() if done or self._native_pending() else 0
                while count or reaped:
                    if batches is not None:
                        if not batches:
                            if reaped:  # what the last reap pushed must not wait for more work
                                self.publish()
                            return True
                        batches -= 1
                    if self._dry and count:
                        self._dry = False
                        if count >= SPLIT_MIN:
                            count //= 2  # the rest is pending() after this half's publish
                    pending = 0
                    plugged = count and plugs
                    if plugged:
                        plug()
                    sequence = first = self._sequence
                    native = self._native
                    if native is not None:
                        native.refresh()
                    try:
                        remaining = count
                        while remaining:
                            if native is not None and not self.stopping:
                                # The compiled path serves what it can, up to the first
                                # request it leaves to the code below (see pyvduse.native).
                                served, queue.last_avail_idx, queue.used_idx, sequence = (
                                    native.fast.run(remaining, queue.last_avail_idx,
                                                    queue.used_idx, sequence))
                                remaining -= served
                                if not remaining:
                                    break
                            remaining -= 1
                            # Each head is marked in the inflight log before the next
                            # pop and before its request starts (see pyvduse.inflight).
                            try:
                                chain = pop()
                            except ChainError as exc:
                                slots[exc.head] = sequence
                                sequence += 1
                                self.bad_chains += 1
                                _driver_log.warning("bad-chain", "%s: %s; completed with "
                                                    "length 0", self.name, exc)
                                push(exc.head, 0)
                                continue
                            except RingError as exc:
                                header = self._log_header
                                header[1] = (header[1] + 1) & 0xFFFF  # taken, never completable
                                self.bad_chains += 1
                                _driver_log.warning("bad-head", "%s: %s; skipped", self.name, exc)
                                continue
                            slots[chain.head] = sequence
                            sequence += 1
                            written = handle(chain, complete)
                            if written >= 0:
                                push(chain.head, written)
                            else:
                                pending += 1
                            if self.stopping:  # a reset came while the backend had it
                                break
                            if native is not None:
                                native.teach()  # a mapping this request made, if any
                    finally:
                        self._sequence = sequence
                        if plugged:
                            unplug()  # the batch's requests start now at the latest
                    self._requests += sequence - first
                    self.inflight += pending
                    # Interrupt per batch: holding completions back until the ring runs dry
                    # saves interrupts but starves a driver that refills the ring as its
                    # requests complete (-5 to -12% IOPS at QD32 in the benchmark guest).
                    self.publish()
                    if self.stopping:
                        return False
                    count = queue.pending()
                    reaped = self.reap() if done or self._native_pending() else 0
                self._dry = True
            finally:
                lock.release()
            if not rearm or not queue.enable_kicks():
                return False
        return False

    def rearm(self) -> bool:
        """Ask the driver to kick for new chains; True if some arrived meanwhile."""
        return self.queue.enable_kicks()


class QueueThread:
    """One thread serving ``workers`` until :meth:`stop`.

    When :meth:`stop` returns nothing is in flight: every request popped has
    been completed and published (a backend that never finishes a request
    keeps :meth:`stop` waiting, with a warning every ten seconds). A queue
    whose ring the driver broke stops being served (logged); the others go on.

    Polling (``poll_max_ns`` > 0): when its queues run dry, the thread first
    watches their rings for up to a window of time before it goes to sleep
    on their eventfds, so that a request arriving soon is picked up without
    a kick and a wake-up (the largest cost per request at low queue depth).
    The window adapts as QEMU's does: it doubles (from
    :data:`POLL_START_NS`, up to ``poll_max_ns``) after each sleep that
    ended sooner than ``poll_max_ns``, and halves after each longer one, so
    an idle device soon costs no CPU. The thread does not poll while a
    backend holds requests of its queues: the thread completing them needs
    the interpreter lock, which a polling thread holds. Nor after a burst of
    more than :data:`POLL_BURST_MAX` requests: a deep driver keeps the ring
    busy by itself and needs the CPU a polling thread would take.
    """

    def __init__(self, name: str, workers: Sequence[QueueWorker],
                 poll_max_ns: int = 0) -> None:
        if poll_max_ns < 0:
            raise ValueError(f"the polling window cannot be negative: {poll_max_ns} ns")
        self.name = name
        self.workers = list(workers)
        self.poll_max_ns = poll_max_ns
        #: The current polling window, adapted between 0 and ``poll_max_ns``.
        self.poll_ns = 0
        #: Times polling found work, for tests and statistics.
        self.polls_found = 0
        #: Where this thread's polling is counted for metrics (its first queue's block;
        #: the compiled loop counts in it itself), or None.
        self._cells = self.workers[0].cells if self.workers else None
        self._served_at_dry = 0  # the queues' requests when they last ran dry (_poll)
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start serving; work already in the rings is picked up at once."""
        self._thread.start()

    @property
    def dead(self) -> bool:
        """Whether the thread ended without being stopped (it died of an error)."""
        return not self._stopping and self._thread.ident is not None \
            and not self._thread.is_alive()

    def stop(self, inflight_timeout: float | None = None,
             join_timeout: float = JOIN_TIMEOUT) -> bool:
        """Stop taking requests; wait for those in flight up to ``inflight_timeout``.

        ``None`` waits as long as requests stay in a backend (with a warning
        every ten seconds), 0 not at all. The thread is joined for at most
        ``join_timeout`` seconds: a thread stuck inside a synchronous backend
        call is abandoned (logged), and stops by itself once the call returns.
        Returns True when nothing is left in flight. Idempotent. The workers
        stay open: :meth:`QueueWorker.detach` them, or start another thread.
        """
        self._stopping = True
        for worker in self.workers:
            worker.stopping = True
        if self._stop_fd >= 0:  # a second stop() finds the fd closed
            os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)
            if self._thread.is_alive():
                log.error("%s: still inside a backend call after %.0f s; its queues are given "
                          "up, the call's result will be dropped", self.name, join_timeout)
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        return self._wait_inflight(inflight_timeout)

    def _run(self) -> None:
        if len(self.workers) == 1 and self.workers[0].loops_natively():
            self._run_native(self.workers[0])
            return
        poller = select.poll()
        by_fd: dict[int, QueueWorker] = {}
        for worker in self.workers:
            for fd in (worker.kick_fd, worker.done_fd, worker.native_event_fd):
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
                    by_fd[fd] = worker
        poller.register(self._stop_fd, select.POLLIN)
        busy = list(self.workers)  # the driver may have queued work before we started
        polling = self.poll_max_ns > 0
        try:
            while not self._stopping:
                # A queue drained dry stays without kicks only while the thread polls.
                busy = [w for w in busy if not w.broken and self._drain(w, poller, not polling)]
                if self._stopping:
                    break
                slept_from = 0
                if polling and busy:  # no polling while busy: the dry queues need their kicks
                    busy += [w for w in self.workers
                             if w not in busy and not w.broken and w.rearm()]
                elif polling:
                    busy = self._poll() or [w for w in self.workers if not w.broken and w.rearm()]
                    if busy:
                        continue
                    slept_from = time.monotonic_ns()
                if not busy and self._cells is not None:
                    self._cells[POLL_SLEEPS] += 1
                ready = poller.poll(0 if busy else None)
                if slept_from:
                    self._adapt(time.monotonic_ns() - slept_from)
                for fd, _events in ready:
                    woken = by_fd.get(fd)
                    if woken is None:
                        continue  # the stop fd
                    _clear(fd)
                    if woken not in busy and not woken.broken:
                        busy.append(woken)
        except Exception:
            log.exception("%s: queue thread failed; its queues stop until reset", self.name)

    def _run_native(self, worker: QueueWorker) -> None:
        """Serve one queue in the compiled loop, taking Python turns when it asks."""
        try:
            while not self._stopping:
                _reason, self.poll_ns = worker.loop_natively(self._stop_fd, self.poll_max_ns,
                                                             self.poll_ns)
                if self._stopping:
                    break
                _clear(worker.done_fd)
                try:  # the request the loop left, Python's completions, a broken ring
                    worker.drain(BATCHES_PER_TURN)
                except RingError as exc:
                    log.error("%s: %s; the queue stops until the driver resets the device",
                              worker.name, exc)
                    worker.broken = True
                    return
        except Exception:
            log.exception("%s: queue thread failed; its queue stops until reset", self.name)

    def _poll(self) -> list[QueueWorker]:
        """Watch the queues for up to the polling window; return those with work."""
        window = self.poll_ns
        workers = [w for w in self.workers if not w.broken]
        served = sum(w.requests for w in workers)
        burst, self._served_at_dry = served - self._served_at_dry, served
        if not window or burst > POLL_BURST_MAX or any(w.in_backend for w in workers):
            return []
        deadline = time.monotonic_ns() + window
        while not self._stopping:
            found = [w for w in workers if w.has_work()]
            if found:
                self.polls_found += 1
                if self._cells is not None:
                    self._cells[POLL_HITS] += 1
                return found
            if time.monotonic_ns() >= deadline:
                break
        return []

    def _adapt(self, slept_ns: int) -> None:
        """Resize the polling window after a sleep of ``slept_ns``."""
        if slept_ns > self.poll_max_ns:  # polling that long would not have paid
            self.poll_ns //= 2
            if self.poll_ns < POLL_START_NS:
                self.poll_ns = 0
        elif slept_ns > self.poll_ns:  # a longer window would have caught it
            self.poll_ns = min(max(2 * self.poll_ns, POLL_START_NS), self.poll_max_ns)

    def _drain(self, worker: QueueWorker, poller: select.poll, rearm: bool) -> bool:
        """One turn of ``worker``; True if it has work left. A broken ring stops the queue."""
        try:
            return worker.drain(BATCHES_PER_TURN, rearm)
        except RingError as exc:
            log.error("%s: %s; the queue stops until the driver resets the device",
                      worker.name, exc)
            worker.broken = True
            poller.unregister(worker.kick_fd)
            return False

    def _wait_inflight(self, timeout: float | None) -> bool:
        """After the last pop: collect pending completions, publishing as they come.

        Gives up after ``timeout`` seconds (None: never). A worker whose ring
        lock stays taken (its thread abandoned in a backend call) is not
        waited for. Returns True when nothing is left in flight.
        """
        poller = select.poll()
        for worker in self.workers:
            for fd in (worker.done_fd, worker.native_event_fd):
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        next_report = time.monotonic() + _STUCK_LOG_INTERVAL
        while True:
            inflight = 0
            for worker in self.workers:
                if not worker.ring_lock.acquire(timeout=0.1):
                    inflight += max(worker.in_backend, 1)  # its thread is stuck in a batch
                    continue
                try:  # pushes from other threads end before we look
                    worker.reap()
                    worker.publish()  # also interrupts for deferred completions
                except RingError as exc:
                    log.error("%s: %s; completions dropped", worker.name, exc)
                    worker.inflight = 0
                finally:
                    worker.ring_lock.release()
                inflight += worker.in_backend
            now = time.monotonic()
            if not inflight:
                return True
            if deadline is not None and now >= deadline:
                if timeout:
                    log.warning("%s: %d request(s) still in the backend after %.0f s; their "
                                "completions will be dropped", self.name, inflight, timeout)
                return False
            if now >= next_report:
                next_report = now + _STUCK_LOG_INTERVAL
                log.warning("%s: still waiting for %d request(s) in the backend",
                            self.name, inflight)
            wait = next_report - now if deadline is None else min(deadline, next_report) - now
            for fd, _events in poller.poll(max(wait, 0.001) * 1000):
                _clear(fd)
