"""VduseDevice (lifecycle, control loop, queue workers) over FakeVduse with a BlkDevice."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pyvduse.backends.base import Backend
from pyvduse.blk import BlkConfig, BlkDevice
from pyvduse.device import VduseDevice
from pyvduse.errors import KernelError, PyvduseError
from pyvduse.kernel import DeviceSpec
from pyvduse.queue_worker import (
    PENDING,
    POLL_START_NS,
    QueueThread,
    QueueWorker,
    deferred_interrupts,
)
from pyvduse.testing import DriverMemory, FakeChannel, FakeVduse, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.uapi import vduse as u
from pyvduse.uapi import virtio as v
from pyvduse.virtqueue import SplitQueue, vring_need_event

MiB = 1 << 20
OK, IOERR = v.VIRTIO_BLK_S_OK, v.VIRTIO_BLK_S_IOERR
ACK, DRIVER = v.VIRTIO_CONFIG_S_ACKNOWLEDGE, v.VIRTIO_CONFIG_S_DRIVER
FEATURES_OK, DRIVER_OK = v.VIRTIO_CONFIG_S_FEATURES_OK, v.VIRTIO_CONFIG_S_DRIVER_OK
RESULT_OK, RESULT_FAILED = u.VDUSE_REQ_RESULT_OK, u.VDUSE_REQ_RESULT_FAILED


class Ram(Backend):
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.flushes = 0

    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset: int, buf: memoryview) -> None:
        self.data[offset:offset + len(buf)] = buf

    def flush(self) -> None:
        self.flushes += 1


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed * 101 + (i >> 9)) & 0xFF for i in range(n))


def bit(n: int) -> int:
    return 1 << n


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.001)


def wait_used_idx(ring: MockSplitRing, n: int) -> None:
    """Wait until the device has published used index ``n`` (without consuming anything)."""
    wait_until(lambda: ring.used_idx() == n, what=f"used index {n}")


def thread_names(prefix: str) -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(prefix))


@dataclass
class Req:
    queue: int
    head: int
    status: Buffer
    data_in: Buffer | None


class Rig:
    """A created device on a fake kernel, plus the driver-side helpers to use it."""

    def __init__(self, name: str = "t0", num_queues: int = 2, queue_size: int = 256,
                 fake: FakeVduse | None = None, backend: Backend | None = None,
                 queue_threads: int = 1) -> None:
        self.name = name
        self.backend = backend or Ram(4 * MiB)
        self.config = BlkConfig.for_backend(self.backend, num_queues=num_queues,
                                            queue_size=queue_size, serial="dev-serial")
        self.fake = fake or FakeVduse(DriverMemory(size=32 * MiB))
        self.mem = self.fake.memory
        self.dev = VduseDevice(name, BlkDevice(self.backend, self.config), kernel=self.fake,
                               queue_threads=queue_threads)
        self.dev.create()
        self.ch: FakeChannel = self.fake.channels[name]

    def queue_thread_names(self) -> list[str]:
        """The names of the threads serving the queues once they run."""
        if self.dev.queue_threads == 1:
            return [f"{self.name}-vq" + ",".join(map(str, range(self.config.num_queues)))]
        return [f"{self.name}-vq{i}" for i in range(self.config.num_queues)]

    @property
    def offered(self) -> int:
        """The model's bits and VDUSE's own."""
        return self.config.features | bit(v.VIRTIO_F_ACCESS_PLATFORM)

    def close(self) -> None:
        self.dev.destroy()
        self.mem.close()

    def ring(self, q: int) -> MockSplitRing:
        return self.ch.rings[q]

    def submit(self, q: int, req_type: int, sector: int = 0, data: bytes = b"", in_len: int = 0,
               *, publish: bool = True, indirect: bool = False) -> Req:
        bufs = [self.mem.buffer(v.virtio_blk_outhdr.pack(req_type, 0, sector))]
        if data:
            bufs.append(self.mem.buffer(data))
        data_in = self.mem.buffer(in_len, writable=True) if in_len else None
        if data_in:
            bufs.append(data_in)
        status = self.mem.buffer(b"\xff", writable=True)
        head = self.ring(q).add_chain([*bufs, status], indirect=indirect, publish=publish)
        return Req(q, head, status, data_in)

    def status(self, req: Req) -> int:
        return self.mem.read(req.status.addr, 1)[0]

    def data(self, req: Req) -> bytes:
        assert req.data_in is not None
        return self.mem.read(req.data_in.addr, req.data_in.length)

    def run(self, q: int, req_type: int, sector: int = 0, data: bytes = b"",
            in_len: int = 0) -> tuple[int, bytes, int]:
        """One request, kicked and waited for: (status, data-in, used length)."""
        req = self.submit(q, req_type, sector, data, in_len)
        self.ch.kick(q)
        (done,) = self.ch.wait_used(q, 1)
        assert done[0] == req.head
        return self.status(req), self.data(req) if req.data_in else b"", done[1]

    def batch(self, q: int, reqs: list[tuple[int, int, bytes, int]],
              indirect: bool = False) -> list[Req]:
        """Publish many chains with one avail-index store and one kick."""
        out = [self.submit(q, t, s, d, n, publish=False, indirect=indirect)
               for t, s, d, n in reqs]
        self.ring(q).publish([r.head for r in out])
        self.ch.kick(q)
        return out

    def wait_irq(self, q: int, count: int) -> None:
        """Like an interrupt-driven driver: wait for interrupt number ``count`` of queue ``q``.

        Completions must not be consumed before (``take_used`` re-arms ``used_event``, which
        can legitimately make the device skip an interrupt for completions already seen).
        """
        wait_until(lambda: self.ch.irqs[q] >= count, what=f"interrupt {count} on queue {q}")
        assert self.ch.irqs[q] == count

    def vq_state(self, index: int) -> tuple[int, int]:
        """GET_VQ_STATE: (result, avail index)."""
        response = self.ch.send(u.VDUSE_GET_VQ_STATE, u.vduse_vq_state_index.pack(index))
        _, result = u.vduse_dev_response_header.unpack_from(response)
        got_index, avail = u.vduse_vq_state_split.unpack_from(response,
                                                              u.VDUSE_REQUEST_PAYLOAD_OFFSET)
        if result == RESULT_OK:
            assert got_index == index
        return result, avail


@pytest.fixture(params=[1, 2], ids=["1-thread", "thread-per-queue"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(queue_threads=request.param)
    yield r
    r.close()
    assert thread_names("t0-") == []


@pytest.fixture
def running(rig: Rig) -> Rig:
    assert rig.ch.start() == RESULT_OK
    return rig


# -- create / start ---------------------------------------------------------------------------


def test_create_sets_up_every_queue(rig: Rig) -> None:
    spec = rig.fake.devices["t0"]
    assert (spec.name, spec.device_id, spec.vq_num) == ("t0", v.VIRTIO_ID_BLOCK, 2)
    assert spec.features == rig.offered
    assert spec.config == rig.config.config_space()
    assert rig.ch.max_sizes == {0: 256, 1: 256}
    assert thread_names("t0-") == ["t0-control"]
    assert rig.dev.workers == {}
    assert not rig.dev.driver_ok.is_set()


def test_driver_ok_starts_one_worker_per_queue(running: Rig) -> None:
    dev = running.dev
    assert dev.driver_ok.is_set()
    assert dev.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert dev.driver_features == running.offered
    assert sorted(dev.workers) == [0, 1]
    assert thread_names("t0-") == ["t0-control", *running.queue_thread_names()]
    assert sorted(running.ch.kick_fds) == [0, 1]
    for index, worker in dev.workers.items():
        assert worker.queue.size == 256
        assert worker.queue.event_idx and worker.queue.indirect
        assert running.ch.kick_fds[index] >= 0


def bring_up_to_features(ch: FakeChannel, features: int) -> int:
    ch.driver_features = features
    assert ch.set_status(ACK) == RESULT_OK
    assert ch.set_status(ACK | DRIVER) == RESULT_OK
    return ch.set_status(ACK | DRIVER | FEATURES_OK)


@pytest.mark.parametrize("extra", [v.VIRTIO_BLK_F_CONFIG_WCE, v.VIRTIO_F_RING_PACKED,
                                   v.VIRTIO_BLK_F_RO, 63])
def test_features_not_offered_are_refused(rig: Rig, extra: int) -> None:
    assert not rig.offered & bit(extra)
    assert bring_up_to_features(rig.ch, rig.offered | bit(extra)) == RESULT_FAILED
    assert rig.dev.status == ACK | DRIVER
    assert rig.dev.driver_features == 0
    # the driver may reset and try again with what was offered
    assert rig.ch.reset() == RESULT_OK
    assert rig.ch.start() == RESULT_OK
    assert rig.dev.driver_features == rig.offered


@pytest.mark.parametrize("missing", [v.VIRTIO_F_VERSION_1, v.VIRTIO_F_ACCESS_PLATFORM])
def test_mandatory_features(rig: Rig, missing: int) -> None:
    assert rig.ch.start(features=rig.offered & ~bit(missing)) == RESULT_FAILED
    assert not rig.dev.status & FEATURES_OK
    assert rig.dev.workers == {}


def test_minimal_feature_set_is_accepted(rig: Rig) -> None:
    minimal = bit(v.VIRTIO_F_VERSION_1) | bit(v.VIRTIO_F_ACCESS_PLATFORM)
    assert rig.ch.start(features=minimal) == RESULT_OK
    for worker in rig.dev.workers.values():
        assert not worker.queue.event_idx and not worker.queue.indirect
    assert rig.run(0, v.VIRTIO_BLK_T_GET_ID, in_len=20)[:2] == (OK, b"dev-serial" + bytes(10))


def test_driver_ok_with_an_unusable_ring_fails_cleanly(rig: Rig) -> None:
    ch = rig.ch
    assert bring_up_to_features(ch, rig.offered) == RESULT_OK
    ch.setup_queue(0)
    ch.setup_queue(1).desc_addr += 8  # misaligned: queue 1 cannot start after queue 0 did
    assert ch.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK) == RESULT_FAILED
    assert rig.dev.workers == {}
    assert not rig.dev.driver_ok.is_set()
    assert rig.dev.status == ACK | DRIVER | FEATURES_OK
    wait_until(lambda: thread_names("t0-vq") == [], what="queue threads to end")
    assert ch.reset() == RESULT_OK
    assert ch.start() == RESULT_OK
    assert rig.run(1, v.VIRTIO_BLK_T_FLUSH)[0] == OK


# -- I/O --------------------------------------------------------------------------------------


def test_io_on_two_queues_with_many_requests_in_flight(running: Rig) -> None:
    r, block, per_queue = running, 4096, 64
    payload = {(q, i): pattern(block, q * per_queue + i) for q in (0, 1) for i in range(per_queue)}

    def sector(q: int, i: int) -> int:
        return (q * per_queue + i) * (block // 512)

    writes = {q: r.batch(q, [(v.VIRTIO_BLK_T_OUT, sector(q, i), payload[q, i], 0)
                             for i in range(per_queue)], indirect=bool(q))
              for q in (0, 1)}
    for q in (0, 1):
        r.wait_irq(q, 1)  # one batch (one avail-index store), used_event armed: one interrupt
        done = r.ch.wait_used(q, per_queue, timeout=0)
        assert done == [(req.head, 1) for req in writes[q]]  # in order, status byte only
        assert all(r.status(req) == OK for req in writes[q])
    for (q, i), data in payload.items():
        assert r.backend.data[sector(q, i) * 512:][:block] == data

    # read back crosswise: queue 0 reads what queue 1 wrote and vice versa
    reads = {q: r.batch(q, [(v.VIRTIO_BLK_T_IN, sector(1 - q, i), b"", block)
                            for i in range(per_queue)])
             for q in (0, 1)}
    for q in (0, 1):
        r.wait_irq(q, 2)
        done = r.ch.wait_used(q, per_queue, timeout=0)
        assert done == [(req.head, block + 1) for req in reads[q]]
        for i, req in enumerate(reads[q]):
            assert (r.status(req), r.data(req)) == (OK, payload[1 - q, i])
    assert r.ch.irqs == [2, 2]
    assert all(w.requests == 2 * per_queue and w.bad_chains == 0
               for w in r.dev.workers.values())
    assert r.vq_state(0) == (RESULT_OK, 2 * per_queue)


def test_interrupts_never_exceed_batches(running: Rig) -> None:
    # A polling driver (wait_used re-arms used_event as it consumes): at most one interrupt
    # per batch; possibly fewer, when the driver saw the completions first.
    r = running
    for round_ in range(1, 6):
        r.batch(0, [(v.VIRTIO_BLK_T_FLUSH, 0, b"", 0)] * round_)
        assert len(r.ch.wait_used(0, round_)) == round_
        assert r.ch.irqs[0] <= round_
    assert r.backend.flushes == 15
    assert r.ch.irqs[1] == 0
    assert r.dev.workers[0].requests == 15


def test_one_interrupt_per_batch_for_an_interrupt_driven_driver(running: Rig) -> None:
    r = running
    for round_ in range(1, 6):
        reqs = r.batch(1, [(v.VIRTIO_BLK_T_GET_ID, 0, b"", 20)] * (3 * round_))
        r.wait_irq(1, round_)
        assert r.ch.wait_used(1, len(reqs), timeout=0) == [(req.head, 21) for req in reqs]
    assert r.ch.irqs == [0, 5]


def test_event_idx_suppresses_interrupts(running: Rig) -> None:
    r = running
    ring = r.ring(0)
    # the driver never advances used_event (it stays 0): only the first completion interrupts
    for n in range(1, 11):
        r.submit(0, v.VIRTIO_BLK_T_FLUSH)
        r.ch.kick(0)
        wait_used_idx(ring, n)
        r.wait_irq(0, 1)  # the device interrupts after publishing: wait for it, if it comes
    ring.set_used_event(11)  # interrupt me when used passes 11, i.e. at the 12th completion
    for n in range(11, 14):
        r.submit(0, v.VIRTIO_BLK_T_FLUSH)
        r.ch.kick(0)
        wait_used_idx(ring, n)
        r.wait_irq(0, 1 if n < 12 else 2)
    # and the device asked for a kick at the next buffer
    wait_until(lambda: ring.avail_event() == 13, what="avail_event 13")
    assert r.backend.flushes == 13


def test_no_interrupt_flag_without_event_idx(rig: Rig) -> None:
    assert rig.ch.start(features=rig.offered & ~bit(v.VIRTIO_RING_F_EVENT_IDX)) == RESULT_OK
    ring = rig.ring(0)
    ring.set_avail_flags(v.VRING_AVAIL_F_NO_INTERRUPT)
    for n in range(1, 4):
        rig.submit(0, v.VIRTIO_BLK_T_FLUSH)
        rig.ch.kick(0)
        wait_used_idx(ring, n)
    assert rig.ch.irqs[0] == 0
    assert len(ring.take_used()) == 3
    ring.set_avail_flags(0)
    req = rig.submit(0, v.VIRTIO_BLK_T_FLUSH)
    rig.ch.kick(0)
    rig.wait_irq(0, 1)
    assert ring.take_used() == [(req.head, 1)]
    wait_until(lambda: ring.used_flags() == 0, what="kicks re-enabled after the drain")


def test_work_queued_before_driver_ok_is_served(rig: Rig) -> None:
    ch = rig.ch
    assert bring_up_to_features(ch, rig.offered) == RESULT_OK
    ch.setup_queue(0)
    ch.setup_queue(1)
    req = rig.submit(1, v.VIRTIO_BLK_T_GET_ID, in_len=20)  # no kick: no kick fd yet
    assert ch.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK) == RESULT_OK
    assert ch.wait_used(1, 1) == [(req.head, 21)]
    assert rig.data(req) == b"dev-serial" + bytes(10)


# -- control messages -------------------------------------------------------------------------


def test_get_vq_state_returns_last_avail_idx(running: Rig) -> None:
    r = running
    assert r.vq_state(0) == (RESULT_OK, 0)
    for _ in range(5):
        r.run(0, v.VIRTIO_BLK_T_FLUSH)
    r.batch(1, [(v.VIRTIO_BLK_T_FLUSH, 0, b"", 0)] * 3)
    r.ch.wait_used(1, 3)
    assert r.vq_state(0) == (RESULT_OK, 5)
    assert r.vq_state(1) == (RESULT_OK, 3)
    assert r.vq_state(2)[0] == RESULT_FAILED
    assert r.vq_state(0xFFFF_FFFF)[0] == RESULT_FAILED


def test_get_vq_state_before_driver_ok_asks_the_kernel(rig: Rig) -> None:
    assert rig.vq_state(1) == (RESULT_OK, 0)


@pytest.mark.parametrize("req_type", [3, 4, 5, 99, 0xFFFF_FFFF])
def test_unknown_control_message_is_refused(rig: Rig, req_type: int) -> None:
    response = rig.ch.send(req_type, b"\x01" * 16)
    assert len(response) == u.VDUSE_DEV_RESPONSE_SIZE
    request_id, result = u.vduse_dev_response_header.unpack_from(response)
    assert result == RESULT_FAILED
    assert request_id == rig.ch._next_id - 1
    assert response[8:] == bytes(u.VDUSE_DEV_RESPONSE_SIZE - 8)
    # the loop is still alive
    assert rig.ch.set_status(ACK) == RESULT_OK


def test_handle_request_never_raises(rig: Rig) -> None:
    request = bytearray(u.VDUSE_DEV_REQUEST_SIZE)
    u.vduse_dev_request_header.pack_into(request, 0, u.VDUSE_UPDATE_IOTLB, 77)
    response = rig.dev.handle_request(bytes(request[:26]))  # truncated payload
    assert u.vduse_dev_response_header.unpack_from(response) == (77, RESULT_FAILED)


def test_reset_stops_workers_and_drops_kick_fds(running: Rig) -> None:
    r = running
    assert r.run(0, v.VIRTIO_BLK_T_OUT, 0, pattern(512, 1))[0] == OK
    kick_fds = dict(r.ch.kick_fds)
    assert r.ch.set_status(0) == RESULT_OK  # the raw message: the fake forgets nothing itself
    assert r.dev.workers == {}
    assert r.dev.status == 0 and r.dev.driver_features == 0
    assert not r.dev.driver_ok.is_set()
    assert r.ch.kick_fds == {}  # the device deassigned them
    for fd in kick_fds.values():
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    assert thread_names("t0-") == ["t0-control"]


def test_start_after_reset(running: Rig) -> None:
    r = running
    data = pattern(4096, 2)
    assert r.run(1, v.VIRTIO_BLK_T_OUT, 8, data)[0] == OK
    old_rings = dict(r.ch.rings)
    assert r.ch.reset() == RESULT_OK
    assert r.ch.start() == RESULT_OK  # re-attach: new rings at new addresses
    assert r.ring(0).desc_addr != old_rings[0].desc_addr
    assert sorted(r.dev.workers) == [0, 1]
    assert r.vq_state(1) == (RESULT_OK, 0)
    assert r.run(0, v.VIRTIO_BLK_T_IN, 8, in_len=4096) == (OK, data, 4097)
    assert r.run(1, v.VIRTIO_BLK_T_IN, 8, in_len=4096) == (OK, data, 4097)


def test_update_iotlb_while_running_keeps_ring_positions(running: Rig) -> None:
    r = running
    for i in range(5):
        r.run(0, v.VIRTIO_BLK_T_OUT, 8 * i, pattern(4096, i))
    for _ in range(3):
        r.run(1, v.VIRTIO_BLK_T_FLUSH)
    old_queues = {q: w.queue for q, w in r.dev.workers.items()}
    # the "VMM" remaps memory: now one IOTLB entry per page, so buffers straddle entries
    r.mem.split_entries(4096)
    faults = r.mem.faults
    response = r.ch.send(u.VDUSE_UPDATE_IOTLB, u.vduse_iova_range.pack(0, 2**64 - 1))
    assert u.vduse_dev_response_header.unpack_from(response)[1] == RESULT_OK
    assert sorted(r.dev.workers) == [0, 1]
    for q, expected in ((0, 5), (1, 3)):
        worker = r.dev.workers[q]
        assert worker.queue is not old_queues[q]  # the same requests, remapped rings
        assert (worker.queue.last_avail_idx, worker.queue.used_idx) == (expected, expected)
    assert thread_names("t0-vq") == r.queue_thread_names()
    for i in range(5):
        status, data, written = r.run(0, v.VIRTIO_BLK_T_IN, 8 * i, in_len=4096)
        assert (status, data, written) == (OK, pattern(4096, i), 4097)
    assert r.run(1, v.VIRTIO_BLK_T_OUT, 80, pattern(8192, 9))[0] == OK
    assert r.backend.data[80 * 512:80 * 512 + 8192] == pattern(8192, 9)
    assert r.mem.faults > faults + 3  # everything was mapped again, page by page
    assert r.vq_state(0) == (RESULT_OK, 10)
    assert r.vq_state(1) == (RESULT_OK, 4)


def test_update_iotlb_before_driver_ok(rig: Rig) -> None:
    response = rig.ch.send(u.VDUSE_UPDATE_IOTLB, u.vduse_iova_range.pack(0, 2**64 - 1))
    assert u.vduse_dev_response_header.unpack_from(response)[1] == RESULT_OK
    assert rig.dev.workers == {}
    assert rig.ch.start() == RESULT_OK


def test_update_config(running: Rig) -> None:
    r = running
    r.dev.update_config(0, (123).to_bytes(8, "little"))
    assert r.ch.config[:8] == (123).to_bytes(8, "little")
    assert r.ch.config[8:] == r.config.config_space()[8:]
    assert r.ch.config_irqs == 1
    assert r.ch.reset() == RESULT_OK
    r.dev.update_config(0, (456).to_bytes(8, "little"))
    assert r.ch.config_irqs == 1  # no interrupt before DRIVER_OK


# -- bad rings --------------------------------------------------------------------------------


def test_malformed_chain_is_completed_with_zero_length(running: Rig) -> None:
    r = running
    ring = r.ring(0)
    hdr = r.mem.buffer(v.virtio_blk_outhdr.pack(v.VIRTIO_BLK_T_FLUSH, 0, 0))
    bad = ring.add_chain([hdr, r.mem.buffer(1, writable=True)], publish=False)
    ring.write_desc(bad + 1, hdr.addr, 16, v.VRING_DESC_F_NEXT, bad)  # loops back to the head
    ring.publish([bad])
    good = r.submit(0, v.VIRTIO_BLK_T_GET_ID, in_len=20)
    r.ch.kick(0)
    assert r.ch.wait_used(0, 2) == [(bad, 0), (good.head, 21)]
    assert r.status(good) == OK
    assert r.dev.workers[0].bad_chains == 1
    for _ in range(3):  # the queue carries on
        assert r.run(0, v.VIRTIO_BLK_T_FLUSH) == (OK, b"", 1)
    assert r.backend.flushes == 3


def test_out_of_range_head_is_skipped(running: Rig) -> None:
    r = running
    ring = r.ring(0)
    ring.publish([ring.size + 5])
    req = r.submit(0, v.VIRTIO_BLK_T_FLUSH)
    r.ch.kick(0)
    assert r.ch.wait_used(0, 1) == [(req.head, 1)]
    assert r.vq_state(0) == (RESULT_OK, 2)
    assert r.dev.workers[0].bad_chains == 1
    assert r.run(0, v.VIRTIO_BLK_T_FLUSH)[0] == OK


def test_avail_index_jump_breaks_only_that_queue(running: Rig) -> None:
    r = running
    ring0 = r.ring(0)
    ring0.publish([], avail_idx=ring0.avail_idx + ring0.size + 1)
    r.ch.kick(0)
    wait_until(lambda: r.dev.workers[0].broken, what="queue 0 to stop")
    assert r.dev.workers[0].queue.broken
    r.ch.kick(0)  # no longer served: nothing is read from the broken ring
    reqs = r.batch(1, [(v.VIRTIO_BLK_T_OUT, 8 * i, pattern(4096, i), 0) for i in range(32)])
    assert r.ch.wait_used(1, 32) == [(req.head, 1) for req in reqs]
    assert r.vq_state(0) == (RESULT_OK, 0)
    # a reset repairs it
    assert r.ch.reset() == RESULT_OK
    assert r.ch.start() == RESULT_OK
    assert r.run(0, v.VIRTIO_BLK_T_IN, 8 * 31, in_len=4096) == (OK, pattern(4096, 31), 4097)


# -- destroy / unwinding ----------------------------------------------------------------------


class RecordingVduse(FakeVduse):
    def __init__(self) -> None:
        super().__init__(DriverMemory(size=32 * MiB))
        self.events: list[tuple[str, bool]] = []

    def destroy_device(self, name: str) -> None:
        channel = self.channels.get(name)
        self.events.append(("destroy_device", channel is not None and channel.is_open))
        super().destroy_device(name)


@pytest.mark.parametrize("started", [False, True])
def test_destroy_closes_the_channel_before_destroying(started: bool) -> None:
    fake = RecordingVduse()
    r = Rig("d0", fake=fake)
    try:
        if started:
            assert r.ch.start() == RESULT_OK
            assert r.run(0, v.VIRTIO_BLK_T_FLUSH)[0] == OK
        r.dev.destroy()
        assert fake.events == [("destroy_device", False)]
        assert fake.destroyed == ["d0"]
        assert not r.ch.is_open
        assert "d0" not in fake.devices
        assert r.ch.kick_fds == {}
        assert thread_names("d0-") == []
        with pytest.raises(PyvduseError):
            r.dev.channel  # noqa: B018
        r.dev.destroy()  # idempotent
        assert fake.destroyed == ["d0"]
        assert len(fake.events) == 1
    finally:
        r.mem.close()


class FailingSetup(FakeVduse):
    """vq_setup of queue ``fail_at`` fails as the kernel would (EINVAL)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(DriverMemory(size=MiB))
        self.fail_at = fail_at

    def open_device(self, name: str) -> FakeChannel:
        channel = super().open_device(name)
        real = channel.vq_setup

        def vq_setup(index: int, max_size: int) -> None:
            if index == self.fail_at:
                raise KernelError(name, "VDUSE_VQ_SETUP", errno.EINVAL)
            real(index, max_size)

        channel.vq_setup = vq_setup  # type: ignore[method-assign]
        return channel


