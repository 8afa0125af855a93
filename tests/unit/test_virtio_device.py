"""VirtioDevice on its own: queues started, stopped, paused, remapped and reset from
plain QueueState, driven through MockSplitRing rings in DriverMemory."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from holding_backend import HoldingBackend

from pyvduse.backends.memory import MemoryBackend
from pyvduse.blk import BlkConfig, BlkDevice
from pyvduse.errors import PyvduseError
from pyvduse.inflight import InflightLog
from pyvduse.memory import GuestMemory
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi import virtio as v
from pyvduse.virtio_device import QueueState, VirtioDevice

MiB = 1 << 20
QSIZE = 16
OK = v.VIRTIO_BLK_S_OK
FEATURES = (1 << v.VIRTIO_F_VERSION_1) | (1 << v.VIRTIO_RING_F_EVENT_IDX)


def release_later(backend: HoldingBackend, delay: float) -> threading.Thread:
    thread = threading.Timer(delay, backend.release)
    thread.start()
    return thread


@dataclass
class Req:
    queue: int
    head: int
    status: Buffer
    data_in: Buffer | None


class Rig:
    """A VirtioDevice over a HoldingBackend, with a mock driver's rings and kick fds."""

    def __init__(self, num_queues: int = 3, queue_threads: int = 1,
                 inflight_log: InflightLog | None = None) -> None:
        self.backend = HoldingBackend(4 * MiB)
        self.config = BlkConfig.for_backend(self.backend, num_queues=num_queues,
                                            queue_size=QSIZE)
        self.model = BlkDevice(self.backend, self.config)
        self.dev = VirtioDevice("vd", self.model, queue_threads=queue_threads,
                                inflight_log=inflight_log)
        self.dev.accept_features(FEATURES)
        self.mem = DriverMemory(size=4 * MiB)
        self.memory: GuestMemory = self.mem.guest_memory()
        self.rings = [MockSplitRing(self.mem, QSIZE) for _ in range(num_queues)]
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                      for _ in range(num_queues)]
        self.irqs = [0] * num_queues

    def close(self) -> None:
        self.dev.stop_all(inflight_timeout=0)
        for fd in self.kicks:
            os.close(fd)
        self.mem.close()
        self.backend.close()

    def state(self, q: int, last_avail_idx: int = 0) -> QueueState:
        ring = self.rings[q]
        return QueueState(QSIZE, ring.desc_addr, ring.avail_addr, ring.used_addr,
                          last_avail_idx)

    def notify(self, q: int) -> Callable[[], None]:
        def notify() -> None:
            self.irqs[q] += 1
        return notify

    def start(self, q: int, last_avail_idx: int = 0, *, recover: bool = False,
              serve: bool = True) -> int:
        return self.dev.start_queue(q, self.state(q, last_avail_idx), self.memory,
                                    self.kicks[q], self.notify(q), recover=recover,
                                    serve=serve)

    def submit(self, q: int, req_type: int, sector: int = 0, data: bytes = b"",
               in_len: int = 0, kick: bool = True) -> Req:
        mem = self.mem
        bufs = [mem.buffer(v.virtio_blk_outhdr.pack(req_type, 0, sector))]
        if data:
            bufs.append(mem.buffer(data))
        data_in = mem.buffer(in_len, writable=True) if in_len else None
        if data_in is not None:
            bufs.append(data_in)
        status = mem.buffer(b"\xff", writable=True)
        head = self.rings[q].add_chain([*bufs, status])
        if kick:
            os.eventfd_write(self.kicks[q], 1)
        return Req(q, head, status, data_in)

    def write(self, q: int, sector: int, data: bytes) -> Req:
        return self.submit(q, v.VIRTIO_BLK_T_OUT, sector, data)

    def status(self, req: Req) -> int:
        return self.mem.read(req.status.addr, 1)[0]

    def used(self, q: int) -> int:
        return self.rings[q].used_idx()

    def wait_used(self, q: int, n: int, timeout: float = 5.0) -> None:
        wait_until(lambda: self.used(q) == n, timeout, f"used index {n} on queue {q}")

    def served_within(self, q: int, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.used(q) >= n:
                return True
            time.sleep(0.005)
        return self.used(q) >= n


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.002)


