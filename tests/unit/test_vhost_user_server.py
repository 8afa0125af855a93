"""VhostUserServer over a RAM disk, driven by the in-Python front-end
(pyvduse.testing.vhost_user_frontend): I/O, GET_VRING_BASE, reconnection,
resets, enabling rings, memory tables, malformed input and the socket's life."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from holding_backend import HoldingBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvduse.blk import BlkConfig, BlkDevice
from pyvduse.errors import PyvduseError
from pyvduse.testing import DriverMemory, MockSplitRing
from pyvduse.testing.mock_driver import Buffer
from pyvduse.testing.vhost_user_frontend import (
    RequestFailed,
    VhostUserFrontend,
    eventfd,
)
from pyvduse.uapi import virtio as v
from pyvduse.vhost_user import protocol as p
from pyvduse.vhost_user import server as server_module
from pyvduse.vhost_user.server import PROTOCOL_FEATURES, VhostUserServer

MiB = 1 << 20
QSIZE = 32
NUM_QUEUES = 2
DISK = MiB
OK = v.VIRTIO_BLK_S_OK
T_IN, T_OUT = v.VIRTIO_BLK_T_IN, v.VIRTIO_BLK_T_OUT
PROTOCOL_BIT = 1 << p.F_PROTOCOL_FEATURES
REPLY_ACK = p.ProtocolFeature.REPLY_ACK.mask


def release_later(backend: HoldingBackend, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, backend.release)
    timer.start()
    return timer


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def server_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("vu-"))


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed * 17 + (i >> 8)) & 0xFF for i in range(n))


@dataclass
class Rig:
    path: str
    backend: HoldingBackend
    server: VhostUserServer

    def frontend(self, **kwargs: object) -> VhostUserFrontend:
        return VhostUserFrontend(self.path, **kwargs)  # type: ignore[arg-type]


def make_server(path: str, backend: HoldingBackend, stop_timeout: float = 3.0) -> VhostUserServer:
    config = BlkConfig.for_backend(backend, num_queues=NUM_QUEUES, queue_size=QSIZE,
                                   serial="vu-serial")
    return VhostUserServer("vu", BlkDevice(backend, config), path, stop_timeout=stop_timeout)


def no_fds_leaked(before: set[int], caplog: pytest.LogCaptureFixture) -> None:
    """Every fd open now was open ``before``. Log records of refusals carry exceptions
    whose tracebacks hold the frames (and the guest memory mappings, with the fds of
    their mmap objects) of the request: pytest keeps them, a daemon's log does not."""
    for when in ("setup", "call"):
        caplog.get_records(when).clear()  # type: ignore[arg-type]
    gc.collect()
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before}
    assert not leaked, f"file descriptors leaked: {leaked}"


@pytest.fixture
def rig(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Rig]:
    before = open_fds()
    backend = HoldingBackend(DISK)
    path = str(tmp_path / "vu.sock")
    server = make_server(path, backend)
    server.start()
    try:
        yield Rig(path, backend, server)
    finally:
        backend.release()
        server.destroy()
        backend.close()
    assert not os.path.exists(path)
    assert server_threads() == []
    no_fds_leaked(before, caplog)


def check_io(fe: VhostUserFrontend, queue: int = 0, sector: int = 64, seed: int = 1) -> None:
    data = pattern(4096, seed)
    fe.write(queue, sector, data)
    assert fe.read(queue, sector, 4096) == data


def check_serving(rig: Rig) -> None:
    """The server takes a new front-end and serves it."""
    with rig.frontend() as fe:
        fe.start(1, QSIZE)
        check_io(fe, seed=99)


# -- I/O --------------------------------------------------------------------------------