def test_create_failure_unwinds() -> None:
    before = set(threading.enumerate())
    fake = FailingSetup(fail_at=1)
    backend = Ram(MiB)
    dev = VduseDevice("f0", BlkDevice(backend, BlkConfig.for_backend(backend, num_queues=2)),
                      kernel=fake)
    try:
        with pytest.raises(KernelError, match="VDUSE_VQ_SETUP"):
            dev.create()
        assert fake.destroyed == ["f0"]
        assert fake.devices == {}
        assert not fake.channels["f0"].is_open
        assert set(threading.enumerate()) == before
        assert thread_names("f0-") == []
        dev.destroy()  # nothing left to do
        assert fake.destroyed == ["f0"]
    finally:
        fake.memory.close()


def test_create_failure_when_the_kernel_refuses_the_device() -> None:
    fake = FakeVduse(DriverMemory(size=MiB))
    fake.devices["dup"] = DeviceSpec("dup", 2, 0, 1, b"")  # the name exists already
    backend = Ram(MiB)
    dev = VduseDevice("dup", BlkDevice(backend, BlkConfig.for_backend(backend)), kernel=fake)
    try:
        with pytest.raises(KernelError) as info:
            dev.create()
        assert info.value.errno == errno.EEXIST
        assert fake.destroyed == []  # not ours to destroy
        assert "dup" not in fake.channels
        assert thread_names("dup-") == []
    finally:
        fake.memory.close()