def vd_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("vd-"))


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.backend.release()
    r.close()
    assert vd_threads() == []


def sector_data(sector: int, n: int = 512) -> bytes:
    return bytes((sector * 7 + i) & 0xFF for i in range(n))


# -- start and stop ---------------------------------------------------------------------


def test_queues_on_one_thread_serve_each(rig: Rig) -> None:
    for q in range(3):
        assert rig.start(q) == 0
    assert vd_threads() == ["vd-vq0,1,2"]
    assert rig.dev.running
    for q in range(3):
        req = rig.write(q, 8 * q, sector_data(q))
        rig.wait_used(q, 1)
        assert rig.status(req) == OK
        assert rig.backend._view[512 * 8 * q:512 * 8 * q + 512] == sector_data(q)
    assert rig.dev.last_avail(1) == 1
    assert rig.dev.last_avail(5) is None


def test_stop_one_queue_the_others_keep_serving(rig: Rig) -> None:
    for q in range(3):
        rig.start(q)
    for q in range(3):
        rig.write(q, q, sector_data(q))
        rig.wait_used(q, 1)
    assert rig.dev.stop_queue(1, inflight_timeout=1.0) == 1
    assert sorted(rig.dev.workers) == [0, 2]
    assert vd_threads() == ["vd-vq0,2"]
    assert rig.dev.served[1] == 1
    # queue 1 takes nothing now; 0 and 2 go on
    waiting = rig.write(1, 1, sector_data(1))
    for q in (0, 2):
        rig.write(q, q, sector_data(q))
        rig.wait_used(q, 2)
    assert not rig.served_within(1, 2, 0.1)
    # restarted from the position stop_queue returned, it serves what waited
    rig.start(1, last_avail_idx=1)
    rig.wait_used(1, 2)
    assert rig.status(waiting) == OK
    assert rig.dev.stop_queue(1, inflight_timeout=1.0) == 2
    assert rig.dev.served[1] == 2
    assert rig.dev.stop_queue(1, inflight_timeout=1.0) is None


def test_stop_queue_waits_for_requests_in_flight(rig: Rig) -> None:
    rig.start(0)
    rig.backend.hold_at.add(0)
    req = rig.write(0, 0, sector_data(0))
    rig.backend.wait_held(1)
    release_later(rig.backend, 0.2)
    started = time.monotonic()
    assert rig.dev.stop_queue(0, inflight_timeout=None) == 1
    assert time.monotonic() - started >= 0.15
    assert rig.used(0) == 1  # completed into the ring before stop_queue returned
    assert rig.status(req) == OK


def test_stop_queue_gives_up_after_the_timeout(rig: Rig) -> None:
    rig.start(0)
    rig.backend.hold_at.add(0)
    rig.write(0, 0, sector_data(0))
    rig.backend.wait_held(1)
    started = time.monotonic()
    assert rig.dev.stop_queue(0, inflight_timeout=0.2) == 1
    assert 0.15 <= time.monotonic() - started < 2
    assert rig.backend.release() == 1  # completes after the queue was given up: dropped
    assert rig.used(0) == 0
    # the ring restarted from where the driver's used index stands serves the request again
    rig.start(0, last_avail_idx=0)
    rig.wait_used(0, 1)


def test_stop_queue_does_not_stall_the_other_queues_of_its_thread(rig: Rig) -> None:
    """While stop_queue waits for queue 0's request, queues 1 and 2 (same thread) serve."""
    for q in range(3):
        rig.start(q)
    rig.backend.hold_at.add(0)
    rig.write(0, 0, sector_data(0))
    rig.backend.wait_held(1)
    stopper = threading.Thread(target=rig.dev.stop_queue, args=(0, 5.0))
    stopper.start()
    try:
        time.sleep(0.05)
        rig.write(1, 1, sector_data(1))
        rig.write(2, 2, sector_data(2))
        assert rig.served_within(1, 1, 1.0), "queue 1 stalled while queue 0 was stopping"
        assert rig.served_within(2, 1, 1.0), "queue 2 stalled while queue 0 was stopping"
    finally:
        rig.backend.release()
        stopper.join(5)
    assert not stopper.is_alive()
    assert rig.used(0) == 1