def test_write_read_byte_checked(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.start(NUM_QUEUES, QSIZE)
        assert fe.offered_features & PROTOCOL_BIT
        assert fe.offered_protocol_features == PROTOCOL_FEATURES
        assert rig.server.driver_ok.is_set()
        cases = [(0, 0, 512), (1, 1, 4096), (0, 20, 3 * 512), (1, 100, 64 * 1024),
                 (0, DISK // 512 - 8, 4096)]
        for seed, (queue, sector, length) in enumerate(cases):
            data = pattern(length, seed)
            fe.write(queue, sector, data)
            assert rig.backend.bytes_at(512 * sector, length) == data
        for seed, (queue, sector, length) in enumerate(cases):
            assert fe.read(1 - queue, sector, length) == pattern(length, seed)
        # a request in several buffers, through an indirect table
        ring = fe.rings[0].ring
        head = fe.memory.buffer(v.virtio_blk_outhdr.pack(T_OUT, 0, 300))
        parts = [fe.memory.buffer(pattern(512, 40 + i)) for i in range(3)]
        status = fe.memory.buffer(b"\xff", writable=True)
        ring.add_chain([head, *parts, status], indirect=True)
        fe.kick(0)
        fe.wait_used(0, 1)
        assert fe.memory.read(status.addr, 1)[0] == OK
        assert fe.read(0, 300, 1536) == b"".join(pattern(512, 40 + i) for i in range(3))
        # beyond the end: an error status, and the ring goes on
        status_, _ = fe.run(0, T_IN, DISK // 512, in_len=512)
        assert status_ == v.VIRTIO_BLK_S_IOERR
        check_io(fe)
        # completions came with call eventfd signals: read while waiting, or still pending
        # (the front-end finds a completion already published without reading its signal)
        try:
            pending = os.eventfd_read(fe.rings[0].call_fd)
        except BlockingIOError:
            pending = 0
        assert fe.rings[0].interrupts + pending >= 1


def test_get_config_returns_the_blk_config(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.negotiate()
        config = fe.get_config(0, 60)
        assert config == rig.server.model.config_space()[:60]
        assert struct.unpack_from("<Q", config)[0] == DISK // 512  # capacity in sectors
        assert fe.get_config(0, 8) == struct.pack("<Q", DISK // 512)
        # beyond the config space: an empty reply (how a back-end says no), and it goes on
        size = len(rig.server.model.config_space())
        assert fe.get_config(size - 4, 8) == b""
        assert fe.get_queue_num() == NUM_QUEUES
        assert fe.get_max_mem_slots() >= 8


# -- GET_VRING_BASE ---------------------------------------------------------------------


def test_get_vring_base_returns_the_next_avail_index(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.start(NUM_QUEUES, QSIZE)
        for i in range(3):
            check_io(fe, queue=0, sector=8 * i, seed=i)  # 6 requests on ring 0
        assert fe.get_vring_base(0) == 6
        assert fe.get_vring_base(1) == 0
        assert sorted(rig.server.workers) == []
        assert not rig.server.driver_ok.is_set()
        # stopped: a request made available now is not taken
        fe.submit(0, T_IN, 0, in_len=512)
        with pytest.raises(TimeoutError):
            fe.wait_used(0, 1, timeout=0.1)
        # a new kick fd starts it again from the base it returned
        ring = fe.rings[0]
        os.close(ring.kick_fd)
        ring.kick_fd = eventfd()
        fe.set_vring_kick(0, ring.kick_fd)
        fe.wait_used(0, 1)
        assert fe.get_vring_base(0) == 7


def test_get_vring_base_waits_for_requests_in_flight(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.start(1, QSIZE)
        rig.backend.hold_at.add(512 * 8)
        held = fe.submit(0, T_OUT, 8, pattern(4096, 5))
        done = fe.submit(0, T_OUT, 16, pattern(4096, 6))
        rig.backend.wait_held(1)
        fe.wait_used(0, 1)
        ring = fe.rings[0].ring
        assert ring.used_idx() == 1
        fe.send(p.Request.GET_VRING_BASE, p.encode_vring_state(p.VringState(0, 0)))
        with pytest.raises(TimeoutError):  # no answer while a request is in the backend
            fe.receive(timeout=0.3)
        timer = release_later(rig.backend, 0.1)
        assert fe.vring_base_reply(0) == 2
        assert ring.used_idx() == 2  # completed into the used ring before the answer
        timer.join()
        assert fe.status(held) == OK and fe.status(done) == OK
        assert rig.backend.bytes_at(512 * 8, 4096) == pattern(4096, 5)


def test_get_vring_base_gives_up_after_the_stop_timeout(tmp_path: Path) -> None:
    backend = HoldingBackend(DISK)
    server = make_server(str(tmp_path / "vu.sock"), backend, stop_timeout=0.3)
    server.start()
    try:
        with VhostUserFrontend(server.path) as fe:
            fe.start(1, QSIZE)
            backend.hold_at.add(0)
            fe.submit(0, T_IN, 0, in_len=512)
            backend.wait_held(1)
            started = time.monotonic()
            assert fe.get_vring_base(0) == 1
            assert 0.25 <= time.monotonic() - started < 3
            backend.release()  # too late: dropped
            assert fe.rings[0].ring.used_idx() == 0
    finally:
        server.destroy()
        backend.close()


# -- reconnection -----------------------------------------------------------------------


def test_disconnect_with_a_request_in_flight_loses_nothing(rig: Rig) -> None:
    memory = DriverMemory()
    try:
        fe = rig.frontend(memory=memory)
        fe.start(1, QSIZE)
        check_io(fe, sector=0, seed=1)  # 2 requests
        rig.backend.hold_at.add(512 * 64)
        held = fe.submit(0, T_OUT, 64, pattern(8192, 2))
        rig.backend.wait_held(1)
        ring = fe.rings[0].ring
        fe.close()  # the front-end goes away with the write in the backend
        timer = release_later(rig.backend, 0.2)
        # a new front-end over the same memory: the server takes it once the old
        # session's request completed into the ring
        fe2 = rig.frontend(memory=memory)
        try:
            fe2.negotiate()
            timer.join()
            used = ring.used_idx()
            assert used == 3  # the held write completed into the old ring
            assert ring.take_used() == [(held.head, 1)]
            assert memory.read(held.status.addr, 1)[0] == OK
            assert rig.backend.bytes_at(512 * 64, 8192) == pattern(8192, 2)
            # it restarts the ring from base = used index, where its driver stands
            fe2.set_mem_table()
            fe2.setup_ring(0, QSIZE, base=used, ring=ring)
            assert fe2.read(0, 64, 8192) == pattern(8192, 2)
            assert fe2.read(0, 0, 4096) == pattern(4096, 1)
            assert fe2.get_vring_base(0) == used + 2
        finally:
            fe2.close()
        assert rig.server.connections == 2
    finally:
        memory.close()


def test_front_ends_one_after_the_other(rig: Rig) -> None:
    for seed in range(3):
        with rig.frontend() as fe:
            fe.start(NUM_QUEUES, QSIZE)
            check_io(fe, queue=seed % 2, sector=8 * seed, seed=seed)
    with rig.frontend() as fe:
        fe.start(1, QSIZE)
        for seed in range(3):
            assert fe.read(0, 8 * seed, 4096) == pattern(4096, seed)
    assert rig.server.connections == 4


# -- reset, enable, protocol features ---------------------------------------------------


def test_reset_device(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.start(NUM_QUEUES, QSIZE)
        check_io(fe)
        rig.backend.hold_at.add(0)
        fe.submit(1, T_IN, 0, in_len=512)
        rig.backend.wait_held(1)
        started = time.monotonic()
        fe.reset_device()  # gives the request up at once
        assert time.monotonic() - started < 1.0
        assert rig.server.workers == {}
        assert rig.server.virtio.driver_features == 0
        assert not rig.server.driver_ok.is_set()
        rig.backend.release()
        assert fe.rings[1].ring.used_idx() == 0  # the late completion went nowhere
        # the front-end sets the device up again, from scratch
        fe.set_features(fe.offered_features)
        fe.set_mem_table()
        fe.setup_ring(0, QSIZE)
        fe.setup_ring(1, QSIZE)
        check_io(fe, queue=1, seed=3)


def test_set_vring_enable(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.negotiate()
        fe.set_mem_table()
        fe.setup_ring(0, QSIZE, enable=False)
        req = fe.submit(0, T_IN, 0, in_len=512)
        with pytest.raises(TimeoutError):  # complete but disabled: not served
            fe.wait_used(0, 1, timeout=0.1)
        assert rig.server.workers == {}
        fe.set_vring_enable(0, True)
        fe.wait_used(0, 1)
        assert fe.status(req) == OK
        fe.set_vring_enable(0, False)
        assert rig.server.workers == {}
        fe.submit(0, T_IN, 0, in_len=512)
        with pytest.raises(TimeoutError):
            fe.wait_used(0, 1, timeout=0.1)
        fe.set_vring_enable(0, True)  # from where it stopped
        fe.wait_used(0, 1)
        assert fe.get_vring_base(0) == 2
        with pytest.raises(RequestFailed):
            fe.request(p.Request.SET_VRING_ENABLE, p.encode_vring_state(p.VringState(0, 2)))


def test_driver_ok_follows_the_running_rings(rig: Rig) -> None:
    """driver_ok (the export's "driver-ok") is set while a ring runs, however they stop."""
    with rig.frontend() as fe:
        fe.start(NUM_QUEUES, QSIZE)
        assert rig.server.driver_ok.is_set()
        fe.set_vring_enable(0, False)
        assert rig.server.driver_ok.is_set()  # ring 1 runs
        fe.set_vring_enable(1, False)
        assert not rig.server.driver_ok.is_set()
        fe.set_vring_enable(1, True)
        assert rig.server.driver_ok.is_set()
        fe.get_vring_base(1)
        assert not rig.server.driver_ok.is_set()
        fe.set_vring_enable(0, True)
        assert rig.server.driver_ok.is_set()
        fe.set_mem_table([])  # no memory: ring 0 stops
        assert rig.server.workers == {}
        assert not rig.server.driver_ok.is_set()


def test_without_protocol_features_rings_start_enabled(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.negotiate(features=~PROTOCOL_BIT)
        assert fe.protocol_features == 0
        assert not fe.features & PROTOCOL_BIT
        fe.set_mem_table()
        fe.setup_ring(0, QSIZE)  # no SET_VRING_ENABLE
        check_io(fe)


def test_without_protocol_features_a_ring_set_up_before_set_features_starts(rig: Rig) -> None:
    """The ring is complete before SET_FEATURES (no protocol features) enables it: it
    starts then, and serves what its driver had made available."""
    with rig.frontend() as fe:
        offered = fe.get_features()
        fe.request(p.Request.SET_OWNER)
        fe.set_mem_table()
        fe.setup_ring(0, QSIZE)
        req = fe.submit(0, T_IN, 0, in_len=512)
        assert rig.server.workers == {}
        fe.set_features(offered & ~PROTOCOL_BIT)
        fe.wait_used(0, 1)
        assert fe.status(req) == OK
        check_io(fe)


def test_reply_ack_answers_each_request(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.negotiate()
        assert fe.acks
        fe.set_mem_table()  # each request of setup_ring waits for its ack
        fe.setup_ring(0, QSIZE)
        check_io(fe)
        # NEED_REPLY on a request with a reply of its own: that reply alone
        fe.send(p.Request.GET_FEATURES, flags=p.VERSION | p.FLAG_NEED_REPLY)
        assert fe.receive().u64() == fe.offered_features
        assert fe.get_queue_num() == NUM_QUEUES


# -- multi-queue ------------------------------------------------------------------------


def test_multi_queue(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.start(NUM_QUEUES, QSIZE)
        assert fe.get_queue_num() == NUM_QUEUES
        assert sorted(rig.server.workers) == [0, 1]
        # interleaved requests on both rings, several in flight on each
        reqs = [(q, fe.submit(q, T_OUT, 16 * i + 8 * q, pattern(4096, 10 * q + i), kick=False))
                for i in range(8) for q in range(NUM_QUEUES)]
        for q in range(NUM_QUEUES):
            fe.kick(q)
        for q in range(NUM_QUEUES):
            fe.wait_used(q, 8)
        assert all(fe.status(r) == OK for _, r in reqs)
        for i in range(8):
            for q in range(NUM_QUEUES):
                assert fe.read(1 - q, 16 * i + 8 * q, 4096) == pattern(4096, 10 * q + i)
        assert fe.get_vring_base(0) == 16 and fe.get_vring_base(1) == 16
        with pytest.raises(RequestFailed):
            fe.set_vring_num(NUM_QUEUES, QSIZE)


# -- memory tables ----------------------------------------------------------------------


def test_set_mem_table_while_running_remaps(rig: Rig) -> None:
    extra = DriverMemory(size=MiB, base=0x4000_0000)
    try:
        with rig.frontend() as fe:
            fe.start(NUM_QUEUES, QSIZE)
            check_io(fe)
            rig.backend.hold_at.add(512 * 200)
            held = fe.submit(0, T_OUT, 200, pattern(4096, 7))
            rig.backend.wait_held(1)
            # the memory table grows by a region (memory hot-plug): sent whole again
            fe.set_mem_table([(fe.region(), fe.memory.fd),
                              (p.MemoryRegion(extra.base, extra.size, 0x6000_0000_0000, 0),
                               extra.fd)])
            assert sorted(rig.server.workers) == [0, 1]
            rig.backend.release()
            fe.wait_used(0, 1)  # the request in flight completed into the remapped ring
            assert fe.status(held) == OK
            check_io(fe, queue=1, seed=8)
            # a request whose data lives in the new region
            ring = fe.rings[0].ring
            data = extra.buffer(pattern(4096, 9))
            status = fe.memory.buffer(b"\xff", writable=True)
            ring.add_chain([fe.memory.buffer(v.virtio_blk_outhdr.pack(T_OUT, 0, 300)),
                            data, status])
            fe.kick(0)
            fe.wait_used(0, 1)
            assert fe.memory.read(status.addr, 1)[0] == OK
            assert rig.backend.bytes_at(512 * 300, 4096) == pattern(4096, 9)
            sink = extra.buffer(4096, writable=True)
            status = fe.memory.buffer(b"\xff", writable=True)
            ring.add_chain([fe.memory.buffer(v.virtio_blk_outhdr.pack(T_IN, 0, 200)),
                            Buffer(sink.addr, 4096, True), status])
            fe.kick(0)
            fe.wait_used(0, 1)
            assert extra.read(sink.addr, 4096) == pattern(4096, 7)
    finally:
        extra.close()


def test_set_mem_table_without_a_running_ring_stops_that_ring_only(rig: Rig) -> None:
    """A new table that no longer holds a running ring is applied: that ring stops (after
    its request in flight), the other goes on, and the ring can be set up again later."""
    extra = DriverMemory(size=MiB, base=0x4000_0000)
    try:
        with rig.frontend() as fe:
            fe.add_memory(extra, 0x6000_0000_0000)
            fe.negotiate()
            fe.set_mem_table()  # both memories
            fe.setup_ring(0, QSIZE)
            fe.setup_ring(1, QSIZE, ring=MockSplitRing(extra, QSIZE))  # ring 1 in the extra one
            check_io(fe, queue=0, seed=1)
            check_io(fe, queue=1, sector=80, seed=2)
            rig.backend.hold_at.add(512 * 160)
            held = fe.submit(1, T_OUT, 160, pattern(4096, 3))
            rig.backend.wait_held(1)
            timer = release_later(rig.backend, 0.1)
            fe.set_mem_table([(fe.region(), fe.memory.fd)])  # the extra memory goes
            timer.join()
            assert sorted(rig.server.workers) == [0]
            check_io(fe, queue=0, sector=200, seed=4)  # ring 0 goes on
            assert fe.rings[1].ring.used_idx() == 3  # the request completed before the stop
            assert fe.status(held) == OK
            assert fe.get_vring_base(1) == 3
            # the memory comes back: ring 1 is set up again where it stopped
            fe.set_mem_table()
            fe.setup_ring(1, QSIZE, base=3, ring=fe.rings[1].ring)
            fe.wait_used(1, 1)  # the completion of the held request, seen by the driver now
            check_io(fe, queue=1, sector=160, seed=3)
    finally:
        extra.close()


def test_set_mem_table_stopping_several_rings_waits_one_stop_timeout(tmp_path: Path) -> None:
    backend = HoldingBackend(DISK)
    server = make_server(str(tmp_path / "vu.sock"), backend, stop_timeout=0.4)
    server.start()
    extra = DriverMemory(size=MiB, base=0x4000_0000)
    try:
        with VhostUserFrontend(server.path) as fe:
            fe.add_memory(extra, 0x6000_0000_0000)
            fe.negotiate()
            fe.set_mem_table()
            for q in range(NUM_QUEUES):  # both rings in the extra memory, a request held on each
                fe.setup_ring(q, QSIZE, ring=MockSplitRing(extra, QSIZE))
                backend.hold_at.add(512 * q)
                fe.submit(q, T_IN, q, in_len=512)
            backend.wait_held(NUM_QUEUES)
            started = time.monotonic()
            fe.set_mem_table([(fe.region(), fe.memory.fd)])
            assert 0.35 <= time.monotonic() - started < 0.7
            assert server.workers == {}
    finally:
        server.destroy()
        backend.release()
        backend.close()
        extra.close()


def test_add_and_remove_memory_regions(rig: Rig) -> None:
    with rig.frontend() as fe:
        fe.negotiate()
        fe.add_mem_reg()
        with pytest.raises(RequestFailed):  # overlaps the region it has
            fe.add_mem_reg()
        fe.setup_ring(0, QSIZE)
        check_io(fe)
        fe.get_vring_base(0)
        fe.rem_mem_reg()
        with pytest.raises(RequestFailed):  # nothing left to remove
            fe.rem_mem_reg()
        fe.add_mem_reg()
        fe.setup_ring(0, QSIZE, base=2, ring=fe.rings[0].ring)
        check_io(fe, seed=2)


# -- malformed input --------------------------------------------------------------------


def u64(value: int) -> bytes:
    return p.encode_u64(value)


def state(index: int, num: int) -> bytes:
    return p.encode_vring_state(p.VringState(index, num))


@dataclass(frozen=True)
class Bad:
    """A message the server must refuse: ``send`` sends it on a front-end that negotiated
    (and ran ``prepare``). ``stream`` marks framing errors (the connection closes even
    with REPLY_ACK); ``fd`` makes ``send`` get a pipe's write end to pass, which the
    server must close."""

    send: Callable[[VhostUserFrontend, int], None]
    prepare: Callable[[VhostUserFrontend], None] | None = None
    stream: bool = False
    fd: bool = False


def _ring_ready(fe: VhostUserFrontend) -> None:
    fe.set_mem_table()
    fe.set_vring_num(0, QSIZE)
    fe.set_vring_base(0, 0)


def _shutdown(fe: VhostUserFrontend) -> None:
    fe.sock.shutdown(socket.SHUT_WR)


def _short_header(fe: VhostUserFrontend, fd: int) -> None:
    fe.send_raw(struct.pack("=II", p.Request.GET_FEATURES, p.VERSION)[:6])
    _shutdown(fe)


def _short_payload(fe: VhostUserFrontend, fd: int) -> None:
    fe.send(p.Request.SET_FEATURES, b"\0\0\0", size=8)
    _shutdown(fe)


def _outside(fe: VhostUserFrontend, fd: int) -> None:
    beyond = fe.user_base + fe.memory.size + 0x10000
    fe.set_vring_addr(0, beyond, beyond + 0x1000, beyond + 0x2000)
    call, kick = eventfd(), eventfd()
    try:
        fe.set_vring_call(0, call)
        fe.set_vring_kick(0, kick)
    finally:
        os.close(call)
        os.close(kick)
    fe.set_vring_enable(0, True)  # the ring would start now: refused


def _running_ring(fe: VhostUserFrontend) -> None:
    fe.set_mem_table()
    fe.setup_ring(0, QSIZE)


BAD: dict[str, Bad] = {
    "short header": Bad(_short_header, stream=True),
    "payload cut short": Bad(_short_payload, stream=True),
    "wrong version": Bad(lambda fe, fd: fe.send(p.Request.GET_FEATURES, flags=2), stream=True),
    "version 0": Bad(lambda fe, fd: fe.send(p.Request.GET_FEATURES, flags=0), stream=True),
    "huge size": Bad(lambda fe, fd: fe.send(p.Request.SET_FEATURES, u64(0), size=1 << 30),
                     stream=True),
    "unknown request": Bad(lambda fe, fd: fe.request(99, u64(0))),
    "unknown request with an fd": Bad(lambda fe, fd: fe.request(1000, b"", [fd]), fd=True),
    "wrong payload size": Bad(lambda fe, fd: fe.request(p.Request.SET_FEATURES, b"\0" * 4)),
    "fd with GET_FEATURES": Bad(lambda fe, fd: fe.send(p.Request.GET_FEATURES, fds=[fd]),
                                stream=True, fd=True),
    "fd with SET_FEATURES": Bad(lambda fe, fd: fe.request(p.Request.SET_FEATURES,
                                                          u64(fe.features), [fd]), fd=True),
    "two fds with SET_VRING_CALL": Bad(
        lambda fe, fd: fe.request(p.Request.SET_VRING_CALL, u64(0), [fd, fd]), fd=True),
    "fd with the no-fd bit": Bad(
        lambda fe, fd: fe.request(p.Request.SET_VRING_CALL, u64(p.VRING_NOFD), [fd]), fd=True),
    "missing kick fd": Bad(lambda fe, fd: fe.request(p.Request.SET_VRING_KICK, u64(0))),
    "no kick fd (polling)": Bad(lambda fe, fd: fe.set_vring_kick(0, None)),
    "missing memory fd": Bad(lambda fe, fd: fe.request(
        p.Request.SET_MEM_TABLE, p.encode_memory_table([fe.region()]))),
    "memory fd not mappable": Bad(lambda fe, fd: fe.set_mem_table([(fe.region(), fd)]),
                                  fd=True),
    "memory region too large to map": Bad(lambda fe, fd: fe.set_mem_table(
        [(p.MemoryRegion(0, 1 << 62, fe.user_base, 0), fe.memory.fd)])),
    "ring index out of range": Bad(lambda fe, fd: fe.set_vring_num(NUM_QUEUES, QSIZE)),
    "call fd for a ring out of range": Bad(lambda fe, fd: fe.set_vring_call(7, fd), fd=True),
    "kick fd for a ring out of range": Bad(lambda fe, fd: fe.set_vring_kick(200, fd), fd=True),
    "enable a ring out of range": Bad(lambda fe, fd: fe.set_vring_enable(NUM_QUEUES, True)),
    "GET_VRING_BASE of a ring out of range": Bad(
        lambda fe, fd: fe.send(p.Request.GET_VRING_BASE, state(9, 0)), stream=True),
    "ring size not a power of two": Bad(lambda fe, fd: fe.set_vring_num(0, 24)),
    "ring size above the queue size": Bad(lambda fe, fd: fe.set_vring_num(0, 2 * QSIZE)),
    "ring size 0": Bad(lambda fe, fd: fe.set_vring_num(0, 0)),
    "ring base beyond 16 bits": Bad(lambda fe, fd: fe.set_vring_base(0, 1 << 16)),
    "ring address outside the memory table": Bad(_outside, prepare=_ring_ready),
    "ring address with dirty logging": Bad(
        lambda fe, fd: fe.set_vring_addr(0, fe.user_base, fe.user_base + 0x2000,
                                         fe.user_base + 0x1000, flags=1)),
    "ring size change while running": Bad(lambda fe, fd: fe.set_vring_num(0, QSIZE // 2),
                                          prepare=_running_ring),
    "features never offered": Bad(lambda fe, fd: fe.set_features(fe.features | 1 << 60)),
    "protocol features never offered": Bad(
        lambda fe, fd: fe.set_protocol_features(fe.protocol_features
                                                | p.ProtocolFeature.LOG_SHMFD.mask)),
    "SET_CONFIG of a read-only space": Bad(lambda fe, fd: fe.request(
        p.Request.SET_CONFIG, p.encode_config(p.ConfigSpace(0, 0, b"\0" * 8)))),
    "REM_MEM_REG without memory": Bad(lambda fe, fd: fe.rem_mem_reg()),
    "SET_LOG_BASE": Bad(lambda fe, fd: fe.send(p.Request.SET_LOG_BASE, u64(0)), stream=True),
}


def pipe_closed(read_end: int, timeout: float = 3.0) -> bool:
    """Whether every write end of the pipe was closed (the reader sees EOF)."""
    if not select.select([read_end], [], [], timeout)[0]:
        return False
    return os.read(read_end, 1) == b""


@pytest.mark.parametrize("acks", [True, False], ids=["reply-ack", "no-ack"])
@pytest.mark.parametrize("name", list(BAD))
def test_malformed_input_is_refused_and_the_server_goes_on(rig: Rig, name: str,
                                                           acks: bool) -> None:
    bad = BAD[name]
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        fe = rig.frontend(timeout=3.0)
        with fe:
            fe.negotiate(protocol_features=PROTOCOL_FEATURES if acks
                         else PROTOCOL_FEATURES & ~REPLY_ACK)
            if bad.prepare is not None:
                bad.prepare(fe)
            closes = bad.stream or not acks
            if closes:
                bad.send(fe, write_end)
                if bad.fd:
                    os.close(write_end)
                    write_end = -1
                assert fe.wait_closed(3.0), "the server kept the connection"
            else:
                with pytest.raises(RequestFailed):
                    bad.send(fe, write_end)
                if bad.fd:
                    os.close(write_end)
                    write_end = -1
                    assert pipe_closed(read_end), "the server kept the fd"
                assert fe.get_features() == fe.offered_features  # the session goes on
        if bad.fd:
            assert pipe_closed(read_end), "the server kept the fd"
        check_serving(rig)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_a_front_end_stuck_mid_message_holds_nobody_else_up_for_ever(rig: Rig) -> None:
    """Half a header, then silence: the next front-end waits, and is served once the
    first one goes away."""
    stuck = rig.frontend()
    stuck.send_raw(b"\x01\x00")
    waiting = rig.frontend()
    try:
        waiting.send(p.Request.GET_FEATURES)
        with pytest.raises(TimeoutError):
            waiting.receive(timeout=0.2)
        stuck.close()
        assert waiting.receive().u64() & PROTOCOL_BIT
    finally:
        waiting.close()
        stuck.close()
    check_serving(rig)


# -- random input -----------------------------------------------------------------------

_small = st.sampled_from([0, 1, 2, 3, 7, 16, 24, QSIZE, 2 * QSIZE, 0xFF, 0x100, 0xFFFF,
                          1 << 16, 1 << 31])


@st.composite
def _payloads(draw: st.DrawFn, request: int) -> bytes:
    rule = p.EXPECTED.get(request)
    kind = draw(st.integers(0, 3))
    if rule is None or kind == 0:
        return draw(st.binary(max_size=64))
    if rule.min_size == p.VRING_STATE.size == rule.max_size:
        return state(draw(st.integers(0, 3)), draw(_small))
    if rule.min_size == p.U64.size == rule.max_size:
        return u64(draw(st.integers(0, 3) | _small | st.integers(0, (1 << 64) - 1)))
    size = rule.min_size + rule.step * draw(st.integers(0, 2))
    return draw(st.binary(min_size=min(size, rule.max_size), max_size=min(size, rule.max_size)))


@st.composite
def _messages(draw: st.DrawFn) -> tuple[int, int, bytes, int]:
    request = draw(st.sampled_from(list(p.Request)) | st.integers(0, 64))
    flags = draw(st.sampled_from([p.VERSION, p.VERSION | p.FLAG_NEED_REPLY,
                                  p.VERSION | p.FLAG_REPLY, 0, 2, 0xFFFFFFFF]))
    nfds = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    return request, flags, draw(_payloads(request)), nfds


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.booleans(), messages=st.lists(_messages(), max_size=10))
def test_random_messages_never_stop_the_server(rig: Rig, prefix: bool,
                                               messages: list[tuple[int, int, bytes, int]]
                                               ) -> None:
    fds: list[int] = []
    try:
        with rig.frontend(timeout=2.0) as fe:
            if prefix:  # a running device to throw things at
                fe.start(NUM_QUEUES, QSIZE, protocol_features=PROTOCOL_FEATURES & ~REPLY_ACK)
            for request, flags, payload, nfds in messages:
                new = [eventfd() for _ in range(nfds)]
                fds += new
                try:
                    fe.send(request, payload, new, flags=flags)
                except OSError:  # the server closed the connection already
                    break
    finally:
        for fd in fds:
            os.close(fd)
    thread = rig.server._thread
    assert thread is not None and thread.is_alive()
    check_serving(rig)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), nfds=st.integers(0, 3))
def test_random_bytes_never_stop_the_server(rig: Rig, data: bytes, nfds: int) -> None:
    fds = [eventfd() for _ in range(nfds)]
    try:
        with rig.frontend(timeout=2.0) as fe, contextlib.suppress(OSError):
            fe.send_raw(data, fds)
    finally:
        for fd in fds:
            os.close(fd)
    thread = rig.server._thread
    assert thread is not None and thread.is_alive()
    check_serving(rig)


# -- the socket -------------------------------------------------------------------------


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a server that died: the file stays, nobody listens
    backend = HoldingBackend(DISK)
    server = make_server(path, backend)
    server.start()
    try:
        with VhostUserFrontend(path) as fe:
            fe.start(1, QSIZE)
            check_io(fe)
    finally:
        server.destroy()
        backend.close()
    assert not os.path.exists(path)


def test_a_live_socket_is_refused(rig: Rig) -> None:
    other = HoldingBackend(DISK)
    try:
        with pytest.raises(PyvduseError, match="another server listens"):
            make_server(rig.path, other).start()
    finally:
        other.close()
    check_serving(rig)  # the first server is untouched


def test_a_live_socket_with_a_full_backlog_is_refused(rig: Rig) -> None:
    """The server is busy with a front-end and more wait in its backlog: a probe that
    cannot get in does not mean that nobody listens."""
    busy = rig.frontend()
    queued: list[socket.socket] = []
    try:
        busy.negotiate()
        while True:  # fill the listen backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                sock.connect(rig.path)
            except BlockingIOError:
                sock.close()
                break
            queued.append(sock)
            assert len(queued) < 100
        other = HoldingBackend(DISK)
        second = make_server(rig.path, other)
        try:
            with pytest.raises(PyvduseError, match="another server listens"):
                second.start()
        finally:
            second.destroy()  # if it did start
            other.close()
        assert os.path.exists(rig.path)
    finally:
        for sock in queued:
            sock.close()
        busy.close()
    check_serving(rig)


def test_a_file_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    path.write_text("data")
    backend = HoldingBackend(DISK)
    try:
        with pytest.raises(PyvduseError, match="not a socket"):
            make_server(str(path), backend).start()
    finally:
        backend.close()
    assert path.read_text() == "data"


def test_socket_permissions(rig: Rig) -> None:
    assert os.stat(rig.path).st_mode & 0o777 == 0o600


def test_destroy_idle_and_twice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = open_fds()
    backend = HoldingBackend(DISK)
    server = make_server(str(tmp_path / "vu.sock"), backend)
    server.start()
    started = time.monotonic()
    server.destroy()
    assert time.monotonic() - started < 1.0
    assert not os.path.exists(server.path)
    server.destroy()
    backend.close()
    assert server_threads() == []
    no_fds_leaked(before, caplog)


def test_destroy_with_a_request_in_flight_returns_within_bounds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = open_fds()
    backend = HoldingBackend(DISK)
    server = make_server(str(tmp_path / "vu.sock"), backend, stop_timeout=0.5)
    server.start()
    fe = VhostUserFrontend(server.path)
    try:
        fe.start(1, QSIZE)
        backend.hold_at.add(0)
        fe.submit(0, T_IN, 0, in_len=512)
        backend.wait_held(1)
        started = time.monotonic()
        server.destroy()
        assert time.monotonic() - started < 3.0
        assert not os.path.exists(server.path)
        assert fe.wait_closed(1.0)
        with pytest.raises(OSError) as info:
            VhostUserFrontend(server.path)
        assert info.value.errno in (errno.ENOENT, errno.ECONNREFUSED)
    finally:
        fe.close()
        backend.release()
        backend.close()
    assert server_threads() == []
    no_fds_leaked(before, caplog)


def test_destroy_while_get_vring_base_waits(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """GET_VRING_BASE waits for ring 0's request, then the session's end for ring 1's:
    destroy() waits for both (two stop timeouts), and the server thread is gone after it."""
    monkeypatch.setattr(server_module, "JOIN_TIMEOUT", 0.3)
    before = open_fds()
    backend = HoldingBackend(DISK)
    server = make_server(str(tmp_path / "vu.sock"), backend, stop_timeout=0.5)
    server.start()
    fe = VhostUserFrontend(server.path)
    try:
        fe.start(NUM_QUEUES, QSIZE)
        backend.hold_at.update({0, 512})
        fe.submit(0, T_IN, 0, in_len=512)
        fe.submit(1, T_IN, 1, in_len=512)
        backend.wait_held(2)
        fe.send(p.Request.GET_VRING_BASE, state(0, 0))
        time.sleep(0.05)  # the server waits for ring 0's request now
        started = time.monotonic()
        server.destroy()
        assert time.monotonic() - started < 2.0
        assert server_threads() == []
        assert not os.path.exists(server.path)
    finally:
        fe.close()
        backend.release()
        backend.close()
    no_fds_leaked(before, caplog)


def test_destroy_with_a_front_end_stuck_mid_message(rig: Rig) -> None:
    fe = rig.frontend()
    try:
        fe.negotiate()
        fe.send_raw(b"\x05\x00\x00")  # a third of a header, then nothing
        time.sleep(0.05)
        started = time.monotonic()
        rig.server.destroy()
        assert time.monotonic() - started < 2.0
        assert fe.wait_closed(1.0)
    finally:
        fe.close()