# -- the queue worker on its own --------------------------------------------------------------


@dataclass
class LoneQueue:
    """One 8-entry split ring in driver memory, served by workers without a device."""

    ring: MockSplitRing
    queue: SplitQueue
    kick: int
    status: Buffer  # a one-byte writable buffer: a chain of it is a request
    workers: list[QueueWorker]

    def worker(self, handle: Callable[[Any, Callable[[int, int], None]], int],
               notify: Callable[[], None] = lambda: None, **kwargs: Any) -> QueueWorker:
        """A worker of the queue, closed with it."""
        worker = QueueWorker("w", self.queue, handle, self.kick, notify, **kwargs)
        self.workers.append(worker)
        return worker


@pytest.fixture
def lone() -> Iterator[LoneQueue]:
    with lone_queue() as queue:
        yield queue


@contextlib.contextmanager
def lone_queue() -> Iterator[LoneQueue]:
    dmem = DriverMemory(size=MiB)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ring = MockSplitRing(dmem, 8)
    gmem = dmem.guest_memory()
    queue = SplitQueue(gmem, 8, ring.desc_addr, ring.avail_addr, ring.used_addr,
                       event_idx=True, indirect=True)
    lone = LoneQueue(ring, queue, kick, dmem.buffer(1, writable=True), [])
    try:
        yield lone
    finally:
        for worker in lone.workers:
            worker.close()
        queue.release()
        gmem.invalidate()
        os.close(kick)
        dmem.close()