def test_threads_per_queue_stop_restarts_only_its_own() -> None:
    r = Rig(num_queues=3, queue_threads=3)
    try:
        for q in range(3):
            r.start(q)
        assert vd_threads() == ["vd-vq0", "vd-vq1", "vd-vq2"]
        others = {t.name: t for t in threading.enumerate() if t.name in ("vd-vq0", "vd-vq2")}
        r.dev.stop_queue(1, inflight_timeout=0)
        assert vd_threads() == ["vd-vq0", "vd-vq2"]
        still = {t.name: t for t in threading.enumerate() if t.name in ("vd-vq0", "vd-vq2")}
        assert still == others  # the same thread objects: untouched
        for q in (0, 2):
            r.write(q, q, sector_data(q))
            r.wait_used(q, 1)
    finally:
        r.close()
    assert vd_threads() == []


def test_start_queue_refusals_leave_nothing_started(rig: Rig) -> None:
    with pytest.raises(PyvduseError, match="does not exist"):
        rig.dev.start_queue(3, rig.state(0), rig.memory, rig.kicks[0], rig.notify(0))
    ring = rig.rings[0]
    with pytest.raises(PyvduseError, match="more than the queue size"):
        rig.dev.start_queue(0, QueueState(2 * QSIZE, ring.desc_addr, ring.avail_addr,
                                          ring.used_addr), rig.memory, rig.kicks[0],
                            rig.notify(0))
    with pytest.raises(PyvduseError, match="queue 0"):
        rig.dev.start_queue(0, QueueState(QSIZE, 1 << 40, ring.avail_addr, ring.used_addr),
                            rig.memory, rig.kicks[0], rig.notify(0))
    with pytest.raises(PyvduseError, match="queue 0"):
        rig.dev.start_queue(0, QueueState(12, ring.desc_addr, ring.avail_addr,
                                          ring.used_addr), rig.memory, rig.kicks[0],
                            rig.notify(0))
    assert rig.dev.workers == {}
    assert vd_threads() == []
    rig.start(0)
    with pytest.raises(PyvduseError, match="already running"):
        rig.start(0)
    assert vd_threads() == ["vd-vq0"]


def test_serve_false_then_one_thread_start(rig: Rig) -> None:
    for q in range(3):
        rig.write(q, q, sector_data(q))  # queued before the queues start
        rig.start(q, serve=False)
    assert vd_threads() == []
    assert not rig.served_within(0, 1, 0.05)
    rig.dev.serve()
    for q in range(3):
        rig.wait_used(q, 1)
    assert vd_threads() == ["vd-vq0,1,2"]


# -- stop_all and reset -----------------------------------------------------------------


def test_stop_all_returns_positions_after_requests_in_flight(rig: Rig) -> None:
    for q in range(3):
        rig.start(q)
    rig.write(0, 0, sector_data(0))
    rig.wait_used(0, 1)
    rig.backend.hold_at.update({512 * 5, 512 * 6})
    rig.write(0, 5, sector_data(5))
    rig.write(2, 6, sector_data(6))
    rig.backend.wait_held(2)
    release_later(rig.backend, 0.2)
    assert rig.dev.stop_all(inflight_timeout=5.0) == {0: 2, 1: 0, 2: 1}
    assert (rig.used(0), rig.used(2)) == (2, 1)
    assert rig.dev.workers == {}
    assert not rig.dev.running
    assert rig.dev.served == {0: 2, 1: 0, 2: 1}
    assert vd_threads() == []


