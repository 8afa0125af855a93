"""One thread serving one virtqueue: wait for a kick, drain, complete, notify.

Transport-agnostic: VDUSE and vhost-user both deliver kicks on an eventfd
and take interrupts through a callable.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from pyvduse.errors import RingError
from pyvduse.virtqueue import Chain, ChainError, SplitQueue

log = logging.getLogger(__name__)

RequestHandler = Callable[[Chain], int]
"""Serves one chain, returns the bytes written into it; must not raise."""


class QueueWorker:
    """Drains ``queue`` on its own thread until :meth:`stop`.

    Per wake-up it pops every available chain with kicks suppressed,
    publishes the used index once per batch and interrupts the driver once
    per batch if the driver asked for it (EVENT_IDX or the NO_INTERRUPT flag).
    Requests are served in order, so when :meth:`stop` returns nothing is in
    flight: the queue is drained.
    """

    def __init__(self, name: str, queue: SplitQueue, handle: RequestHandler, kick_fd: int,
                 notify: Callable[[], None]) -> None:
        self.name = name
        self.queue = queue
        self._handle = handle
        self._kick_fd = kick_fd
        self._notify = notify
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.requests = 0
        self.bad_chains = 0

    def start(self) -> None:
        """Start serving; work already in the ring is picked up at once."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the request being served; idempotent."""
        self._stopping = True
        if self._stop_fd >= 0:  # a second stop() finds the fd closed
            os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            self.drain()  # the driver may have queued work before we started
            while not self._stopping:
                poller.poll()
                if self._stopping:
                    break
                try:
                    os.eventfd_read(self._kick_fd)
                except BlockingIOError:
                    pass
                self.drain()
        except RingError as exc:
            log.error("%s: %s; the queue stops until the driver resets the device",
                      self.name, exc)
        except Exception:
            log.exception("%s: queue worker failed; the queue stops until reset", self.name)

    def drain(self) -> None:
        """Serve every chain available now, then re-enable kicks; return when the ring is empty.

        The worker thread calls this on every wake-up. It is public so that the
        data-path benchmark (``bench/datapath.py``) measures exactly this loop,
        without the thread. Not thread-safe: one caller per queue at a time.
        """
        queue = self.queue
        handle = self._handle
        pop = queue.pop  # bound once: the loop below runs per request
        push = queue.push
        while not self._stopping:
            queue.disable_kicks()
            count = queue.pending()
            while count:
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
                    push(chain.head, handle(chain))
                self.requests += count
                queue.publish()
                if queue.needs_interrupt():
                    self._notify()
                if self._stopping:
                    return
                count = queue.pending()
            if not queue.enable_kicks():
                return