def test_queue_thread_stop_is_idempotent(lone: LoneQueue) -> None:
    started = QueueThread("w-started", [lone.worker(lambda chain, complete: 0)])
    started.start()
    started.stop()
    started.stop()  # documented as idempotent
    never = QueueThread("w-never", [lone.worker(lambda chain, complete: 0)])
    never.stop()
    never.stop()
    assert thread_names("w-") == []
    for worker in started.workers + never.workers:
        worker.detach()
        worker.detach()
        assert worker.done_fd == -1


def test_drain_yields_after_its_batches_while_work_keeps_coming(lone: LoneQueue) -> None:
    def handle(chain: object, complete: object) -> int:
        lone.ring.add_chain([lone.status])  # a driver that never stops submitting
        lone.ring.take_used()
        return 1

    worker = lone.worker(handle)
    lone.ring.add_chain([lone.status])
    assert worker.drain(batches=3) is True  # work left: the thread serves others first
    assert worker.requests == 3
    assert worker.drain(batches=2) is True
    assert worker.requests == 5


def test_completions_reaped_when_the_batches_run_out_are_published(lone: LoneQueue) -> None:
    # A completion handed in while a turn's last batch runs is pushed by the reap that
    # follows it; the turn ends there, and the next turn may find nothing new to do. The
    # completion must reach the driver anyway (it once stayed pushed but unpublished:
    # a request lost for good, the driver waiting forever).
    interrupts: list[int] = []

    def handle(chain: Any, complete: Callable[[int, int], None]) -> int:
        complete(chain.head, 1)  # a backend that finishes before submit returns
        return PENDING

    worker = lone.worker(handle, lambda: interrupts.append(1))
    head = lone.ring.add_chain([lone.status])
    lone.ring.set_used_event(0)
    assert worker.drain(batches=1) is True  # the reap after the batch found work
    assert worker.drain(batches=1) is False  # nothing new: kicks enabled
    assert lone.ring.take_used() == [(head, 1)]
    assert worker.inflight == 0
    assert interrupts, "the driver asked to be interrupted and was not"