@pytest.mark.parametrize("how", ["paused", "broken"])
def test_stop_all_waits_for_queues_no_thread_serves(rig: Rig, how: str) -> None:
    """A queue without a thread (paused, or stopped by a remap that failed) still has its
    requests in flight completed into its ring by stop_all."""
    rig.start(0)
    rig.start(1)
    rig.backend.hold_at.add(0)
    held = rig.write(0, 0, sector_data(0))
    rig.backend.wait_held(1)
    rig.dev.pause()
    if how == "broken":
        ring = rig.rings[0]
        assert not rig.dev.remap(0, QueueState(QSIZE, 1 << 40, ring.avail_addr,
                                               ring.used_addr), rig.memory)
        rig.dev.serve()
        assert vd_threads() == ["vd-vq1"]
    release_later(rig.backend, 0.2)
    assert rig.dev.stop_all(inflight_timeout=5.0) == {0: 1, 1: 0}
    assert rig.used(0) == 1
    assert rig.status(held) == OK


def test_stop_all_waits_once_whatever_the_number_of_threads() -> None:
    """Requests held on three queue threads: stop_all gives them one timeout in all,
    not one per thread."""
    r = Rig(num_queues=3, queue_threads=3)
    try:
        for q in range(3):
            r.start(q)
            r.backend.hold_at.add(512 * q)
            r.write(q, q, sector_data(q))
        r.backend.wait_held(3)
        started = time.monotonic()
        assert r.dev.stop_all(inflight_timeout=0.4) == {0: 1, 1: 1, 2: 1}
        assert 0.35 <= time.monotonic() - started < 0.7
        r.backend.release()
        assert [r.used(q) for q in range(3)] == [0, 0, 0]  # given up: dropped
    finally:
        r.close()
    assert vd_threads() == []


def test_reset_gives_up_requests_and_forgets_features(rig: Rig) -> None:
    rig.start(0)
    rig.start(1)
    rig.backend.hold_at.add(0)
    rig.write(0, 0, sector_data(0))
    rig.backend.wait_held(1)
    started = time.monotonic()
    rig.dev.reset()
    assert time.monotonic() - started < 1.0  # never waits for the backend
    assert rig.dev.driver_features == 0
    assert rig.dev.workers == {}
    assert vd_threads() == []
    rig.backend.release()  # the late completion goes nowhere
    assert rig.used(0) == 0
    # after a reset the driver starts over
    rig.dev.accept_features(FEATURES)
    rig.start(0, last_avail_idx=0)
    rig.wait_used(0, 1)


# -- pause, remap, serve ----------------------------------------------------------------


def test_pause_remap_serve_keeps_requests_in_flight(rig: Rig) -> None:
    for q in range(2):
        rig.start(q)
    rig.backend.hold_at.add(0)
    held = rig.write(0, 0, sector_data(0))
    rig.backend.wait_held(1)
    rig.dev.pause()
    assert vd_threads() == []
    rig.write(1, 1, sector_data(1))
    assert not rig.served_within(1, 1, 0.05)  # paused: nothing taken
    # a new view of the same memory, as after a memory table change: many small mappings
    rig.mem.split_entries(64 * 1024)
    memory = rig.mem.guest_memory()
    for q in range(2):
        assert rig.dev.remap(q, rig.state(q), memory)
    rig.dev.serve()
    rig.wait_used(1, 1)
    rig.backend.release()
    rig.wait_used(0, 1)  # completed into the remapped ring
    assert rig.status(held) == OK
    req = rig.write(0, 3, sector_data(3))
    rig.wait_used(0, 2)
    assert rig.status(req) == OK
    assert rig.dev.last_avail(0) == 2


def test_remap_to_an_unusable_ring_stops_only_that_queue(rig: Rig) -> None:
    for q in range(2):
        rig.start(q)
    rig.dev.pause()
    ring = rig.rings[0]
    assert not rig.dev.remap(0, QueueState(QSIZE, 1 << 40, ring.avail_addr, ring.used_addr),
                             rig.memory)
    assert rig.dev.remap(1, rig.state(1), rig.memory)
    rig.dev.serve()
    rig.write(0, 0, sector_data(0))
    rig.write(1, 1, sector_data(1))
    rig.wait_used(1, 1)
    assert not rig.served_within(0, 1, 0.1)
    assert vd_threads() == ["vd-vq1"]
    rig.dev.reset()
    rig.dev.accept_features(FEATURES)
    rig.start(0)
    rig.wait_used(0, 1)


