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
from pyvduse.virtqueue import Chain, ChainError, SplitQueue

log = logging.getLogger(__name__)

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

POLL_START_NS = 4_000
"""The first polling window a queue thread tries once polling pays (it doubles from there)."""

_STUCK_LOG_INTERVAL = 10.0  # seconds between reports of requests that do not finish


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
    """

    def __init__(self, name: str, queue: SplitQueue, handle: RequestHandler, kick_fd: int,
                 notify: Callable[[], None], plug: Callable[[], None] | None = None,
                 unplug: Callable[[], None] | None = None) -> None:
        self.name = name
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
        #: Requests popped from the ring (served or in flight).
        self.requests = 0
        #: Requests handed to the backend and not yet completed.
        self.inflight = 0
        self.bad_chains = 0

    def close(self) -> None:
        """Release the completion eventfd (after the last completion); idempotent."""
        if self.done_fd >= 0:
            os.close(self.done_fd)
            self.done_fd = -1

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
            os.eventfd_write(self.done_fd, 1)
            return
        try:
            queue = self.queue
            queue.push(head, written)
            owed = getattr(_this_thread, "owed", None)
            if owed is None or self.stopping:
                self.publish()
            else:
                queue.publish()
                owed[self] = None
        except Exception:  # the ring is broken or gone: nothing else can take it
            log.exception("%s: completion of chain %d dropped", self.name, head)
        finally:
            if self.stopping:  # the serving thread waits for the last request
                os.eventfd_write(self.done_fd, 1)
            self.inflight -= 1
            lock.release()

    def _signal_deferred(self) -> None:
        """Interrupt the driver for completions :meth:`complete` published without one."""
        if self.stopping:  # the serving thread's last publish covers them
            return
        if not self.ring_lock.acquire(blocking=False):
            # The serving thread is in a batch: it publishes (and interrupts) when it
            # sees the flag, at the latest on the wake-up this eventfd write causes.
            self._interrupt_owed = True
            os.eventfd_write(self.done_fd, 1)
            return
        try:
            self.publish()
        except Exception:  # the ring is broken or gone: nothing else can take it
            log.exception("%s: interrupt of completed chains dropped", self.name)
        finally:
            self.ring_lock.release()

    def has_work(self) -> bool:
        """Whether :meth:`drain` would find something to do now (chains or completions)."""
        queue = self.queue
        return (queue.avail_idx() != queue.last_avail_idx or bool(self._done)
                or self._interrupt_owed)

    def reap(self) -> int:
        """Push every completion handed in by :meth:`complete`; return how many."""
        done = self._done
        push = self.queue.push
        count = 0
        while done:
            head, written = done.popleft()
            push(head, written)
            count += 1
        self.inflight -= count
        return count

    def publish(self) -> None:
        """Make pushed completions visible and interrupt the driver if it asked to be."""
        queue = self.queue
        queue.publish()
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
        while not self.stopping:
            queue.disable_kicks()
            count = queue.pending()
            lock.acquire()
            try:
                if self._interrupt_owed:
                    self._interrupt_owed = False
                    self.publish()
                reaped = self.reap() if done else 0
                while count or reaped:
                    if batches is not None:
                        if not batches:
                            if reaped:  # what the last reap pushed must not wait for more work
                                self.publish()
                            return True
                        batches -= 1
                    pending = 0
                    plugged = count and plugs
                    if plugged:
                        plug()
                    try:
                        for _ in range(count):
                            try:
                                chain = pop()
                            except ChainError as exc:
                                self.bad_chains += 1
                                log.warning("%s: %s; completed with length 0", self.name, exc)
                                push(exc.head, 0)
                                continue
                            except RingError as exc:
                                self.bad_chains += 1
                                log.warning("%s: %s; skipped", self.name, exc)
                                continue
                            written = handle(chain, complete)
                            if written >= 0:
                                push(chain.head, written)
                            else:
                                pending += 1
                    finally:
                        if plugged:
                            unplug()  # the batch's requests start now at the latest
                    self.requests += count
                    self.inflight += pending
                    # Interrupt per batch: holding completions back until the ring runs dry
                    # saves interrupts but starves a driver that refills the ring as its
                    # requests complete (-5 to -12% IOPS at QD32 in the benchmark guest).
                    self.publish()
                    if self.stopping:
                        return False
                    count = queue.pending()
                    reaped = self.reap() if done else 0
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
    the interpreter lock, which a polling thread holds.
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
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start serving; work already in the rings is picked up at once."""
        self._thread.start()

    def stop(self) -> None:
        """Stop taking requests, wait for those in flight, close fds; idempotent."""
        self._stopping = True
        for worker in self.workers:
            worker.stopping = True
        if self._stop_fd >= 0:  # a second stop() finds the fd closed
            os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
            for worker in self.workers:
                worker.close()

    def _run(self) -> None:
        poller = select.poll()
        by_fd: dict[int, QueueWorker] = {}
        for worker in self.workers:
            for fd in (worker.kick_fd, worker.done_fd):
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
        self._wait_inflight()

    def _poll(self) -> list[QueueWorker]:
        """Watch the queues for up to the polling window; return those with work."""
        window = self.poll_ns
        workers = [w for w in self.workers if not w.broken]
        if not window or any(w.inflight for w in workers):
            return []
        deadline = time.monotonic_ns() + window
        while not self._stopping:
            found = [w for w in workers if w.has_work()]
            if found:
                self.polls_found += 1
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

    def _wait_inflight(self) -> None:
        """After the last pop: collect every pending completion, publishing as they come."""
        poller = select.poll()
        for worker in self.workers:
            poller.register(worker.done_fd, select.POLLIN)
        waited = 0.0
        while True:
            inflight = 0
            for worker in self.workers:
                with worker.ring_lock:  # pushes from other threads end before we look
                    try:
                        worker.reap()
                        worker.publish()  # also interrupts for deferred completions
                    except RingError as exc:
                        log.error("%s: %s; completions dropped", worker.name, exc)
                        worker.inflight = 0
                    inflight += worker.inflight
            if not inflight:
                return
            ready = poller.poll(_STUCK_LOG_INTERVAL * 1000)
            if not ready:
                waited += _STUCK_LOG_INTERVAL
                log.warning("%s: still waiting for %d request(s) in the backend after %.0f s",
                            self.name, inflight, waited)
            for fd, _events in ready:
                _clear(fd)