def test_each_batch_is_handled_between_plug_and_unplug(lone: LoneQueue) -> None:
    events: list[str] = []

    def handle(chain: Any, complete: Callable[[int, int], None]) -> int:
        events.append("handle")
        if len(events) == 3:
            lone.ring.add_chain([lone.status])  # arrives during the first batch: a second batch
        return 1

    worker = lone.worker(handle, plug=lambda: events.append("plug"),
                         unplug=lambda: events.append("unplug"))
    lone.ring.add_chain([lone.status])
    lone.ring.add_chain([lone.status])
    assert worker.drain() is False
    assert events == ["plug", "handle", "handle", "unplug", "plug", "handle", "unplug"]
    assert len(lone.ring.take_used()) == 3
    events.clear()
    assert worker.drain() is False  # nothing to do: no empty batch
    assert events == []


def test_each_batch_interrupts_a_driver_that_asked_for_it(lone: LoneQueue) -> None:
    # A driver refills the ring as its requests complete: a batch's completions must not
    # wait for the batches that arrive meanwhile (that starved the driver at QD32).
    interrupts: list[int] = []
    handled: list[int] = []

    def handle(chain: Any, complete: Callable[[int, int], None]) -> int:
        handled.append(chain.head)
        if len(handled) == 1:
            lone.ring.add_chain([lone.status])  # a second batch, while the first is served
        else:
            assert interrupts == [1], "the first batch's completion was held back"
            lone.ring.set_used_event(1)  # the driver took the first completion and re-armed
        return 1

    worker = lone.worker(handle, lambda: interrupts.append(1))
    lone.ring.add_chain([lone.status])
    lone.ring.set_used_event(0)
    assert worker.drain() is False
    assert len(lone.ring.take_used()) == 2
    assert interrupts == [1, 1]