# -- features ---------------------------------------------------------------------------


def test_refused_features(rig: Rig) -> None:
    offered = rig.model.features | (1 << 30)
    assert rig.dev.refused_features(offered, offered, 1 << 30) is None
    assert rig.dev.refused_features(FEATURES, offered, 0) is None
    why = rig.dev.refused_features(FEATURES | (1 << 60), offered, 0)
    assert why is not None and "never offered" in why
    why = rig.dev.refused_features(FEATURES, offered, 1 << 30)
    assert why is not None and "lack" in why and "0x40000000" in why
    rig.dev.accept_features(FEATURES)
    assert rig.dev.driver_features == FEATURES


# -- the inflight log -------------------------------------------------------------------


def make_log(tmp_path: Path, num_queues: int = 3) -> InflightLog:
    return InflightLog.create(str(tmp_path / "vd.inflight"), num_queues, QSIZE,
                              {"name": "vd"}, 4 * MiB)


def test_inflight_log_marks_and_clears(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    r = Rig(inflight_log=log)
    try:
        assert log.driver_features == FEATURES
        queue_log = log.queues[0]
        queue_log.slots[5] = 77  # stale: a fresh start forgets it
        r.start(0)
        assert queue_log.slots[5] == 0
        r.backend.hold_at.add(0)
        held = r.write(0, 0, sector_data(0))
        r.backend.wait_held(1)
        assert queue_log.slots[held.head] != 0  # marked while in the backend
        done = r.write(0, 1, sector_data(1))
        r.wait_used(0, 1)
        wait_until(lambda: queue_log.header[0] == 1)
        assert queue_log.slots[done.head] == 0
        assert queue_log.slots[held.head] != 0
        r.backend.release()
        r.wait_used(0, 2)
        wait_until(lambda: queue_log.slots[held.head] == 0)
        assert queue_log.header[0] == 2
        r.dev.reset()
        assert log.driver_features == 0
    finally:
        r.close()
        log.close()


def test_inflight_log_recovery_resubmits(tmp_path: Path) -> None:
    """A request marked in the log and never completed is served again on recovery."""
    log = make_log(tmp_path)
    r = Rig(inflight_log=log)
    try:
        r.start(0)
        r.backend.hold_at.add(0)
        lost = r.write(0, 0, sector_data(0))
        r.backend.wait_held(1)
        # the daemon "dies": the queue is given up with the request still marked
        r.dev.stop_queue(0, inflight_timeout=0)
        with r.backend.cond:
            r.backend.held.clear()  # its completion never comes
            r.backend.hold_at.clear()
        assert log.queues[0].slots[lost.head] != 0
        assert r.used(0) == 0
        assert r.start(0, recover=True) == 1  # resubmitted (not held this time)
        r.wait_used(0, 1)
        assert r.status(lost) == OK
        assert r.dev.last_avail(0) == 1
        wait_until(lambda: log.queues[0].slots[lost.head] == 0)
    finally:
        r.close()
        log.close()


def test_inflight_log_must_fit_the_model(tmp_path: Path) -> None:
    log = make_log(tmp_path, num_queues=2)
    try:
        with pytest.raises(PyvduseError, match="inflight log is for 2"):
            Rig(num_queues=3, inflight_log=log)
    finally:
        log.close()


def test_constructor_refusals() -> None:
    backend = MemoryBackend(MiB)
    model = BlkDevice(backend, BlkConfig.for_backend(backend, num_queues=2))
    with pytest.raises(PyvduseError, match="at least one queue thread"):
        VirtioDevice("vd", model, queue_threads=0)
    with pytest.raises(PyvduseError, match="negative"):
        VirtioDevice("vd", model, poll_max_ns=-1)
    assert VirtioDevice("vd", model, queue_threads=8).queue_threads == 2
