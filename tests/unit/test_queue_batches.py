"""QueueWorker batches: a lump of requests found after the ring ran dry is served in halves.

A driver that submits its whole queue depth at once and waits for all of it
(libblkio's blocking ``blkioq_do_io`` called from Python) takes turns with
the device; publishing the first half of such a lump before serving the
second lets it work meanwhile. Requests that arrive while the device is busy
are served in whole batches, as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pyvduse.queue_worker import SPLIT_MIN, QueueWorker
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.virtqueue import Chain, SplitQueue

QSIZE = 64


class Driver:
    """A mock driver on one ring and the worker serving it; every interrupt is recorded
    with the used index the driver could see then."""

    def __init__(self, memory: DriverMemory) -> None:
        self.memory = memory
        self.ring = MockSplitRing(memory, QSIZE)
        self.queue = SplitQueue(memory.guest_memory(), QSIZE, self.ring.desc_addr,
                                self.ring.avail_addr, self.ring.used_addr, event_idx=False,
                                indirect=False)
        self.status = memory.buffer(1, writable=True)
        self.interrupts: list[int] = []
        self.served = 0
        self.on_request: Callable[[int], None] = lambda served: None
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.worker = QueueWorker("q", self.queue, self.handle, self.kick, self.interrupt)

    def handle(self, chain: Chain, complete: Callable[[int, int], None]) -> int:
        self.served += 1
        self.on_request(self.served)
        chain.writable[0][0] = 0
        return 1

    def interrupt(self) -> None:
        self.interrupts.append(self.ring.used_idx())

    def submit(self, count: int) -> None:
        """Make ``count`` requests available at once (one avail index update)."""
        heads = [self.ring.add_chain([self.status], publish=False) for _ in range(count)]
        self.ring.publish(heads)

    def complete_all(self) -> None:
        """The driver collects its completions (and recycles the descriptors)."""
        self.ring.take_used()


@contextmanager
def driver() -> Iterator[Driver]:
    memory = DriverMemory(size=1 << 20)
    d = Driver(memory)
    try:
        yield d
    finally:
        d.worker.close()
        d.queue.release()
        os.close(d.kick)
        memory.close()


def test_a_lump_after_a_dry_ring_is_served_in_two_halves() -> None:
    with driver() as d:
        d.submit(32)
        assert d.worker.drain() is False
        assert d.interrupts == [16, 32]  # the driver sees the first 16 before the rest is served
        assert d.served == 32


def test_every_lump_after_the_ring_ran_dry_again() -> None:
    with driver() as d:
        d.submit(16)
        d.worker.drain()
        d.complete_all()
        d.submit(10)
        d.worker.drain()
        assert d.interrupts == [8, 16, 21, 26]


def test_small_lumps_stay_whole() -> None:
    with driver() as d:
        d.submit(SPLIT_MIN - 1)
        d.worker.drain()
        assert d.interrupts == [SPLIT_MIN - 1]


def test_requests_arriving_while_busy_are_one_batch() -> None:
    """A driver that resubmits while the device works never lets the ring run dry."""
    with driver() as d:
        def resubmit(served: int) -> None:
            if served == 16:  # during the lump's second half: the next 16 arrive
                d.submit(16)

        d.on_request = resubmit
        d.submit(16)
        d.worker.drain()
        assert d.interrupts == [8, 16, 32]


def test_a_turn_limited_in_batches_counts_the_half() -> None:
    """drain(batches=1) serves the first half only and says that work is left."""
    with driver() as d:
        d.submit(20)
        assert d.worker.drain(batches=1) is True
        assert (d.served, d.interrupts) == (10, [10])
        assert d.worker.drain() is False  # the rest, whole: the ring did not run dry
        assert (d.served, d.interrupts) == (20, [10, 20])