class FailingUnplug(Ram):
    def unplug(self) -> None:
        raise RuntimeError("bug in unplug")


def test_only_a_backend_that_batches_is_plugged() -> None:
    assert BlkDevice(Ram(MiB), BlkConfig.for_backend(Ram(MiB))).batches is False
    assert BlkDevice(FailingUnplug(MiB), BlkConfig.for_backend(Ram(MiB))).batches is True


def test_a_failing_unplug_is_logged_and_the_queue_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    backend = FailingUnplug(MiB)
    device = BlkDevice(backend, BlkConfig.for_backend(backend))
    with caplog.at_level("ERROR"):
        device.plug()
        device.unplug()
    assert "unplug() failed" in caplog.text and "bug in unplug" in caplog.text


def test_a_completion_outside_a_batch_reaches_the_driver_from_the_completing_thread(
        lone: LoneQueue) -> None:
    held: list[tuple[int, Callable[[int, int], None]]] = []
    interrupted_on: list[str] = []

    def handle(chain: Any, complete: Callable[[int, int], None]) -> int:
        if held:  # the second request: the first one completes while this batch runs
            first, finish = held[0]
            thread = threading.Thread(target=finish, args=(first, 1), name="late")
            thread.start()
            thread.join()
        held.append((chain.head, complete))
        return PENDING

    worker = lone.worker(handle, lambda: interrupted_on.append(threading.current_thread().name))
    first = lone.ring.add_chain([lone.status])
    second = lone.ring.add_chain([lone.status])
    lone.ring.set_used_event(0)
    assert worker.drain() is False
    # The first request completed during the batch: queued for the serving thread,
    # which pushed it with its next reap.
    assert lone.ring.take_used() == [(first, 1)]
    assert os.eventfd_read(worker.done_fd) == 1
    assert worker.inflight == 1
    lone.ring.set_used_event(1)
    # The second completes while no batch runs: pushed, published and signalled by
    # the completing thread itself, with no drain.
    thread = threading.Thread(target=held[1][1], args=(second, 1), name="outside")
    thread.start()
    thread.join()
    assert lone.ring.take_used() == [(second, 1)]
    assert interrupted_on[-1] == "outside"
    assert worker.inflight == 0
    with pytest.raises(BlockingIOError):
        os.eventfd_read(worker.done_fd)  # the serving thread was not woken


