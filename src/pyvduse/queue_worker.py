"""One thread serving one virtqueue: wait for a kick, drain, complete, notify.

Transport-agnostic: VDUSE and vhost-user both deliver kicks on an eventfd
and take interrupts through a callable.

A request is completed either at once (the handler returns the bytes it
wrote into the chain) or later (the handler returns :data:`PENDING` and calls
the ``complete`` callable it was given, from any thread, when the backend is
done). Only the worker thread touches the used ring: later completions reach
it through a queue and an eventfd, so many requests of one queue can be in
flight at once without any lock on the ring.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable

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

_STUCK_LOG_INTERVAL = 10.0  # seconds between reports of requests that do not finish


class QueueWorker:
    """Drains ``queue`` on its own thread until :meth:`stop`.

    Per wake-up it collects finished requests, pops every available chain with
    kicks suppressed, publishes the used index once per batch and interrupts
    the driver once per batch if the driver asked for it (EVENT_IDX or the
    NO_INTERRUPT flag). When :meth:`stop` returns nothing is in flight: every
    request popped has been completed and published (a backend that never
    finishes a request keeps :meth:`stop` waiting, with a warning every
    ten seconds).
    """

    def __init__(self, name: str, queue: SplitQueue, handle: RequestHandler, kick_fd: int,
                 notify: Callable[[], None]) -> None:
        self.name = name
        self.queue = queue
        self._handle = handle
        self._kick_fd = kick_fd
        self._notify = notify
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: deque[tuple[int, int]] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        #: Requests popped from the ring (served or in flight).
        self.requests = 0
        #: Requests handed to the backend and not yet completed.
        self.inflight = 0
        self.bad_chains = 0

    def start(self) -> None:
        """Start serving; work already in the ring is picked up at once."""
        self._thread.start()

    def stop(self) -> None:
        """Stop taking requests, wait for those in flight; idempotent."""
        self._stopping = True
        if self._stop_fd >= 0:  # a second stop() finds the fd closed
            os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            os.close(self._done_fd)
            self._stop_fd = self._done_fd = -1

    def complete(self, head: int, written: int) -> None:
        """Finish a chain the handler left :data:`PENDING`; any thread, once per chain."""
        self._done.append((head, written))
        os.eventfd_write(self._done_fd, 1)

    def _run(self) -> None:
        poller = select.poll()
        kick_fd, done_fd, stop_fd = self._kick_fd, self._done_fd, self._stop_fd
        for fd in (kick_fd, done_fd, stop_fd):
            poller.register(fd, select.POLLIN)
        try:
            self.drain()  # the driver may have queued work before we started
            while not self._stopping:
                for fd, _events in poller.poll():
                    if fd != stop_fd:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                if self._stopping:
                    break
                self.drain()
        except RingError as exc:
            log.error("%s: %s; the queue stops until the driver resets the device",
                      self.name, exc)
        except Exception:
            log.exception("%s: queue worker failed; the queue stops until reset", self.name)
        self._wait_inflight()

    def _wait_inflight(self) -> None:
        """After the last pop: collect every pending completion, publishing as they come."""
        poller = select.poll()
        poller.register(self._done_fd, select.POLLIN)
        waited = 0.0
        while True:
            try:
                if self._reap():
                    self._publish()
            except RingError as exc:
                log.error("%s: %s; completions dropped", self.name, exc)
                self._done.clear()
                self.inflight = 0
            if not self.inflight:
                return
            if not poller.poll(_STUCK_LOG_INTERVAL * 1000):
                waited += _STUCK_LOG_INTERVAL
                log.warning("%s: still waiting for %d request(s) in the backend after %.0f s",
                            self.name, self.inflight, waited)
                continue
            try:
                os.eventfd_read(self._done_fd)
            except BlockingIOError:
                pass

    def _reap(self) -> int:
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

    def _publish(self) -> None:
        queue = self.queue
        queue.publish()
        if queue.needs_interrupt():
            self._notify()

    def drain(self) -> None:
        """Serve every chain available now, then re-enable kicks; return when the ring is empty.

        Completions handed in meanwhile are pushed in the same batches. The
        worker thread calls this on every wake-up. It is public so that the
        data-path benchmark (``bench/datapath.py``) measures exactly this loop,
        without the thread. Not thread-safe: one caller per queue at a time.
        """
        queue = self.queue
        handle = self._handle
        complete = self.complete
        pop = queue.pop  # bound once: the loop below runs per request
        push = queue.push
        done = self._done
        while not self._stopping:
            queue.disable_kicks()
            count = queue.pending()
            reaped = self._reap() if done else 0
            while count or reaped:
                pending = 0
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
                self.requests += count
                self.inflight += pending
                self._publish()
                if self._stopping:
                    return
                count = queue.pending()
                reaped = self._reap() if done else 0
            if not queue.enable_kicks():
                return