def held_requests(lone: LoneQueue, count: int) -> tuple[QueueWorker, list[int], list[int]]:
    """A worker that left ``count`` requests pending; its interrupts are counted."""
    interrupts: list[int] = []
    worker = lone.worker(lambda chain, complete: PENDING, lambda: interrupts.append(1))
    heads = [lone.ring.add_chain([lone.status]) for _ in range(count)]
    assert worker.drain() is False
    lone.ring.set_used_event(0)  # the driver wants to hear of the first completion
    return worker, heads, interrupts


def test_completions_in_a_deferred_block_interrupt_once_at_its_end(lone: LoneQueue) -> None:
    worker, heads, interrupts = held_requests(lone, 3)
    with deferred_interrupts():
        for head in heads:
            worker.complete(head, 1)
        assert lone.ring.used_idx() == 3  # published at once...
        assert interrupts == []  # ...signalled later
    assert interrupts == [1]
    assert lone.ring.take_used() == [(head, 1) for head in heads]
    assert worker.inflight == 0


def test_the_signal_of_a_deferred_block_interrupts_for_what_completed_so_far(
        lone: LoneQueue) -> None:
    worker, heads, interrupts = held_requests(lone, 2)
    with deferred_interrupts() as signal:
        worker.complete(heads[0], 1)
        signal()  # e.g. before waiting for more replies
        assert interrupts == [1]
        assert lone.ring.take_used() == [(heads[0], 1)]  # the driver re-arms used_event
        with deferred_interrupts():  # nested: the outer block signals
            worker.complete(heads[1], 1)
        assert interrupts == [1]
    assert interrupts == [1, 1]


def test_a_deferred_interrupt_during_a_batch_is_sent_by_the_serving_thread(
        lone: LoneQueue) -> None:
    worker, heads, interrupts = held_requests(lone, 1)
    with deferred_interrupts():
        worker.complete(heads[0], 1)
        worker.ring_lock.acquire()  # as the serving thread does for a batch
    worker.ring_lock.release()
    assert interrupts == []  # the block's end did not wait for the lock...
    assert os.eventfd_read(worker.done_fd) == 1  # ...it woke the serving thread
    assert worker.drain() is False
    assert interrupts == [1]
    assert lone.ring.take_used() == [(heads[0], 1)]


def test_a_stopping_queue_is_interrupted_at_once_even_in_a_deferred_block(
        lone: LoneQueue) -> None:
    worker, heads, interrupts = held_requests(lone, 1)
    worker.stopping = True
    with deferred_interrupts():
        worker.complete(heads[0], 1)
        assert interrupts == [1]
    assert interrupts == [1]


# -- polling ----------------------------------------------------------------------------------


def test_a_queue_drained_for_polling_asks_for_kicks_only_when_rearmed(lone: LoneQueue) -> None:
    worker = lone.worker(lambda chain, complete: 1)
    lone.ring.add_chain([lone.status])
    assert worker.drain(rearm=False) is False
    assert lone.ring.avail_event() == 0  # still asking for no kick past the first chain
    assert worker.rearm() is False
    assert lone.ring.avail_event() == 1
    lone.ring.add_chain([lone.status], publish=True)
    assert worker.has_work()
    assert worker.rearm() is True  # the chain that came meanwhile is reported


def test_a_polling_thread_serves_a_chain_that_came_without_a_kick(lone: LoneQueue) -> None:
    worker = lone.worker(lambda chain, complete: 1)
    thread = QueueThread("w-poll", [worker], poll_max_ns=10**9)
    thread.poll_ns = 10**9  # as if the traffic had grown the window already
    thread.start()
    try:
        time.sleep(0.05)  # the thread drained the empty ring and polls now
        head = lone.ring.add_chain([lone.status])  # no kick: only polling can see it
        wait_until(lambda: lone.ring.used_idx() == 1, what="the chain served by polling")
        assert lone.ring.take_used() == [(head, 1)]
        assert thread.polls_found >= 1
    finally:
        thread.stop()


def test_without_polling_a_chain_waits_for_its_kick(lone: LoneQueue) -> None:
    worker = lone.worker(lambda chain, complete: 1)
    thread = QueueThread("w-nopoll", [worker])
    thread.start()
    try:
        lone.ring.add_chain([lone.status])
        time.sleep(0.1)
        assert lone.ring.used_idx() == 0  # asleep on the kick eventfd
        os.eventfd_write(lone.kick, 1)
        wait_until(lambda: lone.ring.used_idx() == 1, what="the kicked chain")
    finally:
        thread.stop()


def test_the_polling_window_grows_with_short_sleeps_and_shrinks_with_long_ones() -> None:
    thread = QueueThread("w-adapt", [], poll_max_ns=100_000)
    thread._adapt(50_000)  # a request came 50 us after the thread slept: polling would pay
    assert thread.poll_ns == POLL_START_NS
    for _ in range(10):
        thread._adapt(50_000)
    assert thread.poll_ns == 64_000  # doubled until it covers such a sleep
    for _ in range(10):
        thread._adapt(99_000)
    assert thread.poll_ns == 100_000  # and never beyond the maximum
    thread._adapt(10_000)  # within the window's reach: kept
    assert thread.poll_ns == 100_000
    thread._adapt(5_000_000)  # idle: polling would have been wasted
    assert thread.poll_ns == 50_000
    for _ in range(5):
        thread._adapt(5_000_000)
    assert thread.poll_ns == 0  # an idle device does not poll
    with pytest.raises(ValueError, match="negative"):
        QueueThread("w-bad", [], poll_max_ns=-1)



def add_and_kick_if_asked(lone: LoneQueue) -> int:
    """Make a chain available and kick as a driver does: only if the device asked for it."""
    before = lone.ring.avail_idx
    head = lone.ring.add_chain([lone.status])
    if vring_need_event(lone.ring.avail_event(), lone.ring.avail_idx, before):
        os.eventfd_write(lone.kick, 1)
    return head


def test_a_polling_thread_busy_with_one_queue_still_hears_the_others_kicks() -> None:
    # A queue drained dry is left without kicks only while its thread polls; while
    # another queue keeps the thread busy it must ask for kicks again, or its new
    # chains wait until every queue of the thread is idle.
    with lone_queue() as busy, lone_queue() as quiet:
        keep_going = threading.Event()
        keep_going.set()

        def endless(chain: object, complete: object) -> int:
            if keep_going.is_set():
                busy.ring.add_chain([busy.status])  # a driver that never stops submitting
            busy.ring.take_used()
            return 1

        quiet.ring.add_chain([quiet.status])  # served on start: kicks then left off
        thread = QueueThread("w-two", [busy.worker(endless), quiet.worker(lambda c, d: 1)],
                             poll_max_ns=10**9)
        busy.ring.add_chain([busy.status])
        thread.start()
        try:
            wait_until(lambda: quiet.ring.used_idx() == 1, what="the first quiet chain")
            assert busy.workers[0].requests > 0
            add_and_kick_if_asked(quiet)
            wait_until(lambda: quiet.ring.used_idx() == 2, timeout=2.0,
                       what="the quiet queue's chain while the other queue is busy")
            assert keep_going.is_set()
        finally:
            keep_going.clear()
            thread.stop()


def test_a_completion_racing_a_stopping_queue_does_not_hit_a_closed_fd(lone: LoneQueue) -> None:
    worker = lone.worker(lambda chain, complete: PENDING)
    with worker.ring_lock:  # the serving thread is in a batch: the completion is handed over
        worker.close()  # meanwhile the queue stopped and closed its completion eventfd
        worker.complete(0, 1)  # used to write to the closed fd (EBADF, or another file's)
    assert worker.done_fd == -1


def test_driver_ok_again_without_a_reset_starts_nothing_twice(running: Rig) -> None:
    r = running
    workers = dict(r.dev.workers)
    threads = r.queue_thread_names()
    for status in (0x0B, 0x0F, 0x0F):  # DRIVER_OK dropped and set again, then repeated
        assert r.ch.set_status(status) == RESULT_OK
    assert r.dev.workers == workers
    assert thread_names(f"{r.name}-vq") == threads
    assert r.run(0, v.VIRTIO_BLK_T_OUT, 0, pattern(4096, 7))[0] == OK


def test_malformed_chains_are_logged_rate_limited(lone: LoneQueue,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    worker = lone.worker(lambda chain, complete: 1)
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            for _ in range(8):
                lone.ring.write_desc(0, 0, 16, 0x4)  # indirect, pointing nowhere
                lone.ring.publish([0])
            worker.drain()
            lone.ring.take_used()
    lines = [r for r in caplog.records if "completed with length 0" in r.getMessage()]
    assert worker.bad_chains == 160
    assert 1 <= len(lines) <= 11
